"""Speed options side by side: torch.compile, channels_last, bf16 weights and fused
attention (SDPA) against the current default, for the four diffusion models (purification
and diffusion training) and ResNet18 victim training.

Each option is timed against its baseline in INTERLEAVED repetitions (A, B, A, B, ...) and
the medians compared, so that background load on a shared machine affects both alike.
torch.compile's warm-up (compile time) is timed separately and excluded from the rates.
For each option the outputs are compared with the baseline's (max abs difference) and,
for purification, the purified uint8 images.

    OMP_NUM_THREADS=1 python bench/bench_speedups.py [--reps 5] [--only paper_unet,cpu_unet,...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from bench_purification import random_model
from common import record
from torch import nn

import models.ddpm
import models.unet
from models import build_classifier
from utils.augment import to_uint8
from utils.data import NUM_CLASSES, load_cifar10
from utils.diffusion.factory import create_diffusion, load_diffusion_spec
from utils.diffusion.purify import from_model_range, noise_and_denoise, to_model_range
from utils.runtime import autocast, compiled

DEVICE = torch.device("cpu")
# name -> (config, inference batch, training batch)
DIFFUSION = {
    "paper_unet": ("config/eclipse/cifar10.yml", 16, 4),
    "cpu_unet": ("config/eclipse/cpu.yml", 128, 32),
    "ddpm_paper": ("config/ddpm/cifar10.yml", 16, 4),
    "ddpm_cpu": ("config/ddpm/cpu.yml", 128, 32),
}
T_STAR, RESPACE = 100, 2  # purification: noise to t*=100, 2 respaced reverse steps


def bf16_weights(model: nn.Module) -> nn.Module:
    """``model`` (for inference under bf16 autocast) with bf16 weights, except its
    normalisation layers, which keep float32 parameters: autocast then skips casting every
    weight on each forward, and the normalisation statistics stay float32."""
    norms = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)
    for m in model.modules():
        if not isinstance(m, norms):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16)
    return model


@contextlib.contextmanager
def sdpa_attention() -> Iterator[None]:
    """The models' attention as one fused kernel instead of the reference formula."""
    saved = models.unet.qkv_attention, models.ddpm.attention
    models.unet.qkv_attention, models.ddpm.attention = models.unet.qkv_attention_sdpa, models.ddpm.attention_sdpa
    try:
        yield
    finally:
        models.unet.qkv_attention, models.ddpm.attention = saved


