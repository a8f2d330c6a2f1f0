"""ECLIPSE's corruption compensation (``train.py --pure``) and the trainer's mid-run resume,
checked by what they do: rates and noise levels measured over many images, exact replays
of the random draws, and bit-identical weights after an interruption."""

from __future__ import annotations

import json
import math

import pytest
import torch

import train
import utils.trainer as trainer
from models import build_classifier
from utils.augment import compensation_augment, gaussian_noise, grayscale, no_augment, standard_augment, to_float
from utils.data import ImageSet, write_eclipse_pkl
from utils.paths import purified_file
from utils.trainer import TrainConfig, train_classifier


def _colour_images(n: int, seed: int = 0) -> torch.Tensor:
    # uniform noise: no image has three equal channels unless it was made grey
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _is_grey(x: torch.Tensor) -> torch.Tensor:
    return ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).flatten(1).all(1)


# the centre 24x24 never sees the zero padding: a crop moves it by at most 4 pixels
CENTRE = (slice(None), slice(None), slice(4, 28), slice(4, 28))


@pytest.mark.parametrize("p", [0.0, 0.4, 1.0])
def test_grayscale_is_applied_at_rate_p(p):
    n = 4000
    out = compensation_augment(p=p, std=0.0)(_colour_images(n), torch.Generator().manual_seed(1))
    rate = _is_grey(out).float().mean().item()
    tol = 4 * math.sqrt(p * (1 - p) / n)  # four binomial standard deviations (0 at p = 0 or 1)
    assert abs(rate - p) <= tol, f"grey fraction {rate:.4f}, expected {p} +- {tol:.4f}"


