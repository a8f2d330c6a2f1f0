"""ECLIPSE end to end at tiny scale on real CIFAR-10 images: train_diffusion.py,
purification.py and train.py, including resumption and every bad-input path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import purification
import train
import train_diffusion
import utils.diffusion.purify as purify_mod
from utils.data import read_eclipse_pkl, write_eclipse_pkl
from utils.datasets import load_poisoned
from utils.diffusion.factory import load_diffusion_spec
from utils.diffusion.purify import _truncated_process, noise_and_denoise, purify_dataset

TINY_CFG = "config/eclipse/cpu.yml"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_unet(seed=0):
    spec = load_diffusion_spec(TINY_CFG)
    torch.manual_seed(seed)
    model = spec.build_model()
    for p in model.parameters():  # the zero-initialised output layers would make denoising trivial
        p.data.normal_(0, 0.02)
    return spec, model.eval()


def _setup_work(tmp_path, data, sparse_set="tiny", iteration=5):
    write_eclipse_pkl(tmp_path / "poisoned_data" / "cifar10" / "URP.pkl", data)
    spec, model = _random_unet()
    ckpt = tmp_path / "diff_ckpt" / "cifar10" / sparse_set / f"ema_0.9999_{iteration}.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt)
    return ckpt


def _urp_argv(t: int) -> list[str]:
    """purification.py on URP with the tiny config and the 5-iteration checkpoint of _setup_work."""
    argv = ["--poison", "URP", "--config", TINY_CFG, "--sparse_set", "tiny", "--sparse_diff_model", "ema_0.9999_5.pt"]
    return argv + ["--t", str(t), "--batch_size", "8"]


def _err(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- purification core


@pytest.mark.device
def test_respaced_purification_keeps_the_noise_level(device):
    spec, model = _random_unet()
    model.to(device)
    base = spec.build_diffusion()
    proc = _truncated_process(base, 100, 10)
    assert proc.num_timesteps == 10
    assert proc.alphas_cumprod[-1] == pytest.approx(base.alphas_cumprod[99], rel=1e-12)
    calls = []
    x0 = torch.zeros(2, 3, 32, 32, device=device)
    noise_and_denoise(lambda x, t: calls.append(t) or model(x, t), base, x0, 100, respace=10)
    assert len(calls) == 10
    assert calls[0][0].item() == pytest.approx(99 * 1000 / 4000)  # first reverse step: original step 99, rescaled
    _, kept = noise_and_denoise(model, base, x0, 6, keep_last=3)
    assert len(kept) == 3


@pytest.mark.device
def test_purify_dataset_resumes_and_shards(tmp_path, small_train, device):
    spec, model = _random_unet()
    model.to(device)
    base = spec.build_diffusion()
    images = small_train.images[:20]
    kw = dict(batch_size=8, seed=7, precision="fp32", device=device)
    full = purify_dataset(model, base, images, 3, tmp_path / "a", **kw)
    assert full.shape == images.shape and full.dtype == torch.uint8
    (tmp_path / "a" / "part_00001.pt").unlink()  # a batch lost to a crash is redone identically
    assert torch.equal(purify_dataset(model, base, images, 3, tmp_path / "a", **kw), full)
    assert purify_dataset(model, base, images, 3, tmp_path / "b", rank=1, world=2, **kw) is None
    assert sorted(p.name for p in (tmp_path / "b").glob("part_*.pt")) == ["part_00001.pt"]
    assert sorted(p.name for p in (tmp_path / "b" / "done").iterdir()) == ["chunk_00001"]
    assert torch.equal(purify_dataset(model, base, images, 3, tmp_path / "b", rank=0, world=2, **kw), full)


# --------------------------------------------------------------------------- purification.py


def test_purification_cli(tmp_path, small_train, capsys):
    data = small_train.subset(torch.arange(0, 400, 20))  # 20 images, labels in order of the input
    _setup_work(tmp_path, data)
    argv = _urp_argv(t=4) + ["--work_dir", str(tmp_path)]
    purification.main(argv)
    out = tmp_path / "purified_data" / "cifar10" / "tiny" / "4" / "5"
    pure = read_eclipse_pkl(out / "URP-pure.pkl")
    assert torch.equal(pure.labels, data.labels)  # input order is kept
    assert not torch.equal(pure.images, data.images)
    summary = json.loads((out / "URP-pure.json").read_text())
    assert summary["images"] == 20 and summary["reverse_steps"] == 4 and summary["noise_std"] > 0
    assert (out / "URP-pure.png").stat().st_size > 0 and (out / "URP-pure.log").is_file()
    assert not any(p.name.startswith(".") for p in out.iterdir())  # batch parts cleaned up

    before = (out / "URP-pure.pkl").read_bytes()
    with pytest.raises(SystemExit):
        purification.main(argv)
    assert "already exists; pass --overwrite" in _err(capsys)
    assert (out / "URP-pure.pkl").read_bytes() == before
    purification.main(argv + ["--respace", "2", "--overwrite"])
    assert json.loads((out / "URP-pure.json").read_text())["reverse_steps"] == 2


def test_purification_of_the_clean_subset(tmp_path, small_train, capsys):
    """--poison clean --subset N purifies the images train.py --poison clean --subset N trains
    on (what ECLIPSE costs on clean data), records the draw, and refuses --subset elsewhere."""
    _setup_work(tmp_path, small_train.subset(torch.arange(4)))  # the checkpoint (and a URP.pkl)
    argv = ["--poison", "clean", "--subset", "20", "--config", TINY_CFG, "--sparse_set", "tiny"]
    argv += ["--sparse_diff_model", "ema_0.9999_5.pt", "--t", "2", "--batch_size", "8", "--work_dir", str(tmp_path)]
    purification.main(argv)
    out = tmp_path / "purified_data" / "cifar10" / "tiny" / "2" / "5"
    pure = read_eclipse_pkl(out / "clean-pure.pkl")
    clean, _ = load_poisoned(tmp_path, "clean", subset=20)
    assert torch.equal(pure.labels, clean.labels) and len(pure) == 20
    assert not torch.equal(pure.images, clean.images)
    summary = json.loads((out / "clean-pure.json").read_text())
    assert (summary["subset"], summary["subset_seed"], summary["images"]) == (20, 0, 20)
    with pytest.raises(SystemExit):
        purification.main([*argv[:1], "URP", *argv[2:]])
    assert "--subset applies to --poison clean only" in _err(capsys)


def test_killed_purification_resumes(tmp_path, small_train, monkeypatch, capsys):
    data = small_train.subset(torch.arange(24))
    argv = _urp_argv(t=3) + ["--bf16", "false"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    _setup_work(ref_dir, data)
    _setup_work(run_dir, data)
    purification.main(argv + ["--work_dir", str(ref_dir)])

    real, calls = purify_mod.noise_and_denoise, []

    def dies_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(purify_mod, "noise_and_denoise", dies_on_second_batch)
    with pytest.raises(SystemExit) as e:
        purification.main(argv + ["--work_dir", str(run_dir)])
    assert e.value.code == 130
    monkeypatch.setattr(purify_mod, "noise_and_denoise", lambda *a, **k: calls.append(1) or real(*a, **k))
    calls.clear()
    purification.main(argv + ["--work_dir", str(run_dir)])
    assert len(calls) == 2  # only the two unfinished batches were purified again
    rel = "purified_data/cifar10/tiny/3/5/URP-pure.pkl"
    assert (run_dir / rel).read_bytes() == (ref_dir / rel).read_bytes()


def test_purification_bad_inputs(tmp_path, small_train, capsys):
    base = ["--work_dir", str(tmp_path), "--config", TINY_CFG]
    with pytest.raises(SystemExit):
        purification.main(base + ["--poison", "EM"])
    msg = _err(capsys)
    assert "poisoned dataset not found" in msg and "poison.py --poison EM" in msg
    _setup_work(tmp_path, small_train.subset(torch.arange(4)))
    with pytest.raises(SystemExit):
        purification.main(base + ["--poison", "URP", "--sparse_set", "nope"])
    msg = _err(capsys)
    assert "diffusion checkpoint not found" in msg and "train_diffusion.py" in msg
    with pytest.raises(SystemExit):
        purification.main(base + ["--poison", "URP", "--t", "0"])
    assert "--t must be >= 1" in _err(capsys)
    with pytest.raises(SystemExit):
        purification.main(["--config", "nope.yml", "--work_dir", str(tmp_path)])
    assert "'nope.yml' not found" in _err(capsys)
    # a checkpoint of another architecture is named, not a traceback
    ckpt = tmp_path / "diff_ckpt/cifar10/tiny/ema_0.9999_5.pt"
    torch.save({"conv.weight": torch.zeros(1)}, ckpt)
    with pytest.raises(SystemExit):
        purification.main(
            base + ["--poison", "URP", "--sparse_set", "tiny", "--sparse_diff_model", ckpt.name, "--t", "2"]
        )
    assert "does not match the configured model" in _err(capsys)


# --------------------------------------------------------------------------- train_diffusion.py


def _td_args(tmp_path, iterations, extra=()):
    return [
        "--config",
        TINY_CFG,
        "--num_clean",
        "32",
        "--replicas",
        "2",
        "--iterations",
        str(iterations),
        "--batch_size",
        "8",
        "--save_interval",
        "2",
        "--log_interval",
        "1",
        "--work_dir",
        str(tmp_path),
        *extra,
    ]


def test_train_diffusion_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train_diffusion.main(_td_args(straight, 4))
    train_diffusion.main(_td_args(resumed, 2))
    train_diffusion.main(_td_args(resumed, 4))
    run = "diff_ckpt/cifar10/test32ps64"
    a = torch.load(straight / run / "ema_0.9999_000004.pt", weights_only=True)
    b = torch.load(resumed / run / "ema_0.9999_000004.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    files = {p.name for p in (resumed / run).iterdir()}
    # improved-diffusion's names: model%06d.pt, ema_<rate>_%06d.pt, opt%06d.pt
    want = {"ema_0.9999_000002.pt", "ema_0.9999_000004.pt", "model000004.pt", "opt000004.pt", "sparse_set.json"}
    assert want | {"loss.png"} <= files
    assert "model000002.pt" not in files  # only the newest resumption state is kept
    idx = json.loads((resumed / run / "sparse_set.json").read_text())["indices"]
    assert len(idx) == 32 and len(set(idx)) == 32
    steps = [line.split(",")[0] for line in (resumed / run / "progress.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]


def test_train_diffusion_resumes_from_the_old_spelling(tmp_path):
    """A run written with this project's earlier names (model_<step>.pt, ema_<rate>_<step>.pt,
    opt_<step>.pt) resumes exactly; the stale legacy model/opt pair is removed once newer
    improved-diffusion-named ones exist, the legacy EMA snapshot is kept."""
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train_diffusion.main(_td_args(straight, 4))
    train_diffusion.main(_td_args(resumed, 2))
    run = resumed / "diff_ckpt/cifar10/test32ps64"
    for new, old in (
        ("model000002.pt", "model_2.pt"),
        ("ema_0.9999_000002.pt", "ema_0.9999_2.pt"),
        ("opt000002.pt", "opt_2.pt"),
    ):
        (run / new).rename(run / old)
    train_diffusion.main(_td_args(resumed, 4))
    assert "resuming diffusion training from step 2" in (run / "train.log").read_text()
    a = torch.load(straight / "diff_ckpt/cifar10/test32ps64/ema_0.9999_000004.pt", weights_only=True)
    b = torch.load(run / "ema_0.9999_000004.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    files = {p.name for p in run.iterdir()}
    assert {"ema_0.9999_2.pt", "model000004.pt", "opt000004.pt"} <= files
    assert not {"model_2.pt", "opt_2.pt"} & files


def test_purification_loads_either_spelling(tmp_path, small_train):
    """--sparse_diff_model names the checkpoint in either spelling; the output folder is the
    iteration number (ECLIPSE's published ema_0.9999_250000.pt is both spellings at once)."""
    data = small_train.subset(torch.arange(4))
    ckpt = _setup_work(tmp_path, data, iteration=5)  # ema_0.9999_5.pt, the old spelling
    argv = ["--poison", "URP", "--config", TINY_CFG, "--sparse_set", "tiny", "--t", "2", "--work_dir", str(tmp_path)]
    purification.main(argv + ["--sparse_diff_model", "ema_0.9999_000005.pt"])
    assert (tmp_path / "purified_data/cifar10/tiny/2/5/URP-pure.pkl").is_file()
    ckpt.rename(ckpt.with_name("ema_0.9999_000005.pt"))
    purification.main(argv + ["--sparse_diff_model", "ema_0.9999_5.pt", "--overwrite"])
    assert purification.checkpoint_iteration("ema_0.9999_250000.pt") == "250000"
    assert purification.checkpoint_iteration("ema_0.999_003000.pt") == "3000"


def test_train_diffusion_refuses_mixed_runs(tmp_path, capsys):
    train_diffusion.main(_td_args(tmp_path, 1))
    with pytest.raises(SystemExit):
        train_diffusion.main(_td_args(tmp_path, 2, ["--lr", "0.5"]))
    assert "other settings (training.lr: 0.0001 -> 0.5)" in _err(capsys)
    with pytest.raises(SystemExit):
        train_diffusion.main(_td_args(tmp_path, 2, ["--num_clean", "20000"]))
    assert "exceeds the 10000 images" in _err(capsys)
    with pytest.raises(SystemExit):
        train_diffusion.main(_td_args(tmp_path, 0))
    assert "--iterations must be >= 1" in _err(capsys)


def test_train_diffusion_ddp_two_processes(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "train_diffusion.py",
        *_td_args(tmp_path, 2, ["--config", "config/ddpm/cpu.yml"]),
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "diff_ckpt/cifar10/test32ps64"
    assert (run / "ema_0.9999_000002.pt").is_file()
    state = torch.load(run / "opt000002.pt", weights_only=True)
    assert len(state["rng"]) == 2  # both ranks' RNG states, for an exact resume
    assert "world size 2" in (run / "train.log").read_text()


# --------------------------------------------------------------------------- train.py


def test_train_cli(tmp_path, small_train, capsys):
    _setup_work(tmp_path, small_train.subset(torch.arange(0, 400, 4)))
    common = [
        "--arch",
        "resnet18",
        "--width",
        "8",
        "--epochs",
        "2",
        "--test_every",
        "1",
        "--test_subset",
        "100",
        "--work_dir",
        str(tmp_path),
    ]
    train.main(["--poison", "URP", *common])
    train.main(["--poison", "URP", "--defense", "grayscale", *common])
    train.main(["--poison", "clean", "--subset", "100", *common])
    res = json.loads((tmp_path / "runs/train/URP-none-resnet18-w8-s0/result.json").read_text())
    # results.csv: the reference's csv.writer row exactly -- 8 columns, no header, accuracy unrounded
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(len(r.split(",")) == 8 for r in rows)
    assert rows[0] == f"False,resnet18,URP,test2000ps8000,100,0.4,0.05,{res['final_test_acc']!r}"
    assert res["final_test_acc"] == 100 * round(res["final_test_acc"]) / 100  # 100 * correct / 100 images
    # results_extra.csv: the same row, then our columns, with a header
    extra = (tmp_path / "results_extra.csv").read_text().splitlines()
    assert extra[0] == "pure,arch,poison,sparse_set,t,p,std,acc,defense,width,epochs,n_train,seed,run"
    assert len(extra) == 4 and extra[2].split(",")[8] == "grayscale" and extra[1].startswith(rows[0] + ",none,8,2,100")
    assert res["n_train"] == 100 and len(res["history"]) == 2 and 0 <= res["final_test_acc"] <= 100
    # the reference's DataLoader keeps the last partial batch, and its same_seeds makes cuDNN deterministic
    assert res["train_config"]["drop_last"] is False and res["settings"]["deterministic"] is True
    assert "test_acc" in res["history"][0]
    assert (tmp_path / "runs/train/URP-none-resnet18-w8-s0/curves.png").is_file()
    train.main(["--poison", "URP", *common])  # finished: reported, not re-run
    assert "is finished" in capsys.readouterr().out
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 3


def test_results_csv_of_the_earlier_layout_is_split(tmp_path):
    old = (
        "pure,arch,poison,sparse_set,t,p,std,acc,defense,width,epochs,n_train,seed,run\r\n"
        "True,resnet18,EM,test2000ps8000,100,0.4,0.05,82.80,none,64,80,50000,0,EM-pure-resnet18-s0\r\n"
    )
    (tmp_path / "results.csv").write_text(old)
    args = train.parse_args(["--poison", "URP", "--run_name", "r"])
    train._append_results(tmp_path, tmp_path / "runs/train/r", args, 100 * 8280 / 10000, 50000)
    assert (tmp_path / "results.csv").read_bytes() == (
        b"True,resnet18,EM,test2000ps8000,100,0.4,0.05,82.80\r\nFalse,resnet18,URP,test2000ps8000,100,0.4,0.05,82.8\r\n"
    )
    extra = (tmp_path / "results_extra.csv").read_text().splitlines()
    assert extra[:2] == old.splitlines() and extra[2].endswith(",82.8,none,64,80,50000,0,r")


def test_train_flags_drop_last_and_deterministic(monkeypatch):
    a = train.parse_args(["--poison", "clean"])
    assert a.drop_last is False and a.deterministic is True  # the reference's DataLoader and same_seeds
    a = train.parse_args(["--poison", "clean", "--drop_last", "true", "--deterministic", "false"])
    assert a.drop_last is True and a.deterministic is False
    from utils.runtime import set_deterministic

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    set_deterministic(True)
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    set_deterministic(False)
    assert torch.backends.cudnn.deterministic is False and torch.backends.cudnn.benchmark is True


@pytest.mark.parametrize("drop_last, steps", [(True, 2), (False, 3)])
def test_trainer_keeps_or_drops_the_last_partial_batch(drop_last, steps):
    from utils.data import ImageSet
    from utils.trainer import TrainConfig, train_classifier

    data = ImageSet(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10) % 10)
    sizes = []

    def augment(x, g):
        sizes.append(len(x))
        return x

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    cfg = TrainConfig(epochs=1, batch_size=4, precision="fp32", channels_last=False, drop_last=drop_last)
    train_classifier(model, data, augment, cfg, torch.device("cpu"), log=lambda m: None)
    assert sizes == [4, 4, 2][:steps]  # 10 images in batches of 4: 2 full steps, then 2 images


def test_train_bad_inputs(tmp_path, capsys):
    cases = [
        (["--poison", "EM", "--pure"], "purified dataset not found"),
        (["--poison", "EM", "--pure", "--defense", "jpeg"], "alternative defences"),
        (["--poison", "EM"], "poison.py --poison EM"),
        (["--poison", "clean", "--p", "1.5"], "--p must be in [0, 1]"),
        (["--poison", "clean", "--epochs", "0"], "--epochs must be >= 1"),
    ]
    # the hint names the EMA checkpoint that exists for --iter (any rate, either spelling)
    ckpt = tmp_path / "diff_ckpt/cifar10/test2000ps8000/ema_0.999_3000.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    with pytest.raises(SystemExit):
        train.main(["--poison", "EM", "--pure", "--iter", "3000", "--work_dir", str(tmp_path)])
    assert "--sparse_diff_model ema_0.999_3000.pt" in _err(capsys)
    with pytest.raises(SystemExit):
        train.main(["--poison", "EM", "--pure", "--iter", "5000", "--work_dir", str(tmp_path)])
    assert "--sparse_diff_model ema_0.9999_005000.pt" in _err(capsys)
    for argv, message in cases:
        with pytest.raises(SystemExit):
            train.main(argv + ["--work_dir", str(tmp_path)])
        assert message in _err(capsys)


def test_paper_config_trains_with_improved_diffusions_cifar10_dropout():
    """ECLIPSE publishes no training dropout; improved-diffusion's CIFAR-10 recipe uses 0.3."""
    spec = load_diffusion_spec("config/eclipse/cifar10.yml")
    assert spec.model["dropout"] == 0.3
    rates = {m.p for m in spec.build_model().modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.3}