def interleaved(a: Callable[[], None], b: Callable[[], None], reps: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b`` over ``reps`` alternating runs."""
    ta, tb = [], []
    for _ in range(reps):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(ta)[reps // 2], sorted(tb)[reps // 2]


class Variant:
    """One configuration: a model (prepared) and the context its calls run in."""

    def __init__(self, model: torch.nn.Module, *, sdpa: bool, channels_last: bool = False):
        self.model, self.sdpa = model, sdpa
        self.layout = torch.channels_last if channels_last else torch.contiguous_format

    def ctx(self):
        return sdpa_attention() if self.sdpa else contextlib.nullcontext()

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.layout)


OPTIONS = ("sdpa", "channels_last", "bf16_weights", "compile")


def diffusion_variants(base: torch.nn.Module, train: bool, options: set[str]) -> dict[str, Variant]:
    """The baseline (eager, einsum attention, contiguous, fp32 weights, bf16 autocast) and
    each option on its own (bf16 weights: inference only)."""
    fresh = lambda: copy.deepcopy(base).train(train)  # noqa: E731
    make = {
        "sdpa": lambda: Variant(fresh(), sdpa=True),
        "channels_last": lambda: Variant(fresh().to(memory_format=torch.channels_last), sdpa=False, channels_last=True),
        "bf16_weights": lambda: Variant(bf16_weights(fresh()), sdpa=False),
        "compile": lambda: Variant(compiled(fresh()), sdpa=False),
    }
    wanted = [o for o in OPTIONS if o in options and not (train and o == "bf16_weights")]
    return {"baseline": Variant(fresh(), sdpa=False), **{o: make[o]() for o in wanted}}


def bench_diffusion(name: str, reps: int, options: set[str], rows: list[dict]) -> None:
    cfg, batch, train_batch = DIFFUSION[name]
    spec = load_diffusion_spec(cfg)
    base = random_model(spec)
    diffusion = create_diffusion(spec)
    images = to_model_range(load_cifar10("train").images[:batch])

    def purify(v: Variant) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        with v.ctx():
            x, _ = noise_and_denoise(
                v.model, diffusion, v.input(images), T_STAR, respace=RESPACE, generator=g, bf16=True
            )
        return x

    def forward(v: Variant) -> torch.Tensor:
        torch.manual_seed(1)
        x, t = torch.randn(batch, 3, 32, 32), torch.full((batch,), 10)
        with v.ctx(), torch.no_grad(), autocast(DEVICE, True):
            return v.model(v.input(x), diffusion.model_timesteps(t)).float()

    variants = diffusion_variants(base, False, options)
    ref = forward(variants["baseline"])
    torch.manual_seed(1)
    x32 = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        out_fp32 = base.eval()(x32, diffusion.model_timesteps(torch.full((batch,), 10))).float()
    ref_img = to_uint8(from_model_range(purify(variants["baseline"]))).int()
    for opt, v in variants.items():
        if opt == "baseline":
            continue
        t0 = time.perf_counter()
        out = forward(v)  # compiles, for torch.compile
        warm = time.perf_counter() - t0
        img = to_uint8(from_model_range(purify(v))).int()
        ta, tb = interleaved(lambda: purify(variants["baseline"]), lambda v=v: purify(v), reps)
        row = {
            "model": name,
            "task": "purification",
            "batch": batch,
            "option": opt,
            "baseline_image_steps_per_s": batch * RESPACE / ta,
            "option_image_steps_per_s": batch * RESPACE / tb,
            "speedup": ta / tb,
            "first_call_s": warm,
            "max_abs_diff_eps_vs_bf16_baseline": (out - ref).abs().max().item(),
            "max_abs_diff_eps_bf16_baseline_vs_fp32": (ref - out_fp32).abs().max().item(),
            "max_abs_diff_eps_vs_fp32": (out - out_fp32).abs().max().item(),
            "purified_uint8_max_diff": (img - ref_img).abs().max().item(),
            "purified_uint8_pct_differing": 100 * (img != ref_img).float().mean().item(),
            "loadavg": os.getloadavg(),
        }
        rows.append(row)
        show(row)
    bench_diffusion_training(name, base, diffusion, train_batch, reps, options, rows)


def bench_diffusion_training(name, base, diffusion, batch, reps, options, rows) -> None:
    images = to_model_range(load_cifar10("train").images[:batch])

    def make_step(v: Variant) -> Callable[[], float]:
        model = v.model
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator().manual_seed(0)

        def step() -> float:
            t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g)
            noise = torch.randn(images.shape, generator=g)
            with v.ctx():
                with autocast(DEVICE, True):
                    out = model(v.input(diffusion.q_sample(images, t, noise)), diffusion.model_timesteps(t))
                loss = diffusion.training_losses(None, images, t, noise=noise, model_output=out.float())["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        return step

    for opt in [o for o in OPTIONS if o in options and o != "bf16_weights"]:
        # a fresh baseline each time: the first losses compare equal weights on equal batches
        pair = diffusion_variants(base, True, {opt})
        a, b = make_step(pair["baseline"]), make_step(pair[opt])
        rows.append(compare_training(name, "diffusion training", opt, batch, a, b, reps))


def compare_training(model, task, option, batch, baseline, step, reps) -> dict:
    """Interleaved timing of two training-step functions (each returns its loss); the
    option's first call (compilation, for torch.compile) is timed on its own."""
    loss0 = baseline()
    t0 = time.perf_counter()
    loss = step()
    warm = time.perf_counter() - t0
    ta, tb = interleaved(baseline, step, reps)
    row = {
        "model": model,
        "task": task,
        "batch": batch,
        "option": option,
        "baseline_images_per_s": batch / ta,
        "option_images_per_s": batch / tb,
        "speedup": ta / tb,
        "first_call_s": warm,
        "first_loss_diff": abs(loss - loss0),
        "loadavg": os.getloadavg(),
    }
    show(row)
    return row


def bench_victim(width: int, reps: int, rows: list[dict]) -> None:
    """ResNet18 training steps as utils/trainer.py runs them (bf16 autocast, channels_last)."""
    from utils.trainer import prepare_batch

    data = load_cifar10("train").images[:128]
    labels = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    base = build_classifier("resnet18", NUM_CLASSES, width).to(memory_format=torch.channels_last)
    x = prepare_batch(data, DEVICE, True)

    def make_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step() -> float:
            with autocast(DEVICE, True):
                loss = F.cross_entropy(model(x).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        return step

    a, b = make_step(copy.deepcopy(base)), make_step(compiled(copy.deepcopy(base)))
    rows.append(compare_training(f"resnet18 w{width}", "victim training", "compile", 128, a, b, reps))


def show(row: dict) -> None:
    rate = "image_steps_per_s" if row["task"] == "purification" else "images_per_s"
    diff = (
        f"max|d eps| {row['max_abs_diff_eps_vs_bf16_baseline']:.2e} (bf16 vs fp32: "
        f"{row['max_abs_diff_eps_bf16_baseline_vs_fp32']:.2e}), uint8 max {row['purified_uint8_max_diff']}"
        if row["task"] == "purification"
        else f"|d loss| {row['first_loss_diff']:.2e}"
    )
    print(
        f"{row['model']:12s} {row['task']:18s} {row['option']:13s} {row[f'baseline_{rate}']:8.1f} -> "
        f"{row[f'option_{rate}']:8.1f} {rate} x{row['speedup']:.2f}  first call {row['first_call_s']:.1f}s  {diff}"
        f"  load {row['loadavg'][0]:.2f}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions per side (median)")
    ap.add_argument(
        "--only", default="", help="comma-separated subset of " + ",".join([*DIFFUSION, "victim16", "victim64"])
    )
    ap.add_argument("--options", default=",".join(OPTIONS), help="comma-separated subset of " + ",".join(OPTIONS))
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    options = set(filter(None, args.options.split(",")))
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()}", flush=True)
    rows: list[dict] = []
    for name in DIFFUSION:
        if not only or name in only:
            bench_diffusion(name, args.reps, options, rows)
    for width in (16, 64):
        if (not only or f"victim{width}" in only) and "compile" in options:
            bench_victim(width, args.reps, rows)
    tag = "_".join(sorted(only)) + "_" + "_".join(sorted(options)) if only or options != set(OPTIONS) else ""
    record("speedups" + ("_" + tag if tag else ""), rows)


if __name__ == "__main__":
    main()