def test_compensation_is_crop_flip_then_grayscale_then_noise():
    """The draws in order: crop + flip, the grayscale pick, then the noise; replayed exactly."""
    x = _colour_images(64, seed=2)
    for std in (0.0, 0.05):
        out = compensation_augment(p=0.4, std=std)(x, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        y = standard_augment(x, g)
        pick = (torch.rand(len(x), generator=g) < 0.4)[:, None, None, None]
        y = torch.where(pick, grayscale(y), y)
        if std:
            y = gaussian_noise(y, g, std)
        assert torch.equal(out, y)
        # with std 0 nothing is re-quantised: the crop/flip/grey pixels come through unchanged
        assert std or torch.equal(_is_grey(out), pick.flatten())


@pytest.mark.parametrize("quantize,mean", [("truncate", -0.5), ("round", 0.0)])
def test_noise_std_on_mid_grey_images(quantize, mean):
    std, n = 0.05, 200
    x = torch.full((n, 3, 32, 32), 128, dtype=torch.uint8)  # grey: grayscale leaves it as is
    out = compensation_augment(p=0.4, std=std, quantize=quantize)(x, torch.Generator().manual_seed(7))
    resid = out[CENTRE].double() - 128
    # N(0, (255 std)^2) plus uniform quantisation error (variance 1/12); truncation also shifts by -1/2
    expect = math.sqrt((255 * std) ** 2 + 1 / 12)
    se_std = expect / math.sqrt(2 * resid.numel())
    assert abs(resid.std().item() - expect) < 6 * se_std + 0.01, f"residual std {resid.std():.3f} vs {expect:.3f}"
    assert abs(resid.mean().item() - mean) < 6 * expect / math.sqrt(resid.numel())


def test_requantisation_truncates_or_rounds():
    x = _colour_images(32, seed=3)
    noisy = {}
    for mode in ("truncate", "round"):
        g = torch.Generator().manual_seed(9)
        before = (to_float(x) + torch.randn(x.shape, generator=g) * 0.05).clamp(0, 1) * 255
        noisy[mode] = gaussian_noise(x, torch.Generator().manual_seed(9), 0.05, mode)
        assert noisy[mode].dtype == torch.uint8
        want = before.floor() if mode == "truncate" else before.round()
        assert torch.equal(noisy[mode], want.to(torch.uint8))
    diff = noisy["round"].int() - noisy["truncate"].int()
    assert diff.min() >= 0 and diff.max() == 1 and 0.3 < diff.float().mean() < 0.7
    with pytest.raises(ValueError, match="truncate"):
        gaussian_noise(x, torch.Generator(), 0.05, "floor")


def test_compensation_without_crop_flip_is_grayscale_then_noise():
    """``train_augment none`` (the backdoor attacks' CPU overlay): the same draws with no crop
    or flip before them, so every pixel that is not greyed or noised is the input's."""
    x = _colour_images(64, seed=6)
    out = compensation_augment(0.4, 0.05, "truncate", no_augment)(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    pick = (torch.rand(len(x), generator=g) < 0.4)[:, None, None, None]
    assert torch.equal(out, gaussian_noise(torch.where(pick, grayscale(x), x), g, 0.05))
    plain = compensation_augment(0.0, 0.0, "truncate", no_augment)(x, torch.Generator().manual_seed(3))
    assert torch.equal(plain, x)


@pytest.mark.parametrize("augment", ["crop_flip", "none"])
def test_train_pure_end_to_end(tmp_path, small_train, monkeypatch, augment: str):
    """``train.py --pure`` trains on the purified pkl with compensation of the given p/std/quantize,
    over crop + flip or (``--train_augment none``) nothing; only the latter is stored, so the
    earlier runs' settings stay as they were."""
    data = small_train.subset(torch.arange(0, 400, 4))
    pkl = purified_file(tmp_path, "tiny", 2, 5, "URP")
    pkl.parent.mkdir(parents=True)
    write_eclipse_pkl(pkl, data)
    made = []

    def spy(*args):
        made.append(args)
        return compensation_augment(*args)

    monkeypatch.setattr(train, "compensation_augment", spy)
    argv = ["--pure", "--poison", "URP", "--sparse_set", "tiny", "--t", "2", "--iter", "5"]
    argv += ["--p", "0.3", "--std", "0.02", "--quantize", "round", "--arch", "resnet18", "--width", "8"]
    argv += ["--epochs", "1", "--test_subset", "100", "--work_dir", str(tmp_path), "--train_augment", augment]
    train.main(argv)
    assert made == [(0.3, 0.02, "round", standard_augment if augment == "crop_flip" else no_augment)]
    name = "URP-pure-resnet18-w8-s0" if augment == "crop_flip" else "URP-pure-noaug-resnet18-w8-s0"
    res = json.loads((tmp_path / f"runs/train/{name}/result.json").read_text())
    assert res["settings"].get("train_augment") == (None if augment == "crop_flip" else "none")
    assert res["train_source"] == str(pkl) and res["n_train"] == 100 and len(res["history"]) == 1
    row = (tmp_path / "results.csv").read_text().splitlines()
    assert row == [f"True,resnet18,URP,tiny,2,0.3,0.02,{res['final_test_acc']!r}"]


def test_interrupted_training_resumes_bit_identically(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    data = ImageSet(_colour_images(100, seed=4), torch.randint(0, 10, (100,), generator=g))
    cfg = TrainConfig(epochs=2, batch_size=32, schedule="cosine", test_every=1, precision="fp32", drop_last=False)
    device = torch.device("cpu")

    def run(ckpt):
        torch.manual_seed(0)
        model = build_classifier("resnet18", 10, 16)
        hist = train_classifier(model, data, standard_augment, cfg, device, {"t": data}, ckpt, log=lambda s: None)
        return model, hist

    straight, hist_a = run(tmp_path / "a.pt")

    real_save = trainer.atomic_torch_save

    def save_then_die(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt  # killed right after epoch 1's checkpoint

    monkeypatch.setattr(trainer, "atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt")
    monkeypatch.setattr(trainer, "atomic_torch_save", real_save)
    state = torch.load(tmp_path / "b.pt", weights_only=False)
    assert state["epoch"] == 1
    # a checkpoint written while TrainConfig still had ``normalize`` and ``extra`` resumes too
    state["config"] = {**state["config"], "normalize": True, "extra": {}}
    torch.save(state, tmp_path / "b.pt")
    resumed, hist_b = run(tmp_path / "b.pt")

    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in hist_a] == [
        {k: v for k, v in h.items() if k not in timing} for h in hist_b
    ]


def test_two_forwards_per_step_equal_one_with_bn_momentum_019():
    """ECLIPSE's train.py runs the network twice per step (accuracy, then loss): BatchNorm's
    running statistics are updated twice with the same batch statistics, which one update
    with momentum 1 - 0.9^2 = 0.19 reproduces (``bn_updates=2``)."""
    import copy

    from models import build_classifier
    from utils.trainer import set_bn_updates

    torch.manual_seed(0)
    ref = build_classifier("resnet18", 10, 4).train()
    ours = copy.deepcopy(ref)
    x = torch.rand(16, 3, 32, 32)
    for _ in range(3):  # three steps (no weight update: only the statistics matter here)
        ref(x)  # outputs = net(inputs)
        ref(x)  # loss, _ = standard_loss(args, net, inputs, labels)
    set_bn_updates(ours, 2)
    for _ in range(3):
        ours(x)
    bns = [(a, b) for a, b in zip(ref.modules(), ours.modules()) if isinstance(a, torch.nn.BatchNorm2d)]
    assert bns and all(b.momentum == pytest.approx(0.19) for _, b in bns)
    for a, b in bns:
        torch.testing.assert_close(b.running_mean, a.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.running_var, a.running_var, rtol=1e-5, atol=1e-6)
    # one forward per step (PyTorch's default momentum) gives other statistics
    single = copy.deepcopy(ref)
    set_bn_updates(single, 1)
    assert all(m.momentum == pytest.approx(0.1) for m in single.modules() if isinstance(m, torch.nn.BatchNorm2d))
    import train

    assert train.parse_args(["--poison", "EM"]).bn_updates == 2  # the reference's behaviour by default
