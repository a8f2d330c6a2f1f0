"""attack/<name>.py end to end at tiny scale on real CIFAR-10 images: the attack, the
backdoored model, DataElixir's candidates, identification, both stages and the outputs;
then resumption and the bad-input paths of the YAML configuration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY_ATTACK, attack_argv

from utils.dataelixir.flow import run_attack_then_defence
from utils.diffusion.factory import load_diffusion_spec
from utils.fileio import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = "diff_ckpt/cifar10/tiny/ema_0.999_1.pt"
# a tiny run: 200 training images, 1 epoch of a width-4 PreActResNet18, a random CPU-scale
# DDPM, 2 rounds of noise to step 20 and 4 respaced reverse steps keeping the last 2
TINY = {
    **TINY_ATTACK,
    "diffusion_config": "config/ddpm/cpu.yml",
    "diffusion_ckpt": CKPT,
    "steps_T": 20,
    "purify_respace": 4,
    "rounds_n": 2,
    "last_steps_m": 2,
    "threshold_tau": 1,
    "purify_batch_size": 100,
}


def _argv(work, name="run", **over):
    return attack_argv(work, name, {**TINY, **over})


@pytest.fixture(scope="module")
def work(tmp_path_factory, cifar_root):
    w = tmp_path_factory.mktemp("attack")
    spec = load_diffusion_spec(os.path.join(REPO, "config/ddpm/cpu.yml"))
    torch.manual_seed(0)
    model = spec.build_model()
    ckpt = w / CKPT
    ckpt.parent.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt)
    return w


@pytest.fixture(scope="module")
def badnet_run(work):
    """The real script, in a subprocess, from the repository root."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, "attack/badnet.py", *_argv(work)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return work / "record" / "run"


def test_badnet_end_to_end_writes_every_output(badnet_run):
    rec = badnet_run
    for f in (
        "config.yaml",
        "run.log",
        "poison_indices.json",
        "backdoored_model.pt",
        "stage1_model.pt",
        "stage2_model.pt",
        "target_detection.json",
        "decisions.csv",
        "purified_dataset.pt",
        "purified_examples.png",
        "metrics.json",
        "backdoored_curves.png",
    ):
        assert (rec / f).is_file(), f
    m = json.loads((rec / "metrics.json").read_text())
    assert m["n_train"] == 200 and m["n_poisoned"] == 40  # round(0.2 * 200), from non-target classes
    for key in ("BA", "ASR", "RA"):
        assert 0 <= m["attack_metrics"][key] <= 100 and 0 <= m["defended_metrics"][key] <= 100
    assert m["candidates_per_sample"] == 1 + 2 * 2
    rates = m["candidate_label_rates"]
    assert all(len(v) == 5 for v in rates.values())
    # originals: the poisoned samples carry their dataset label, which is what the model learnt or not
    assert rates["poisoned_true_label"][0] + rates["poisoned_dataset_label"][0] <= 1
    assert set(m["decisions"]) == {"kept", "relabelled", "suspicious"} and sum(m["decisions"].values()) == 200
    assert m["TPR"] is not None and 0 <= m["TPR"] <= 1 and 0 <= m["FPR"] <= 1
    idx = json.loads((rec / "poison_indices.json").read_text())["indices"]
    assert len(idx) == 40
    data = torch.load(rec / "purified_dataset.pt", weights_only=True)
    assert data["images"].shape == (200, 3, 32, 32) and data["images"].dtype == torch.uint8
    rows = (rec / "decisions.csv").read_text().splitlines()
    assert len(rows) == 201
    # the flow ran every phase, in the paper's order
    from utils.dataelixir.record import PHASES

    assert list(json.loads((rec / "phases.json").read_text())) == list(PHASES)


def test_rerun_resumes_every_phase(badnet_run, work):
    before = json.loads((badnet_run / "metrics.json").read_text())
    again = run_attack_then_defence("badnet", _argv(work))
    assert again["TPR"] == before["TPR"] and again["defended_metrics"] == before["defended_metrics"]
    log = (badnet_run / "run.log").read_text()
    for phase in ("attack", "backdoor_training", "candidates", "identification", "stage1", "stage2"):
        assert f"phase {phase}: done earlier" in log


