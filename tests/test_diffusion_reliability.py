"""The diffusion model's training and loading refuse what they cannot use: every config key
declared and checked when the config is read (before anything is written), a resume with
another number of processes, non-finite or non-float checkpoints, a loss going NaN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_eclipse_pipeline import TINY_CFG, _td_args

import train_diffusion
from utils.diffusion.factory import load_diffusion_spec, load_purifier, spec_from_dict
from utils.diffusion.gaussian_diffusion import GaussianDiffusion
from utils.diffusion.training import load_resume_state
from utils.fileio import UserError

REPO = Path(__file__).resolve().parents[1]
RUN = "diff_ckpt/cifar10/test32ps64"


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def _config(tmp_path: Path, base: str, section: str, **changes) -> Path:
    """``base`` with ``changes`` in its ``section``, written to tmp_path/cfg.yml."""
    cfg = yaml.safe_load((REPO / base).read_text())
    cfg[section].update(changes)
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.pt"))}


# --------------------------------------------------------------------------- item 5: config keys


@pytest.mark.parametrize(
    "key, text, want",
    [
        ("use_kl", "false", ("loss_type", "rescaled_mse")),
        ("use_kl", "true", ("loss_type", "rescaled_kl")),
        ("learn_sigma", "false", ("model_var_type", "fixed_large")),
        ("learn_sigma", "no", ("model_var_type", "fixed_large")),
    ],
)
def test_boolean_keys_written_as_text_mean_what_they_say(tmp_path, key, text, want):
    spec = load_diffusion_spec(_config(tmp_path, TINY_CFG, "model", **{key: text}))
    assert spec.diffusion[want[0]] == want[1]
    assert spec.model[key] is (text in ("true", "yes"))


@pytest.mark.parametrize(
    "base, section, changes, key, expected",
    [
        (TINY_CFG, "model", {"dropout": 1.5}, "model.dropout", "must be in [0, 1)"),
        (TINY_CFG, "model", {"num_channels": "32"}, "model.num_channels", "expected an integer"),
        (TINY_CFG, "model", {"num_heads": 0}, "model.num_heads", "must be >= 1"),
        (TINY_CFG, "model", {"num_heads": 3}, "model.num_heads", "must divide the channels"),
        (TINY_CFG, "model", {"image_size": 31}, "model.image_size", "must be 32 or 64"),
        (TINY_CFG, "model", {"num_channels": 48}, "model.num_channels", "multiple of 32"),
        (TINY_CFG, "model", {"attention_resolutions": "12"}, "model.attention_resolutions", "feature-map sizes"),
        (TINY_CFG, "model", {"noise_schedule": "quad"}, "model.noise_schedule", "linear or cosine"),
        (TINY_CFG, "model", {"diffusion_steps": 0}, "model.diffusion_steps", "must be >= 1"),
        (TINY_CFG, "model", {"timestep_respacing": "abc"}, "model.timestep_respacing", "must respace"),
        (TINY_CFG, "model", {"num_heads_upsample": 0}, "model.num_heads_upsample", "-1 (num_heads) or >= 1"),
        (TINY_CFG, "model", {"use_kl": "maybe"}, "model.use_kl", "expected a boolean"),
        ("config/ddpm/cpu.yml", "model", {"ch_mult": [1, 0]}, "model.ch_mult", "positive integers"),
        ("config/ddpm/cpu.yml", "model", {"attn_resolutions": [7]}, "model.attn_resolutions", "feature-map sizes"),
        ("config/ddpm/cpu.yml", "model", {"dropout": -0.1}, "model.dropout", "must be in [0, 1)"),
        ("config/ddpm/cpu.yml", "model", {"in_channels": 1}, "model.in_channels", "must be 3"),
        ("config/ddpm/cpu.yml", "diffusion", {"beta_start": 0}, "diffusion.beta_start", "must be in (0, 1)"),
        ("config/ddpm/cpu.yml", "diffusion", {"model_var_type": "learned"}, "diffusion.model_var_type", "fixed"),
        ("config/ddpm/cpu.yml", "diffusion", {"num_diffusion_timesteps": 2.5}, "diffusion.num_diffusion", "integer"),
    ],
)
def test_bad_config_values_are_one_line_errors_naming_file_and_key(tmp_path, base, section, changes, key, expected):
    path = _config(tmp_path, base, section, **changes)
    with pytest.raises(UserError) as e:
        load_diffusion_spec(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and key in msg and expected in msg, msg


def test_config_sections_and_yaml_exponents():
    with pytest.raises(UserError, match=r"unknown section\(s\) diffusion.*go under model"):
        spec_from_dict({"model": {}, "diffusion": {"diffusion_steps": 10}}, "x.yml")
    with pytest.raises(UserError, match=r"x.yml: 'model:' must be|expected a 'model:' section"):
        spec_from_dict({"model": [1]}, "x.yml")
    # YAML 1.1 reads 1e-4 (no dot) as text; it is the number it spells
    cfg = yaml.safe_load("model: {architecture: ddpm, ch: 32}\ndiffusion: {beta_start: 1e-4, beta_end: 2e-2}")
    assert spec_from_dict(cfg, "x.yml").diffusion["beta_start"] == 1e-4
    for path in [*(REPO / "config/eclipse").glob("*.yml"), *(REPO / "config/ddpm").glob("*.yml")]:
        load_diffusion_spec(path)  # every shipped config is valid


def test_train_diffusion_refuses_a_bad_config_before_writing_anything(tmp_path, capsys, cifar_root):
    bad = _config(tmp_path, TINY_CFG, "model", dropout=1.5)
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as e:
        train_diffusion.main(_td_args(work, 1, ["--config", str(bad)]))
    assert e.value.code == 2
    lines = _err(capsys)
    assert len(lines) == 1 and "model.dropout" in lines[0] and str(bad) in lines[0]
    assert not work.exists()  # no run.json: the corrected command is not refused
    good = _config(tmp_path, TINY_CFG, "model", dropout=0.0)
    train_diffusion.main(_td_args(work, 1, ["--config", str(good)]))
    assert (work / RUN / "ema_0.9999_000001.pt").is_file()


# --------------------------------------------------------------------------- item 7: world size


def test_resume_with_another_process_count_is_refused(tmp_path, capsys, monkeypatch, cifar_root):
    train_diffusion.main(_td_args(tmp_path, 2))
    run = tmp_path / RUN
    before = _snapshot(run)
    with pytest.raises(UserError, match=r"written by 1 training process\(es\), resumed with 2"):
        load_resume_state(run, 0.9999, world=2)
    monkeypatch.setattr(train_diffusion, "init_distributed", lambda device: (0, 2))
    with pytest.raises(SystemExit):
        train_diffusion.main(_td_args(tmp_path, 4))
    lines = _err(capsys)
    assert "resumed with 2" in lines[-1] and "run it without torchrun" in lines[-1]
    assert str(run / "opt000002.pt") in lines[-1]
    assert _snapshot(run) == before
    monkeypatch.undo()
    train_diffusion.main(_td_args(tmp_path, 4))  # the same process count resumes
    assert (run / "ema_0.9999_000004.pt").is_file()
    # a state of two processes resumed by one: refused, saying how to resume it
    state = torch.load(run / "opt000004.pt", weights_only=True)
    state["rng"] = state["rng"] * 2
    torch.save(state, run / "opt000004.pt")
    with pytest.raises(SystemExit):
        train_diffusion.main(_td_args(tmp_path, 6))
    line = _err(capsys)[-1]
    assert "written by 2 training process(es), resumed with 1" in line and "--nproc_per_node=2" in line, line


# --------------------------------------------------------------------------- item 8: non-finite state


def _poison(path: Path, kind: str) -> None:
    state = torch.load(path, weights_only=True)
    if kind == "opt":
        first = next(iter(state["optimizer"]["state"].values()))
        first["exp_avg"].view(-1)[0] = float("nan")
    else:
        next(iter(state.values())).view(-1)[0] = float("inf" if kind == "ema" else "nan")
    torch.save(state, path)


@pytest.mark.parametrize(
    "kind, file", [("model", "model000002.pt"), ("ema", "ema_0.9999_000002.pt"), ("opt", "opt000002.pt")]
)
def test_resume_from_a_non_finite_checkpoint_is_refused(tmp_path, capsys, cifar_root, kind, file):
    train_diffusion.main(_td_args(tmp_path, 2))
    run = tmp_path / RUN
    _poison(run / file, kind)
    before = _snapshot(run)
    with pytest.raises(SystemExit) as e:
        train_diffusion.main(_td_args(tmp_path, 4))
    assert e.value.code == 2
    line = _err(capsys)[-1]
    assert str(run / file) in line and ("NaN" in line or "Inf" in line) and "diverged" in line, line
    assert _snapshot(run) == before


def _losses_going_bad(monkeypatch, at_call: int, how: str) -> None:
    """From call ``at_call`` on, the training loss is NaN (``how="loss"``) or finite with
    NaN gradients (``how="grad"``, so the weights go NaN)."""
    real = GaussianDiffusion.training_losses
    calls = [0]

    def losses(self, *a, **k):
        terms = real(self, *a, **k)
        calls[0] += 1
        if calls[0] >= at_call:
            if how == "loss":
                terms["loss"] = terms["loss"] * float("nan")
            else:  # sqrt'(0) = inf: a finite loss whose gradient is NaN
                terms["loss"] = terms["loss"] + (k["model_output"] * 0).sum().sqrt()
        return terms

    monkeypatch.setattr(GaussianDiffusion, "training_losses", losses)


@pytest.mark.parametrize("how, at_call, what", [("loss", 3, "the loss is nan"), ("grad", 4, "weights hold NaN")])
def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch, cifar_root, how, at_call, what
):
    run = tmp_path / RUN
    _losses_going_bad(monkeypatch, at_call, how)
    with pytest.raises(SystemExit) as e:
        train_diffusion.main(_td_args(tmp_path, 6))
    assert e.value.code == 2
    line = _err(capsys)[-1]
    assert f"diverged at step {at_call}" in line and what in line and "step 2" in line, line
    files = {p.name for p in run.glob("*.pt")}
    assert files == {"model000002.pt", "opt000002.pt", "ema_0.9999_000002.pt"}
    for f in files:
        state = torch.load(run / f, weights_only=True)
        tensors = state["optimizer"]["state"][0].values() if f.startswith("opt") else state.values()
        assert all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
    monkeypatch.undo()
    train_diffusion.main(_td_args(tmp_path, 4))  # resumes from the good step-2 checkpoint
    assert "resuming diffusion training from step 2" in (run / "train.log").read_text()
    assert (run / "ema_0.9999_000004.pt").is_file()


# --------------------------------------------------------------------------- item 9a: non-float weights


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_purifier_refuses_non_float_weights(tmp_path, dtype):
    spec = load_diffusion_spec(TINY_CFG)
    state = {k: v.to(dtype) for k, v in spec.build_model().state_dict().items()}
    ckpt = tmp_path / "ema_0.9999_000005.pt"
    torch.save(state, ckpt)
    with pytest.raises(UserError) as e:
        load_purifier(spec, ckpt, torch.device("cpu"))
    msg = str(e.value)
    first = next(iter(state))
    assert "\n" not in msg and str(ckpt) in msg and first in msg and str(dtype).removeprefix("torch.") in msg, msg
    torch.save({k: v.float() for k, v in state.items()}, ckpt)
    load_purifier(spec, ckpt, torch.device("cpu"))  # the same weights as floats load
