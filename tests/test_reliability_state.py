"""Resumes, concurrent runs and damaged files never give silent wrong results: stores are
keyed by their settings and inputs, checksummed, and outputs are locked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import purification
import utils.diffusion.purify as purify_mod
from utils.data import write_eclipse_pkl
from utils.diffusion.factory import load_diffusion_spec
from utils.fileio import UserError
from utils.run_state import OutputLock, check_name, lock_path, same_settings_or_refuse

TINY_CFG = "config/eclipse/cpu.yml"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def _purif_work(tmp_path, images=24):
    """A tiny work folder: 24 random images as URP.pkl and a random tiny UNet."""
    from utils.data import ImageSet

    g = torch.Generator().manual_seed(0)
    data = ImageSet(
        torch.randint(0, 256, (images, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(images) % 10
    )
    write_eclipse_pkl(tmp_path / "poisoned_data" / "cifar10" / "URP.pkl", data)
    spec = load_diffusion_spec(TINY_CFG)
    torch.manual_seed(0)
    model = spec.build_model()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    ckpt = tmp_path / "diff_ckpt" / "cifar10" / "tiny" / "ema_0.9999_5.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt)
    return data


def _purif_argv(work, *extra):
    return [
        *("--poison", "URP", "--config", TINY_CFG, "--sparse_set", "tiny", "--sparse_diff_model", "ema_0.9999_5.pt"),
        *("--t", "2", "--batch_size", "8", "--bf16", "false", "--work_dir", str(work), *extra),
    ]


OUT = "purified_data/cifar10/tiny/2/5/URP-pure"


def _kill_after(monkeypatch, n_ok: int):
    """Make purification die (as on Ctrl-C) after ``n_ok`` batches."""
    real, calls = purify_mod.noise_and_denoise, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) > n_ok:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(purify_mod, "noise_and_denoise", dying)
    return real


# --------------------------------------------------------------------------- helpers


def test_check_name():
    for ok in ("EM", "EM-classwise", "a.b+c_d", "test2000ps8000", "ema_0.9999_5.pt"):
        assert check_name(ok, "--x") == ok
    for bad in ("/abs/x", "../../x", "a/b", "a\\b", ".", "..", "", "a b", "x;y"):
        with pytest.raises(UserError, match="--x must be a plain name"):
            check_name(bad, "--x")


def test_same_settings_or_refuse_names_every_differing_key(tmp_path):
    assert same_settings_or_refuse(tmp_path, None, {"a": 1}) is False
    assert same_settings_or_refuse(tmp_path, {"a": 1, "b": [1]}, {"b": [1], "a": 1}) is True
    with pytest.raises(UserError) as e:
        same_settings_or_refuse(tmp_path, {"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4}, hint="do X")
    msg = str(e.value)
    assert "b: 2 -> 5" in msg and "c: 3 -> '<missing>'" in msg and "d: '<missing>' -> 4" in msg and "a:" not in msg
    assert msg.endswith("do X") and "\n" not in msg
    assert same_settings_or_refuse(tmp_path, {"a": 1}, {"a": 2}, overwrite=True) is False


_HOLD = "import sys,time; sys.path.insert(0, sys.argv[1]); from utils.run_state import OutputLock; OutputLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)"


def test_lock_live_holder_refused_dead_holder_taken_over(tmp_path):
    out = tmp_path / "out.pkl"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, REPO, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as e:
            OutputLock(out).acquire()
        assert f"PID {holder.pid} on {socket.gethostname()}" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    # the killed holder left its lock file behind: a dead holder's lock is taken over
    assert json.loads(lock_path(out).read_text())["pid"] == holder.pid
    with OutputLock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()
    # a holder recorded on another host cannot be checked from here: refused
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(UserError, match="PID 1 on elsewhere.example"):
        OutputLock(out).acquire()


# --------------------------------------------------------------------------- purification


def test_purification_after_kill_with_other_seed_is_refused_or_restarted(tmp_path, monkeypatch, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _purif_work(ref)
    _purif_work(run)
    purification.main(_purif_argv(ref, "--seed", "2"))
    real = _kill_after(monkeypatch, 1)
    with pytest.raises(SystemExit):
        purification.main(_purif_argv(run, "--seed", "1"))
    monkeypatch.setattr(purify_mod, "noise_and_denoise", real)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        purification.main(_purif_argv(run, "--seed", "2"))
    assert e.value.code == 2
    msg = _err(capsys)
    assert "other settings (seed: 1 -> 2)" in msg and "--overwrite" in msg
    purification.main(_purif_argv(run, "--seed", "2", "--overwrite"))
    assert (run / f"{OUT}.pkl").read_bytes() == (ref / f"{OUT}.pkl").read_bytes()
    assert json.loads((run / f"{OUT}.json").read_text())["seed"] == 2


def _interrupted_purification(tmp_path, monkeypatch):
    """A finished reference run and the same run killed after two batches: (ref, run, parts
    folder of the killed run, the real noise_and_denoise)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    _purif_work(ref)
    _purif_work(run)
    purification.main(_purif_argv(ref))
    real = _kill_after(monkeypatch, 2)
    with pytest.raises(SystemExit):
        purification.main(_purif_argv(run))
    monkeypatch.setattr(purify_mod, "noise_and_denoise", real)
    return ref, run, run / "purified_data/cifar10/tiny/2/5/.URP-pure.parts", real