def _outputs(rec):
    """What a finished record holds that must not depend on where runs stopped: metrics.json
    without the timings (and the folder's name), the three models' weights, the candidates
    and the identification."""
    metrics = json.loads((rec / "metrics.json").read_text())
    for key in ("timings_s", "total_s", "save_folder_name"):
        metrics.pop(key)
    out = {"metrics": metrics}
    for name in ("backdoored", "stage1", "stage2"):
        out.update({f"{name}.{k}": v for k, v in torch.load(rec / f"{name}_model.pt", weights_only=True).items()})
    out.update({f"ident.{k}": v for k, v in torch.load(rec / "identification.pt", weights_only=True).items()})
    for name in ("candidates/candidates.u8", "candidates/preds.i16"):
        out[name] = (rec / name).read_bytes()
    return out


def test_stopping_at_every_phase_boundary_then_resuming_gives_the_uninterrupted_bytes(work):
    """One run stopped after each phase in turn (--stop_after with every choice, each run
    resuming the one before), then finished, against one uninterrupted run: each phase ran in
    a process where every earlier phase was loaded, not computed, and the outputs are equal.
    Smaller than TINY (100 images, one round of two steps) and on one thread, to keep it short."""
    from utils.options import FIXED_OPTIONS

    small = {"subset": 100, "rounds_n": 1, "purify_respace": 2}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = run_attack_then_defence("badnet", _argv(work, name="whole", **small))
        for phase in FIXED_OPTIONS["stop_after"].choices:
            stopped = run_attack_then_defence("badnet", [*_argv(work, name="chain", **small), "--stop_after", phase])
            assert stopped == {}
        assert run_attack_then_defence("badnet", _argv(work, name="chain", **small))["TPR"] == whole["TPR"]
    finally:
        torch.set_num_threads(threads)
    a, b = _outputs(work / "record" / "whole"), _outputs(work / "record" / "chain")
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, key


