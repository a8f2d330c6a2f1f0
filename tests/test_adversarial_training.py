"""``train.py --defense at``: PGD adversarial training (Madry et al.; ECLIPSE's Table 1 "AT"
row, after Tao et al.), checked against PGD written here from its definition, and end to
end at tiny scale with the other defences' stored settings unchanged."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from utils.fileio import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

RUNTIME_ONLY = {"device", "overwrite", "work_dir", "data_root", "download", "bf16", "iss_recipe"}
AT_KEYS = {"at_eps", "at_steps", "at_step_size"}


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm: the attack must use the running statistics (eval mode), as Tao et al.'s AT does
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


def _reference_pgd(model: nn.Module, x, y, eps: float, alpha: float, steps: int, g: torch.Generator):
    """Madry et al.'s L∞ PGD: uniform random start in the ε-ball (kept in [0, 1]), then
    ``steps`` ascents x ← Π(x + α·sign(∇ₓ CE)), Π = clip to [x₀ − ε, x₀ + ε] ∩ [0, 1]."""
    e, a = eps / 255, alpha / 255
    adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * e).clamp(0, 1)
    model.eval()
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
        adv = adv.detach() + a * grad.sign()
        adv = torch.maximum(torch.minimum(adv, x + e), x - e).clamp(0, 1)
    return adv.detach()


@pytest.mark.parametrize(("eps", "alpha", "steps"), [(8.0, 2.0, 10), (4.0, 0.8, 3), (16.0, 20.0, 2)])
def test_at_pgd_matches_the_definition(eps: float, alpha: float, steps: int):
    model = _tiny_model()
    g0 = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 4, 4, generator=g0)
    x[0] = 0.0  # the [0, 1] clip binds at both ends
    x[1] = 1.0
    y = torch.randint(0, 3, (6,), generator=g0)
    args = train.parse_args(["--defense", "at", "--at_eps", str(eps), "--at_step_size", str(alpha)])
    args.at_steps = steps
    model.train()
    ours = train.adversarial_perturb(model, args, bf16=False)(x, y, torch.Generator().manual_seed(7))
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored
    ref = _reference_pgd(model, x, y, eps, alpha, steps, torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert (ours - x).abs().max() <= eps / 255 + 1e-6 and ours.min() >= 0 and ours.max() <= 1
    # the adversary raises the loss it was found for
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(ours), y) > F.cross_entropy(model(x), y)


def test_at_defaults_and_ranges():
    a = train.parse_args(["--defense", "at"])
    assert (a.at_eps, a.at_steps, a.at_step_size) == (8.0, 10, 2.0)
    assert a.run_name == "EM-at-resnet18-s0"
    for bad in (["--at_eps", "0"], ["--at_steps", "0"], ["--at_step_size", "-1"]):
        with pytest.raises(UserError, match=bad[0]):
            train.parse_args(["--defense", "at", *bad])


COMMON = ["--poison", "clean", "--subset", "100", "--arch", "resnet18", "--width", "8", "--epochs", "1"]


def _tail(tmp_path) -> list[str]:
    return ["--test_subset", "100", "--precision", "fp32", "--work_dir", str(tmp_path)]


def test_train_at_end_to_end(tmp_path, monkeypatch):
    calls = []
    real = train.pgd_linf

    def spy(model, x, y, eps, step, steps, g, bf16=False, **kw):
        calls.append((eps, step, steps, x.shape[0]))
        return real(model, x, y, eps, step, steps, g, bf16, **kw)

    monkeypatch.setattr(train, "pgd_linf", spy)
    argv = [*COMMON, "--defense", "at", "--at_eps", "4", "--at_steps", "2", "--at_step_size", "1.5"]
    train.main([*argv, "--batch_size", "50", *_tail(tmp_path)])
    assert calls == [(4.0, 1.5, 2, 50), (4.0, 1.5, 2, 50)]  # every training batch, nothing else
    res = json.loads((tmp_path / "runs/train/clean-at-resnet18-w8-s0-n100/result.json").read_text())
    s = res["settings"]
    assert s["defense"] == "at" and (s["at_eps"], s["at_steps"], s["at_step_size"]) == (4.0, 2, 1.5)
    assert len(res["history"]) == 1
    extra = (tmp_path / "results_extra.csv").read_text().splitlines()
    assert extra[1].split(",")[8] == "at"


@pytest.mark.parametrize("defense", ["none", "jpeg"])
def test_other_defences_store_no_at_settings(tmp_path, monkeypatch, defense: str):
    monkeypatch.setattr(train, "pgd_linf", None)  # never called
    train.main([*COMMON, "--defense", defense, *_tail(tmp_path)])
    res = json.loads((tmp_path / f"runs/train/clean-{defense}-resnet18-w8-s0-n100/result.json").read_text())
    defence_keys = {k for keys in train.DEFENSE_KEYS.values() for k in keys}  # each stored only with its defence
    # "dataset" is stored only for other datasets than CIFAR-10, "train_augment" only when it is
    # not crop + flip, so the earlier runs' settings stay as they were
    unstored = {"dataset", "train_augment"}
    expected = (set(train.KEYS) - RUNTIME_ONLY - defence_keys - unstored) | {"precision", "channels_last"}
    assert set(res["settings"]) == expected
    assert not AT_KEYS & set(res["settings"])