def test_purification_parts_are_keyed_by_input_and_checksummed(tmp_path, monkeypatch, capsys):
    ref, run, parts, real = _interrupted_purification(tmp_path, monkeypatch)
    # a damaged part (same size, other bytes) is redone, not used
    p0 = parts / "part_00000.pt"
    raw = bytearray(p0.read_bytes())
    raw[-40] ^= 0xFF
    p0.write_bytes(bytes(raw))
    purification.main(_purif_argv(run))
    assert (run / f"{OUT}.pkl").read_bytes() == (ref / f"{OUT}.pkl").read_bytes()
    summary = json.loads((run / f"{OUT}.json").read_text())
    # the rate counts this process's work only: part 1 was loaded from disk
    assert summary["images_resumed"] == 8

    # another input under the same name: the kept batches of the old input are refused
    _kill_after(monkeypatch, 1)
    with pytest.raises(SystemExit):
        purification.main(_purif_argv(run, "--overwrite"))
    monkeypatch.setattr(purify_mod, "noise_and_denoise", real)
    _purif_work(tmp_path / "other", images=16)
    (run / "poisoned_data/cifar10/URP.pkl").write_bytes((tmp_path / "other/poisoned_data/cifar10/URP.pkl").read_bytes())
    (run / f"{OUT}.pkl").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        purification.main(_purif_argv(run))
    msg = _err(capsys)
    assert "images: '" in msg and "n: 24 -> 16" in msg


def test_purification_resumes_parts_marked_part_ok(tmp_path, monkeypatch):
    """A parts folder whose batches are marked ``part_<i>.ok`` (``<key of settings.json>
    <checksum>``) instead of ``done/chunk_<i>`` resumes from those batches."""
    from utils.fileio import checksum

    ref, run, parts, real = _interrupted_purification(tmp_path, monkeypatch)
    settings = json.loads((parts / "settings.json").read_text())
    key = checksum(json.dumps(settings, sort_keys=True, default=str).encode())
    for i in range(2):
        part = parts / f"part_{i:05d}.pt"
        part.with_suffix(".ok").write_text(f"{key} {checksum(part.read_bytes())}\n")
        (parts / "done" / f"chunk_{i:05d}").unlink()
    purification.main(_purif_argv(run))
    assert (run / f"{OUT}.pkl").read_bytes() == (ref / f"{OUT}.pkl").read_bytes()
    assert json.loads((run / f"{OUT}.json").read_text())["images_resumed"] == 16