def test_a_record_of_the_older_bf16_keys_resumes_in_its_precisions(badnet_run, work):
    """A record written before --precision (``bf16: true``, ``amp: false``) resumes instead of
    being refused, and keeps the precisions it ran with (its log says so)."""
    import yaml

    old = work / "record" / "older"
    shutil.copytree(badnet_run, old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    for key in ("precision", "precisions"):
        cfg.pop(key)
    cfg.update(bf16=True, amp=False)
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    (old / "run.log").unlink()
    again = run_attack_then_defence("badnet", _argv(work, name="older"))
    assert again["TPR"] == json.loads((badnet_run / "metrics.json").read_text())["TPR"]
    log = (old / "run.log").read_text()
    assert "phase candidates: done earlier" in log
    assert "precision (ddpm_rounds): bf16 — kept from the run being resumed" in log  # the old bf16: true
    assert "precision (backdoor_training): fp32" in log  # the old amp: false


def test_torchrun_shards_the_candidates_and_matches_one_process(badnet_run, work):
    """Two gloo ranks: rank 0 runs the flow, rank 1 joins it to build every other chunk of
    the candidates; the store is the one-process run's, byte for byte; then a resumed run
    tells rank 1 there is nothing to build, and a held record stops both ranks with the
    same one-line error."""
    from utils.run_state import OutputLock, lock_path

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29542"]
    cmd += ["attack/badnet.py", *_argv(work, name="ddp", purify_batch_size=50)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = work / "record" / "ddp"
    # 200 images in chunks of 50: rank 1 built chunks 1 and 3 into the store rank 0 made;
    # one process rebuilding the candidates from the same record writes the same bytes
    assert "[rank 1]" not in res.stdout  # nothing resumed on rank 1
    one = work / "record" / "one"
    shutil.copytree(rec, one)
    shutil.rmtree(one / "candidates")
    run_attack_then_defence("badnet", _argv(work, name="one", purify_batch_size=50))
    for name in ("candidates.u8", "preds.i16"):
        assert (rec / "candidates" / name).read_bytes() == (one / "candidates" / name).read_bytes(), name
    assert not lock_path(rec).exists()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "phase candidates: done earlier" in (rec / "run.log").read_text()
    with OutputLock(rec):
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert res.stderr.count(f"error: {rec} is in use by another run (PID {os.getpid()}") == 2


def test_other_configuration_in_the_same_folder_is_refused(badnet_run, work):
    with pytest.raises(UserError, match="other settings.*pratio"):
        run_attack_then_defence("badnet", _argv(work, pratio=0.3))


def test_yaml_path_resolves_from_attack_folder(badnet_run, work):
    """The original README's `cd attack; python badnet.py --yaml_path ../config/...` form."""
    argv = _argv(work)
    argv[1] = "../config/badnet/cifar10.yaml"
    res = subprocess.run(
        [sys.executable, "badnet.py", *argv], cwd=os.path.join(REPO, "attack"), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pratoi", "0.1"], "unknown option --pratoi; valid keys:"),
        (["--pratio", "abc"], "pratio"),
        (["--epochs", "1.5"], "epochs"),
        (["--attack_label_trans", "one2one"], "attack_label_trans"),
        (["--yaml_path", "config/nope.yaml"], "nope.yaml"),
        (["--purify_respace", "1"], "purify_respace"),
        (["--purify_dense_tail", "true", "--purify_respace", "2"], "purify_dense_tail needs purify_respace (2)"),
    ],
)
def test_bad_options_give_one_line_errors(work, extra, message):
    res = subprocess.run(
        [sys.executable, "attack/badnet.py", *_argv(work, name="bad"), *extra], cwd=REPO, capture_output=True, text=True
    )
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_key_in_yaml_names_the_file(work, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pratio: 0.1\ntrigger_size: 3\n")
    with pytest.raises(UserError, match=r"unknown key 'trigger_size' in .*bad.yaml; valid keys:"):
        run_attack_then_defence("badnet", ["--yaml_path", str(bad), "--work_dir", str(work)])


def test_missing_diffusion_checkpoint_says_how_to_make_one(work):
    argv = _argv(work, name="nockpt", diffusion_ckpt="diff_ckpt/cifar10/none/ema_0.999_5.pt", epochs=1)
    with pytest.raises(UserError, match="diffusion checkpoint not found.*train_diffusion.py"):
        run_attack_then_defence("badnet", argv)
    assert not (work / "record" / "nockpt").exists()  # refused before any work or output


def test_record_written_before_a_key_existed_resumes_at_its_default(tmp_path):
    from utils.dataelixir.record import open_record
    from utils.options import dump_yaml

    rec = tmp_path / "old"
    rec.mkdir()
    (rec / "config.yaml").write_text(dump_yaml({"attack": "badnet", "epochs": 3}))
    _, resumed = open_record(rec, {"attack": "badnet", "epochs": 3, "new_key": False}, False, {"new_key": False})
    assert resumed
    with pytest.raises(UserError, match="new_key: False -> True"):
        open_record(rec, {"attack": "badnet", "epochs": 3, "new_key": True}, False, {"new_key": False})


def test_stop_after_trains_the_backdoored_model_without_a_ddpm_then_keep_label_measures(work, tmp_path):
    """--stop_after backdoor_training needs no diffusion model; bench/ddpm_keep_label.py then
    measures one round's keep-label rate on that record, reproducibly per seed."""
    argv = _argv(work, name="stop", diffusion_ckpt="diff_ckpt/cifar10/none/ema_0.999_5.pt")
    assert run_attack_then_defence("badnet", [*argv, "--stop_after", "backdoor_training"]) == {}
    rec = work / "record" / "stop"
    phases = json.loads((rec / "phases.json").read_text())
    assert set(phases) == {"attack", "backdoor_training"} and (rec / "backdoored_model.pt").is_file()
    assert not (rec / "candidates").exists()
    with pytest.raises(UserError, match="--stop_after: must be attack, backdoor_training, .* got .nowhere."):
        run_attack_then_defence("badnet", [*argv, "--stop_after", "nowhere"])

    sys.path.insert(0, os.path.join(REPO, "bench"))
    import ddpm_keep_label as kl

    assert kl.keep_rates(torch.tensor([[1, 2], [3, 3]]), torch.tensor([1, 3])) == [1.0, 0.5]
    ckpt = f"config/ddpm/cpu.yml:{work / CKPT}"
    out = tmp_path / "kl"
    common = ["--record", str(rec), "--ckpt", ckpt, "--images", "20", "--device", "cpu"]
    kl.main([*common, "--out", str(out)])
    (row,) = json.loads((out / "keep_label.json").read_text())["rows"]
    kl.main([*common, "--out", str(tmp_path / "again")])  # reproducible per seed
    assert (
        json.loads((tmp_path / "again" / "keep_label.json").read_text())["rows"][0]["keep_per_step"]
        == (row["keep_per_step"])
    )
    kl.main([*common, "--ckpt", ckpt, "--out", str(out)])  # a checkpoint measured before is kept, not redone
    result = json.loads((out / "keep_label.json").read_text())
    assert result["rows"] == [row] and len(row["keep_per_step"]) == TINY["last_steps_m"]
    assert result["images"] == 20 and result["steps_T"] == TINY["steps_T"]
    assert (out / "keep_label.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "keep_label.csv").read_text().count("\n") == 2
    with pytest.raises(SystemExit, match="keep_label.json holds work done with other settings .seed: 0 -> 1"):
        kl.main([*common, "--seed", "1", "--out", str(out)])
    kl.main([*common, "--seed", "1", "--out", str(out), "--overwrite"])
    assert json.loads((out / "keep_label.json").read_text())["seed"] == 1
    # --respace measures another step count on the same model: all steps_T of them with 0
    kl.main([*common, "--respace", "0", "--out", str(tmp_path / "dense")])
    dense = json.loads((tmp_path / "dense" / "keep_label.json").read_text())
    assert dense["respace"] is None and len(dense["rows"][0]["keep_per_step"]) == TINY["last_steps_m"]
    with pytest.raises(SystemExit, match="last_steps_m=2 exceeds the 1 reverse steps of purify_respace=1"):
        kl.main([*common, "--respace", "1", "--out", str(tmp_path / "one")])
    with pytest.raises(SystemExit, match="purify_respace must be null or in 1..steps_T .20., got 21"):
        kl.main([*common, "--respace", "21", "--out", str(tmp_path / "many")])
    # --dense_tail: the kept samples at the full chain's last steps; refused where it does not fit
    kl.main([*common, "--respace", "4", "--dense_tail", "true", "--out", str(tmp_path / "tail")])
    tail = json.loads((tmp_path / "tail" / "keep_label.json").read_text())
    assert tail["dense_tail"] is True and len(tail["rows"][0]["keep_per_step"]) == TINY["last_steps_m"]
    assert "dense_tail" not in result  # the default's folder keeps its settings as they were
    with pytest.raises(SystemExit, match="purify_dense_tail needs purify_respace"):
        kl.main([*common, "--respace", "2", "--dense_tail", "true", "--out", str(tmp_path / "tail2")])
    with pytest.raises(SystemExit, match="config.yaml not found: run the attack with --stop_after"):
        kl.main(["--record", str(tmp_path), "--ckpt", ckpt, "--out", str(out)])


def test_dataelixir_table_runs_what_is_missing_and_tables_every_record(badnet_run, work, tmp_path):
    """bench/dataelixir_table.py: each attack's command with the overlays, a real tiny run
    through the attack script, the finished one skipped, and the table read back from
    metrics.json."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import dataelixir_table as dt

    steps = {s.key: s for s in dt.build_commands(["sig", "ssba", "badnet"], 2, "o.yaml", work, py="py")}
    assert steps["sig_s1"].cmd == [
        "py", "attack/sig.py", "--yaml_path", "config/sig/cifar10.yaml", "--overlay", "o.yaml",
        "--overlay", "config/sig/cpu.yaml", "--random_seed", "1", "--work_dir", str(work),
        "--save_folder_name", "sig_s1",
    ]  # fmt: skip
    assert "config/ssba/cpu.yaml" in steps["ssba_s0"].cmd and "config/badnet/cpu.yaml" not in steps["badnet_s0"].cmd
    (two,) = dt.build_commands(["badnet"], 1, "a.yaml, b.yaml", work, py="py")  # several overlays, in order
    assert two.cmd[4:8] == ["--overlay", "a.yaml", "--overlay", "b.yaml"] and "--precision" not in two.cmd
    (bf16,) = dt.build_commands(["badnet"], 1, "o.yaml", work, py="py", precision="bf16")
    assert bf16.cmd[-2:] == ["--precision", "bf16"]
    with pytest.raises(SystemExit, match="--attacks: unknown attack.*'nope'.*choose from badnet"):
        dt.main(["--attacks", "nope", "--work_dir", str(tmp_path)])

    overlay = tmp_path / "tiny.yaml"
    overlay.write_text("".join(f"{k}: {v}\n" for k, v in TINY.items()))
    shutil.copytree(work / "diff_ckpt", tmp_path / "w" / "diff_ckpt")
    argv = ["--attacks", "badnet", "--jobs", "1", "--overlay", str(overlay), "--work_dir", str(tmp_path / "w")]
    dt.main(argv)
    (row,) = json.loads((tmp_path / "w" / "dataelixir_table.json").read_text())["rows"]
    metrics = json.loads((tmp_path / "w" / "record" / "badnet_s0" / "metrics.json").read_text())
    assert row["attack"] == "badnet" and row["seed"] == 0 and row["ASR_after"] == metrics["defended_metrics"]["ASR"]
    assert row["TPR"] == metrics["TPR"] and len(row["clean_own_label"].split(" / ")) == 1 + TINY["rounds_n"]
    assert row["precision"] == "fp32"  # every computation as the record stores it
    kept_trigger = row["poisoned_poisoned_label"].split(" / ")  # original, then each round's last kept step
    assert kept_trigger[0] == f"{100 * metrics['candidate_label_rates']['poisoned_dataset_label'][0]:.0f}"
    assert len(kept_trigger) == 1 + TINY["rounds_n"]
    assert (tmp_path / "w" / "dataelixir_table.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "w" / "dataelixir_table.md").read_text()
    assert md.count("\n| badnet | 0 |") == 1
    mtime = (tmp_path / "w" / "record" / "badnet_s0" / "metrics.json").stat().st_mtime_ns
    dt.main(argv)  # finished: nothing re-runs
    assert (tmp_path / "w" / "record" / "badnet_s0" / "metrics.json").stat().st_mtime_ns == mtime
    damaged = tmp_path / "w" / "record" / "x" / "metrics.json"
    damaged.parent.mkdir()
    damaged.write_text("{")
    with pytest.raises(SystemExit, match=r"x/metrics.json is damaged .*; re-run that attack with --overwrite"):
        dt.main([*argv, "--table_only"])
    damaged.write_text("{}")
    (damaged.parent / "config.yaml").write_text("rounds_n: 2\n")
    with pytest.raises(SystemExit, match=r"x/metrics.json: not a finished attack record .*KeyError"):
        dt.main([*argv, "--table_only"])


def test_dataelixir_table_stops_its_attacks_on_sigterm(tmp_path, monkeypatch, capsys):
    """bench/dataelixir_table.py: SIGTERM while the attacks run interrupts them as Ctrl-C does
    (run_commands stops the running steps), then one line and exit 130, not a traceback; its
    own SIGTERM handling ends with it."""
    import signal
    import time

    sys.path.insert(0, os.path.join(REPO, "bench"))
    import dataelixir_table as dt

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts this
        pytest.fail("SIGTERM did not interrupt the run")

    monkeypatch.setattr(dt, "run_commands", terminated)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        dt.main(["--attacks", "badnet", "--work_dir", str(tmp_path / "w")])
    assert stopped.value.code == 130 and "interrupted; finished work is saved" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before
