"""Expected wall time of the demo's steps, measured on the machine that will run them.

``demo.py`` (and ``--plan``) times about a second of each kind of work its steps do — a
diffusion training iteration, a denoising step, a classifier training step and an
evaluation batch, a surrogate's forward+backward — on this device, with the precision the
policy resolves for each (``utils.precision``) and the threads each step will have. A
step's time is then its count of those units (from the recipe's flags) times the
measured cost. No minutes from another CPU enter: a plan made on an AVX2 laptop is that
laptop's.

Crafting a poison is counted in surrogate image-passes (one forward and backward of the
surrogate on one image). EM's count is for all ``max_rounds`` min-min rounds (its crafting
time at the demo's scale, 45.6 min on one AMD EPYC thread, fits the 8 rounds; it stops
earlier once the surrogate fits the poison, so this is an upper bound); the other
model-based poisons' counts follow their flags but skip second-order terms, so they are
marked as rough; model-free poisons take seconds.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from models import build_classifier
from utils.data import NUM_CLASSES
from utils.diffusion.factory import load_diffusion_spec
from utils.poisons import POISONS
from utils.precision import prefer_channels_last, resolve_precision
from utils.runtime import autocast
from utils.trainer import TrainConfig, cross_entropy_step

TEST_IMAGES = 10_000  # train.py evaluates on the whole test set


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per unit of each kind of work, measured here."""

    diffusion_iteration: float  # one training iteration of the CPU-scale UNet at the recipe's batch
    denoise_image_step: float  # one reverse step of one image (CPU-scale UNet)
    victim_train_image: float  # one training image through the victim (victim precision)
    victim_eval_image: float  # one test image through the victim
    surrogate_image_pass: float  # one forward+backward of a width-16 surrogate (surrogate precision)
    device: str
    threads: int

    def describe(self) -> str:
        return (
            f"{self.device}, {self.threads} thread(s): diffusion {1 / self.diffusion_iteration:.2f} it/s, "
            f"denoising {1 / self.denoise_image_step:.0f} img-steps/s, victim {1 / self.victim_train_image:.0f} img/s, "
            f"surrogate {1 / self.surrogate_image_pass:.0f} img/s"
        )


def step_threads(jobs: int) -> int:
    """The threads each demo step runs with: ``OMP_NUM_THREADS`` if set, else the cores
    shared between ``jobs`` steps (what ``utils.demo.pipeline.run_commands`` gives each command)."""
    import os

    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // max(1, jobs)) if jobs > 1 else torch.get_num_threads()


def _seconds_per_call(fn: Callable[[], Any], budget_s: float) -> float:
    fn()  # warm-up (allocations, oneDNN primitive creation)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        took = time.perf_counter() - t0
        if took >= budget_s or calls >= 50:
            return took / calls


def _classifier_costs(width: int, batch: int, device: torch.device, bf16: bool, budget_s: float) -> tuple[float, float]:

    model = build_classifier("resnet18", NUM_CLASSES, width).to(device)
    x = torch.rand(batch, 3, 32, 32, device=device)
    if prefer_channels_last(device):
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # the one training step every classifier training runs (utils/trainer.py)
    step = cross_entropy_step(model, opt, TrainConfig(precision="bf16" if bf16 else "fp32"), device)

    def train_step() -> None:
        step(x, y)

    @torch.no_grad()
    def eval_step() -> None:
        with autocast(device, bf16):
            model(x)

    return _seconds_per_call(train_step, budget_s) / batch, _seconds_per_call(eval_step, budget_s) / batch