def test_purification_refuses_a_running_output(tmp_path, capsys):
    _purif_work(tmp_path)
    out = tmp_path / f"{OUT}.pkl"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, REPO, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            purification.main(_purif_argv(tmp_path))
        assert e.value.code == 2
        assert f"in use by another run (PID {holder.pid}" in _err(capsys)
        assert not out.exists() and not (out.parent / ".URP-pure.parts").exists()
    finally:
        holder.kill()
        holder.wait()
    purification.main(_purif_argv(tmp_path))  # the dead holder's lock is taken over
    assert out.is_file() and not lock_path(out).exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--poison", "/abs/x"],
        ["--poison", "../../../x"],
        ["--sparse_set", "../x"],
        ["--sparse_diff_model", "../../x.pt"],
    ],
)
def test_purification_names_are_not_paths(tmp_path, capsys, argv):
    with pytest.raises(SystemExit):
        purification.main(["--work_dir", str(tmp_path), *argv])
    assert "must be a plain name" in _err(capsys)


# --------------------------------------------------------------------------- DataElixir candidate store


@pytest.fixture(scope="module")
def tiny_store_models():
    import torch.nn as nn

    from utils.diffusion.factory import spec_from_dict

    spec = spec_from_dict(
        {
            "model": {"architecture": "ddpm", "ch": 32, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": []},
            "diffusion": {"num_diffusion_timesteps": 10},
        },
        "tiny",
    )
    torch.manual_seed(0)
    model = spec.build_model().eval().requires_grad_(False)
    torch.manual_seed(1)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    return model, spec.build_diffusion(), clf, images


CAND = dict(steps_T=2, rounds_n=1, last_steps_m=2, batch_size=2, seed=11, bf16=False)


@pytest.mark.parametrize("victim", ["candidates.u8", "preds.i16"])
def test_truncated_candidate_store_is_rebuilt_not_read_as_zeros(tmp_path, tiny_store_models, victim):
    from utils.dataelixir import candidate_store as cs
    from utils.dataelixir import defence as de

    model, base, clf, images = tiny_store_models
    de.construct_candidates(model, base, clf, images, tmp_path / "ref", **CAND)
    run = tmp_path / "run"
    de.construct_candidates(model, base, clf, images, run, **CAND)
    with open(run / victim, "r+b") as f:  # a kill while the file was being extended
        f.truncate(os.path.getsize(run / victim) // 2)
    assert not cs.candidates_complete(run)
    with pytest.raises(UserError, match=f"{victim} holds"):
        cs.open_candidates(run)
    logs: list[str] = []
    de.construct_candidates(model, base, clf, images, run, log=logs.append, **CAND)
    assert any("rebuilding the chunks it lost" in m for m in logs)
    assert cs.candidates_complete(run)
    for f in ("candidates.u8", "preds.i16"):
        assert (run / f).read_bytes() == (tmp_path / "ref" / f).read_bytes()


def test_candidate_chunk_with_other_bytes_is_rebuilt(tmp_path, tiny_store_models):
    from utils.dataelixir import candidate_store as cs
    from utils.dataelixir import defence as de

    model, base, clf, images = tiny_store_models
    run = tmp_path / "run"
    de.construct_candidates(model, base, clf, images, run, **CAND)
    good = (run / "candidates.u8").read_bytes()
    cand = np.memmap(run / "candidates.u8", dtype=np.uint8, mode="r+")
    cand[-10:] = 0  # same size, damaged last chunk
    cand.flush()
    del cand
    assert not cs.candidates_complete(run)
    calls = []
    real = de.build_chunk
    try:
        de.build_chunk = lambda *a, **k: calls.append(1) or real(*a, **k)
        de.construct_candidates(model, base, clf, images, run, **CAND)
    finally:
        de.build_chunk = real
    assert len(calls) == 1 and (run / "candidates.u8").read_bytes() == good


def test_candidate_store_is_keyed_by_its_inputs(tmp_path, tiny_store_models):
    import torch.nn as nn

    from utils.dataelixir import defence as de

    model, base, clf, images = tiny_store_models
    de.construct_candidates(model, base, clf, images, tmp_path, **CAND)
    other = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    with pytest.raises(UserError, match="classifier: '"):
        de.construct_candidates(model, base, other, images, tmp_path, **CAND)
    with pytest.raises(UserError, match="images: '"):
        de.construct_candidates(model, base, clf, 255 - images, tmp_path, **CAND)


# --------------------------------------------------------------------------- train_diffusion.py


TINY_DDPM = """model: {architecture: ddpm, ch: 32, ch_mult: [1], num_res_blocks: 1, attn_resolutions: [], dropout: 0.1}
diffusion: {num_diffusion_timesteps: 100}
"""


def _td(work, iterations, *extra):
    work.mkdir(parents=True, exist_ok=True)
    (work / "tiny.yml").write_text(TINY_DDPM)
    return [
        *("--config", str(work / "tiny.yml"), "--num_clean", "32", "--replicas", "2"),
        *("--batch_size", "8", "--bf16", "false"),
        *("--iterations", str(iterations), "--save_interval", "3", "--log_interval", "1", "--ema_rate", "0.5"),
        *("--work_dir", str(work), *extra),
    ]


def test_train_diffusion_resumes_bit_identically_mid_epoch(tmp_path, monkeypatch):
    """64 images in batches of 8: the checkpoint at step 3 falls mid-epoch; the run is
    killed while saving step 6 (after logging rows 4 to 6) and resumed; dropout (0.1)
    draws from the global generator."""
    import train_diffusion
    import utils.diffusion.training as dt

    straight, resumed = tmp_path / "a", tmp_path / "b"
    train_diffusion.main(_td(straight, 6))
    real = dt._save

    def killed_at_6(model, ema, opt, step, *a, **k):
        if step == 6:
            raise KeyboardInterrupt
        return real(model, ema, opt, step, *a, **k)

    monkeypatch.setattr(dt, "_save", killed_at_6)
    with pytest.raises(SystemExit):
        train_diffusion.main(_td(resumed, 6))
    run = "diff_ckpt/cifar10/test32ps64"
    assert {p.name for p in (resumed / run).glob("model*.pt")} == {"model000003.pt"}
    monkeypatch.setattr(dt, "_save", real)
    train_diffusion.main(_td(resumed, 6))
    for name in ("model000006.pt", "ema_0.5_000006.pt"):
        a = torch.load(straight / run / name, weights_only=True)
        b = torch.load(resumed / run / name, weights_only=True)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    steps = [line.split(",")[0] for line in (resumed / run / "progress.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4", "5", "6"]


def test_train_diffusion_lock_and_names(tmp_path, capsys):
    import train_diffusion

    with pytest.raises(SystemExit):
        train_diffusion.main(_td(tmp_path, 1, "--sparse_set", "../../x"))
    assert "--sparse_set must be a plain name" in _err(capsys)
    out = tmp_path / "diff_ckpt/cifar10/test32ps64"
    with OutputLock(out):
        with pytest.raises(SystemExit):
            train_diffusion.main(_td(tmp_path, 1))
        assert f"in use by another run (PID {os.getpid()}" in _err(capsys)
    train_diffusion.main(_td(tmp_path, 1))
    with pytest.raises(SystemExit):
        train_diffusion.main(_td(tmp_path, 2, "--lr", "0.5"))
    assert "other settings (training.lr: 0.0001 -> 0.5)" in _err(capsys)


def test_purification_under_torchrun_locks_once_per_job(tmp_path):
    """Two gloo ranks: a held output stops both ranks with the one-line error (no rank
    waits for the other at a barrier); a free one is locked by rank 0 only and released."""
    _purif_work(tmp_path)
    out = tmp_path / f"{OUT}.pkl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    cmd += ["purification.py", *_purif_argv(tmp_path, "--device", "cpu")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, REPO, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode != 0
        assert res.stderr.count(f"error: {out} is in use by another run (PID {holder.pid}") == 2
    finally:
        holder.kill()
        holder.wait()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.is_file() and not lock_path(out).exists()
    assert json.loads(out.with_suffix(".json").read_text())["processes"] == 2


# --------------------------------------------------------------------------- train.py and the trainer


def test_trainer_checkpoint_is_keyed_by_its_data(tmp_path):
    import torch.nn as nn

    from utils.data import ImageSet
    from utils.trainer import TrainConfig, train_classifier

    g = torch.Generator().manual_seed(0)
    a = ImageSet(torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(16) % 10)
    b = ImageSet(255 - a.images, a.labels)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.01, precision="fp32", channels_last=False)

    def fit(data):
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
        return train_classifier(model, data, lambda x, g: x, cfg, torch.device("cpu"), checkpoint=tmp_path / "c.pt")

    fit(a)
    assert len(fit(a)) == 1  # same data: resumed (nothing left to do)
    with pytest.raises(UserError, match=r"c\.pt holds work done with other settings \(data: '"):
        fit(b)


def test_train_refuses_an_interrupted_run_with_other_settings(tmp_path, monkeypatch, capsys):
    import train

    common = ["--arch", "resnet18", "--width", "8", "--epochs", "1", "--test_subset", "20", "--run_name", "r"]
    common += ["--poison", "clean", "--work_dir", str(tmp_path)]

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_classifier", killed)
    with pytest.raises(SystemExit):
        train.main([*common, "--subset", "20"])
    with pytest.raises(SystemExit) as e:
        train.main([*common, "--subset", "30"])
    assert e.value.code == 2 and "runs/train/r holds work done with other settings (subset: 20 -> 30)" in _err(capsys)
    with OutputLock(tmp_path / "runs/train/r"):
        with pytest.raises(SystemExit):
            train.main([*common, "--subset", "20"])
        assert "in use by another run" in _err(capsys)
    for bad in (["--run_name", "../../x"], ["--poison", "/abs/x"]):
        with pytest.raises(SystemExit):
            train.main(["--work_dir", str(tmp_path), *bad])
        assert "must be a plain name" in _err(capsys)


# --------------------------------------------------------------------------- poison.py


def test_poison_state_refusal_names_the_keys_and_output_is_locked(tmp_path, capsys):
    import poison

    em = ["--poison", "EM", "--subset", "20", "--width", "8", "--pgd_steps", "1", "--train_steps", "1"]
    em += ["--train_batch", "10", "--batch_size", "10", "--max_rounds", "1", "--work_dir", str(tmp_path)]
    em += ["--no_progress", "--threads", "1"]
    with pytest.raises(SystemExit) as e:
        poison.main([*em, "--stop_after", "1"])
    assert e.value.code == poison.PAUSED_EXIT
    with pytest.raises(SystemExit):
        poison.main([*em, "--eps", "4"])
    msg = _err(capsys)
    assert "EM.work holds work done with other settings (params.eps: 8.0 -> 4.0)" in msg and "--overwrite" in msg
    with OutputLock(tmp_path / "poisoned_data/cifar10/EM.pkl"):
        with pytest.raises(SystemExit):
            poison.main(em)
        assert "EM.pkl is in use by another run" in _err(capsys)
    for bad in ("../x", "/abs/x", ".."):
        with pytest.raises(SystemExit):
            poison.main([*em, "--name", bad])
        assert "--name must be a plain name" in _err(capsys)


# --------------------------------------------------------------------------- attack flow


def test_attack_flow_locks_its_record_folder_and_names_are_names(tmp_path):
    from utils.dataelixir.flow import run_attack_then_defence
    from utils.diffusion.factory import load_diffusion_spec

    # the DDPM is load-checked before the lock is taken: a real (tiny, random) one
    torch.save(load_diffusion_spec("config/ddpm/cpu.yml").build_model().state_dict(), tmp_path / "ddpm.pt")
    argv = ["--yaml_path", "config/badnet/cifar10.yaml", "--work_dir", str(tmp_path), "--diffusion_ckpt", "ddpm.pt"]
    argv += ["--diffusion_config", "config/ddpm/cpu.yml"]
    with OutputLock(tmp_path / "record" / "bn"):
        with pytest.raises(UserError, match=f"record/bn is in use by another run \\(PID {os.getpid()}"):
            run_attack_then_defence("badnet", [*argv, "--save_folder_name", "bn"])
    assert not (tmp_path / "record" / "bn").exists()
    for bad in ("../x", "/abs/x", "a/b"):
        with pytest.raises(UserError, match="--save_folder_name must be a plain name"):
            run_attack_then_defence("badnet", [*argv, "--save_folder_name", bad])
