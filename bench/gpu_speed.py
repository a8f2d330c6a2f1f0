"""bench/gpu_check.py's speed part (part 3) and the scales of the whole check: each workload
timed in each variant (precision, attention) with the peak GPU memory, as its script runs it.

gpu_check.py sets ``PROGRESS=off`` before importing this module (no progress lines inside the
timed loops); the project's modules are imported where a workload needs them, so a broken one
fails only that workload.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_report import CheckFailed, Report, fmt_value, need_device, one_line

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ scales


@dataclass(frozen=True)
class Scale:
    """Models, batches and repetitions of the speed part."""

    purify_config: str
    purify_batch: int
    ddpm_config: str
    ddpm_batch: int
    train_config: str
    train_batch: int
    victim_width: int
    victim_batch: int
    warmup: int  # untimed calls first (allocator, cuDNN/oneDNN primitive creation)
    repeats: int  # timed calls; the median is reported
    train_steps: int  # optimisation steps per timed call (victim, diffusion training)
    tests: tuple[str, ...]  # what pytest is given (always with -m device)
    timeout_s: int  # per subprocess


FULL = Scale(
    purify_config="config/eclipse/cifar10.yml",  # the paper's 52.5 M-parameter UNet
    purify_batch=256,  # purification.py's default
    ddpm_config="config/ddpm/cifar10.yml",  # Ho et al.'s 35.7 M-parameter DDPM
    ddpm_batch=1024,  # DataElixir's purify_batch_size
    train_config="config/eclipse/cifar10.yml",
    train_batch=128,  # improved-diffusion's batch
    victim_width=64,
    victim_batch=128,
    warmup=1,
    repeats=3,
    train_steps=10,
    tests=("tests",),
    timeout_s=150,  # a CUDA start-up takes seconds; a hang must not eat the 8 minutes
)
# the dry run: CPU-scale models, batches of a few images, one timed call, and only the two
# fixture forwards among the device tests (the others take seconds to minutes on a busy CPU)
TINY = Scale(
    purify_config="config/eclipse/cpu.yml",
    purify_batch=4,
    ddpm_config="config/ddpm/cpu.yml",
    ddpm_batch=4,
    train_config="config/eclipse/cpu.yml",
    train_batch=8,
    victim_width=16,  # width 16 keeps channels_last on the CPU (utils.runtime.channels_last_safe)
    victim_batch=16,
    warmup=1,
    repeats=1,
    train_steps=2,
    tests=(
        "tests/test_diffusion_fixtures.py::test_tiny_unet_forward",
        "tests/test_diffusion_fixtures.py::test_tiny_ddpm_forward",
    ),
    timeout_s=120,
)

PURIFY_STEPS = 3  # reverse steps per timed call: the per-step rate is what scales
DDPM_STEPS_T, DDPM_RESPACE = 150, 3  # DataElixir's noise level, 3 reverse steps timed


# ------------------------------------------------------------------------------ timing helpers


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_seconds(fn: Callable[[], Any], dev: torch.device, warmup: int, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls
    (synchronised, so queued GPU work is counted)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def attention(kind: str) -> Iterator[None]:
    """The models' attention formula for the duration: ``einsum`` (the reference formulas,
    what the models use) or ``sdpa`` (their fused ``scaled_dot_product_attention`` variants,
    equal up to rounding: tests/test_unet_attention.py). The models look them up at call time."""
    from models import ddpm, unet

    saved = unet.qkv_attention, ddpm.attention
    if kind == "sdpa":
        unet.qkv_attention, ddpm.attention = unet.qkv_attention_sdpa, ddpm.attention_sdpa
    try:
        yield
    finally:
        unet.qkv_attention, ddpm.attention = saved


@contextlib.contextmanager
def cudnn_mode(mode: str) -> Iterator[None]:
    """cuDNN as the script being measured sets it: ``deterministic`` (train.py's default
    ``--deterministic true``), ``benchmark`` (the DataElixir flow autotunes), ``default``
    (torch's: purification.py, train_diffusion.py). Only CUDA runs read these flags."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    if mode != "default":
        torch.backends.cudnn.deterministic = mode == "deterministic"
        torch.backends.cudnn.benchmark = mode == "benchmark"
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


# ------------------------------------------------------------------------------ 3. speed


@dataclass(frozen=True)
class Variant:
    precision: str  # fp32 | bf16
    attention: str | None  # einsum | sdpa; None: the model has no attention

    @property
    def label(self) -> str:
        return self.precision + (f" {self.attention}" if self.attention else "")


DIFFUSION_VARIANTS = [Variant(p, a) for a in ("einsum", "sdpa") for p in ("fp32", "bf16")]
CLASSIFIER_VARIANTS = [Variant("fp32", None), Variant("bf16", None)]


class Speed:
    """Times each workload in each variant, appending to ``report.measurements``."""

    def __init__(self, args: argparse.Namespace, dev: torch.device, scale: Scale, report: Report, t_start: float):
        from utils.precision import native_bf16

        self.args, self.dev, self.scale, self.report, self.t_start = args, dev, scale, report, t_start
        self.native_bf16, self.bf16_where = native_bf16(dev)
        self.skipped: list[str] = []
        self.errors: list[str] = []

    def measure(
        self,
        workload: str,
        computation: str,
        model: str,
        batch: int,
        unit: str,
        variants: list[Variant],
        per_call: Callable[[Variant], tuple[Callable[[], Any], float]],
        cudnn: str = "default",
    ) -> None:
        """``per_call(variant)`` -> (the timed function, the work it does per call);
        figure = work / median seconds. The policy's choice is the variant with the
        precision ``--precision auto`` resolves for ``computation`` and the models' own
        attention (einsum)."""
        from utils.precision import resolve_precision

        policy = resolve_precision("auto", self.dev, computation)
        for v in variants:
            row: dict[str, Any] = {
                "workload": workload,
                "computation": computation,
                "model": model,
                "batch": batch,
                "variant": v.label,
                "precision": v.precision,
                "attention": v.attention,
                "unit": unit,
                "value": None,
                "peak_mib": None,
                "reference": v.precision == "fp32" and v.attention in (None, "einsum"),
                "policy": v.precision == policy.name and v.attention in (None, "einsum"),
                "policy_reason": policy.line(computation),
                "cudnn": cudnn,
                "note": None,
            }
            self.report.measurements.append(row)
            if v.precision == "bf16" and not self.native_bf16:
                # emulated bf16 runs 25-125x slower: it would only burn the time budget
                row["note"] = self.bf16_where
                continue
            if time.perf_counter() - self.t_start > self.args.budget_s:
                row["note"] = f"time budget of {self.args.budget_s:.0f} s spent"
                self.skipped.append(f"{workload} {v.label}")
                continue
            if self.dev.type == "cuda":
                torch.cuda.synchronize(self.dev)
                torch.cuda.reset_peak_memory_stats(self.dev)
            try:
                with attention(v.attention or "einsum"), cudnn_mode(cudnn):
                    fn, work = per_call(v)
                    seconds = median_seconds(fn, self.dev, self.scale.warmup, self.scale.repeats)
            except Exception as e:  # e.g. out of memory in one variant: the others are still measured
                row["note"] = "failed: " + one_line(e, 200)
                self.errors.append(f"{workload} {v.label}: {one_line(e, 200)}")
                free_memory(self.dev)
                continue
            row["value"] = work / seconds
            if self.dev.type == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated(self.dev) / 2**20

    # -------------------------------------------------------------- workloads

    def purification(self) -> None:
        from utils.diffusion.factory import load_diffusion_spec
        from utils.diffusion.purify import noise_and_denoise

        s, dev = self.scale, self.dev
        spec = load_diffusion_spec(REPO / s.purify_config)
        torch.manual_seed(0)
        model = spec.build_model()
        for p in model.parameters():  # as bench_precision.py: a zero-initialised output layer is no UNet
            p.data.normal_(0, 0.02)
        model.to(dev).eval()
        base = spec.build_diffusion(respacing="")
        x = torch.rand(s.purify_batch, 3, 32, 32, device=dev) * 2 - 1
        g = torch.Generator(device=dev).manual_seed(0)

        def per_call(v: Variant) -> tuple[Callable[[], Any], float]:
            return (
                lambda: noise_and_denoise(model, base, x, PURIFY_STEPS, generator=g, bf16=v.precision == "bf16"),
                s.purify_batch * PURIFY_STEPS,
            )

        self.measure(
            "purification",
            "purification",
            f"ECLIPSE UNet ({s.purify_config})",
            s.purify_batch,
            "image-steps/s",
            DIFFUSION_VARIANTS,
            per_call,
        )

    def dataelixir(self) -> None:
        from utils.dataelixir.defence import build_chunk
        from utils.diffusion.factory import load_diffusion_spec

        s, dev = self.scale, self.dev
        spec = load_diffusion_spec(REPO / s.ddpm_config)
        torch.manual_seed(0)
        model = spec.build_model().to(dev).eval()  # random weights: speed only
        base = spec.build_diffusion(respacing="")
        x = torch.randint(0, 256, (s.ddpm_batch, 3, 32, 32), dtype=torch.uint8, device=dev)
        g = torch.Generator(device=dev).manual_seed(0)

        def per_call(v: Variant) -> tuple[Callable[[], Any], float]:
            def call() -> None:
                build_chunk(
                    model,
                    base,
                    x,
                    steps_T=DDPM_STEPS_T,
                    rounds_n=1,
                    last_steps_m=1,
                    respace=DDPM_RESPACE,
                    noise_offset=0,
                    generator=g,
                    bf16=v.precision == "bf16",
                )

            return call, s.ddpm_batch * DDPM_RESPACE

        self.measure(
            "dataelixir_candidates",
            "ddpm_rounds",
            f"DDPM ({s.ddpm_config})",
            s.ddpm_batch,
            "image-steps/s",
            DIFFUSION_VARIANTS,
            per_call,
            cudnn="benchmark",  # utils/dataelixir/flow.py turns autotuning on
        )

    def diffusion_training(self) -> None:
        from utils.diffusion.factory import load_diffusion_spec
        from utils.runtime import autocast

        s, dev = self.scale, self.dev
        spec = load_diffusion_spec(REPO / s.train_config)
        torch.manual_seed(0)
        model = spec.build_model().to(dev).train()
        diffusion = spec.build_diffusion(respacing="")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        params = list(model.parameters())
        ema = [p.detach().clone() for p in params]
        x0 = torch.rand(s.train_batch, 3, 32, 32, device=dev) * 2 - 1

        def per_call(v: Variant) -> tuple[Callable[[], Any], float]:
            bf16 = v.precision == "bf16"

            def iterations() -> None:
                # one iteration of utils/diffusion/training.py: forward, hybrid loss, AdamW, EMA
                for _ in range(s.train_steps):
                    t = torch.randint(0, diffusion.num_timesteps, (s.train_batch,), device=dev)
                    noise = torch.randn_like(x0)
                    with autocast(dev, bf16):
                        out = model(diffusion.q_sample(x0, t, noise), diffusion.model_timesteps(t))
                    terms = diffusion.training_losses(None, x0, t, noise=noise, model_output=out.float())
                    opt.zero_grad(set_to_none=True)
                    terms["loss"].mean().backward()
                    opt.step()
                    with torch.no_grad():
                        for e, p in zip(ema, params):
                            e.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)

            return iterations, s.train_steps

        self.measure(
            "diffusion_training",
            "diffusion_training",
            f"ECLIPSE UNet ({s.train_config})",
            s.train_batch,
            "iterations/s",
            DIFFUSION_VARIANTS,
            per_call,
        )

    def victim(self) -> None:
        from models import build_classifier
        from utils.augment import compensation_augment
        from utils.data import NUM_CLASSES
        from utils.precision import prefer_channels_last
        from utils.runtime import to_channels_last
        from utils.trainer import TrainConfig, cross_entropy_step, prepare_batch

        s, dev = self.scale, self.dev
        torch.manual_seed(0)
        model = build_classifier("resnet18", NUM_CLASSES, s.victim_width)
        channels_last = prefer_channels_last(dev)  # as train.py's default
        if channels_last:
            to_channels_last(model, dev)
        else:
            model.to(dev)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        n = 4 * s.victim_batch
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=dev)
        labels = torch.randint(0, 10, (n,), device=dev)
        augment = compensation_augment(0.4, 0.05)  # train.py --pure's augmentation, on the device
        g = torch.Generator(device=dev).manual_seed(0)

        def per_call(v: Variant) -> tuple[Callable[[], Any], float]:
            step = cross_entropy_step(model, opt, TrainConfig(precision=v.precision), dev)

            def steps() -> None:
                for i in range(s.train_steps):
                    j = (i % 4) * s.victim_batch
                    x = prepare_batch(augment(images[j : j + s.victim_batch], g), dev, channels_last)
                    step(x, labels[j : j + s.victim_batch])

            return steps, s.train_steps * s.victim_batch

        self.measure(
            "victim_training",
            "victim",
            f"ResNet18 width {s.victim_width}" + (", channels_last" if channels_last else ""),
            s.victim_batch,
            "images/s",
            CLASSIFIER_VARIANTS,
            per_call,
            cudnn="deterministic",  # train.py --deterministic true (its default)
        )


def part_speed(args: argparse.Namespace, dev: torch.device, scale: Scale, report: Report, t_start: float) -> str:
    need_device(dev)
    speed = Speed(args, dev, scale, report, t_start)
    errors = speed.errors
    for workload in (speed.purification, speed.dataelixir, speed.diffusion_training, speed.victim):
        try:
            workload()
        except Exception as e:  # an OOM in one workload leaves the others to measure
            errors.append(f"{workload.__name__}: {one_line(e)}")
        finally:
            free_memory(dev)
    if errors:
        raise CheckFailed("; ".join(errors))
    if speed.skipped:
        raise CheckFailed(f"--budget_s {args.budget_s:.0f} spent; not measured: {', '.join(speed.skipped)}")
    rows = [m for m in report.measurements if m["policy"] and m["value"]]
    return "; ".join(f"{m['workload']} {fmt_value(m['value'])} {m['unit']} ({m['variant']})" for m in rows)