def measure_unit_costs(recipe: Any, device: torch.device, threads: int, budget_s: float = 0.6) -> UnitCosts:
    """Time each kind of unit for about ``budget_s`` seconds on ``device`` with ``threads``
    threads (the count each step will run with)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        spec = load_diffusion_spec("config/eclipse/cpu.yml")
        unet = spec.build_model().to(device)
        diffusion = spec.build_diffusion(respacing="")
        bf16 = resolve_precision("auto", device, "diffusion_training").bf16
        batch = recipe.diffusion_batch
        x0 = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
        t = torch.randint(0, recipe.diffusion_max_timestep, (batch,), device=device)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

        def diffusion_step() -> None:
            noise = torch.randn_like(x0)
            with autocast(device, bf16):
                out = unet(diffusion.q_sample(x0, t, noise), diffusion.model_timesteps(t))
            loss = diffusion.training_losses(None, x0, t, noise=noise, model_output=out.float())["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        unet.train()
        diffusion_it = _seconds_per_call(diffusion_step, budget_s)
        unet.eval()
        denoise_bf16 = resolve_precision("auto", device, "purification").bf16
        xb = x0[:64]

        @torch.no_grad()
        def denoise_step() -> None:
            with autocast(device, denoise_bf16):
                unet(xb, diffusion.model_timesteps(t[:64]))

        denoise = _seconds_per_call(denoise_step, budget_s) / len(xb)
        victim_bf16 = resolve_precision("auto", device, "victim").bf16
        v_train, v_eval = _classifier_costs(recipe.width, 128, device, victim_bf16, budget_s)
        s_bf16 = resolve_precision("auto", device, "surrogate").bf16
        same = recipe.width == 16 and s_bf16 == victim_bf16  # the same model in the same precision: timed once
        surrogate = v_train if same else _classifier_costs(16, 128, device, s_bf16, budget_s)[0]
    finally:
        torch.set_num_threads(before)
    return UnitCosts(diffusion_it, denoise, v_train, v_eval, surrogate, str(device), threads)


# --------------------------------------------------------------------------- counting units


def _flags(text: str) -> dict[str, str]:
    words = shlex.split(text)
    return {w[2:]: v for w, v in zip(words, words[1:] + [""]) if w.startswith("--")}


def surrogate_passes(poison: str, flags: str, n: int) -> tuple[float, bool] | None:
    """(surrogate image-passes to craft ``poison`` on ``n`` images with ``flags``, whether
    the count is rough); None for a poison whose cost is not counted (ADP: its purifier)."""
    p: dict[str, Any] = {k: key.default for k, key in POISONS[poison].defaults.items()}
    p.update(_flags(flags))

    def num(k: str) -> float:
        return float(p[k]) if k in p and not callable(p[k]) else 0.0

    if poison == "EM":
        return num("max_rounds") * (num("train_steps") * num("train_batch") + n * num("pgd_steps") + n / 3), False
    if poison == "TAP":
        return num("epochs") * n + num("restarts") * n * num("pgd_steps"), True
    if poison == "SEP":
        return num("epochs") * n + num("checkpoints") * n * num("pgd_steps"), True
    if poison == "EFP":
        return num("epochs") * n * (1 + num("adv_steps")) + num("restarts") * n * num("pgd_steps"), True
    if poison == "REM":
        per_step = num("batch_size") * num("pgd_steps") * num("samples") + num("train_batch") * (1 + num("adv_steps"))
        return num("steps") * per_step, True
    if poison == "ADP":
        return None
    return 0.0, False  # model-free: seconds


def step_minutes(kind: str, recipe: Any, costs: UnitCosts, poison: str = "", flags: str = "") -> float | None:
    """Expected minutes of one demo step of ``kind`` (diffusion, purification, victim, poison)."""
    if kind == "diffusion":
        return recipe.diffusion_iterations * costs.diffusion_iteration / 60
    if kind == "purification":
        return recipe.subset * min(recipe.respace, recipe.t) * costs.denoise_image_step / 60
    if kind == "victim":
        evals = len([e for e in range(1, recipe.epochs + 1) if e % 5 == 0 or e == recipe.epochs])
        # adversarial training (--defense at) adds its PGD steps, each a forward and backward pass
        pgd_steps = int(_flags(flags).get("at_steps", 10)) if "--defense at" in flags else 0
        train_s = recipe.epochs * recipe.subset * costs.victim_train_image * (1 + pgd_steps)
        test_images = getattr(recipe, "test_subset", None) or TEST_IMAGES
        return (train_s + evals * test_images * costs.victim_eval_image) / 60
    if kind == "poison":
        passes = surrogate_passes(poison, flags, recipe.subset)
        if passes is None:
            return None
        return max(passes[0] * costs.surrogate_image_pass / 60, 0.1)
    raise ValueError(f"unknown step kind {kind!r}")


def is_rough(poison: str, flags: str, n: int) -> bool:
    passes = surrogate_passes(poison, flags, n)
    return passes is None or passes[1]
