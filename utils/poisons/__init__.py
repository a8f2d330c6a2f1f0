"""Clean-label availability poisons, one module each, and the registry ``POISONS``.

Each module exposes ``craft(ctx: CraftContext) -> CraftResult``; ``POISONS[name]`` holds
the poison's norm, its defaults (the papers' settings, see RESEARCH_NOTES §2 and the
README), and a recommended CPU-scale setting. ``OPTIONS`` declares every poison-specific
option once (type, lower bound, help); a poison accepts exactly the options in its
``defaults``. A default may be a function of the other resolved options (e.g. TAP's step
is 0.05·ε).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

from utils.fileio import UserError
from utils.poisons.common import CraftContext, CraftResult, PoisonSpec

__all__ = ["POISONS", "OPTIONS", "PoisonSpec", "CraftContext", "CraftResult", "resolve_params", "get_poison"]

AR_EPS = 255.0 / math.sqrt(3 * 32 * 32)  # L2 = 1 on the [0, 1] scale, as an RMS in /255 units


def _tau(p: dict) -> float:
    return 0.05 * p["eps"]


# name -> (type, minimum (inclusive) or None, help)
OPTIONS: dict[str, tuple[type, float | None, str]] = {
    "eps": (
        float,
        None,
        "budget in /255 units: L∞ radius, or for L2 poisons the per-pixel RMS (L2 = eps/255·√3072); "
        "SEP's default 8 is ECLIPSE's common budget, --eps 2 is SEP's own",
    ),
    "classwise": (bool, None, "EM: one pattern per class (Huang et al.'s class-wise variant)"),
    "portion": (float, 1e-9, "EM --classwise: fraction of the images (class-stratified) the patterns are crafted on"),
    "step_size": (float, 1e-9, "PGD step on the perturbation, /255 units"),
    "pgd_steps": (int, 1, "PGD steps on the perturbation (per round for EM/ADP)"),
    "train_steps": (int, 1, "surrogate SGD steps per min-min round"),
    "train_batch": (int, 1, "surrogate training batch size"),
    "batch_size": (int, 1, "images per perturbation batch"),
    "lr": (float, 1e-12, "surrogate learning rate (SGD, momentum 0.9)"),
    "weight_decay": (float, 0.0, "surrogate weight decay"),
    "stop_acc": (float, 0.0, "min-min: stop when the surrogate's accuracy on the poisoned data reaches this (%)"),
    "max_rounds": (int, 1, "min-min: give up after this many rounds"),
    "steps": (int, 1, "REM: min-min steps (one batch each)"),
    "lr_decay_every": (int, 1, "REM: multiply the lr by 0.1 every this many steps"),
    "samples": (int, 1, "transformation samples averaged per perturbation step (EOT)"),
    "adv_eps": (float, 0.0, "adversarial training radius of the surrogate/reference, /255"),
    "adv_step": (float, 0.0, "adversarial training PGD step, /255"),
    "adv_steps": (int, 0, "adversarial training PGD steps"),
    "epochs": (int, 1, "surrogate / reference model training epochs"),
    "milestones": (str, None, "epochs (comma-separated) at which the surrogate's lr drops x0.1"),
    "restarts": (int, 1, "random restarts of the whole crafting pass (the one with the lowest total loss is kept)"),
    "checkpoints": (int, 1, "SEP: checkpoints in the ensemble, picked among those saved when test accuracy improved"),
    "target_shift": (int, 1, "targeted poisons: target label (y + shift) mod 10"),
    "variant": (str, None, "EFP: push (away from the own class centroid) or pull (to the nearest other)"),
    "augment": (
        str,
        None,
        "differentiable augmentation while crafting (TAP: and training its surrogate): shift_flip (the "
        "references' bilinear ±4 px shift, mean-colour padding, flip), crop_flip (integer crop, black padding) or none",
    ),
    "sigma": (float, 1e-9, "URP: std of the class-wise Gaussian noise, /255 (then clipped to eps)"),
    "patch": (int, 1, "LSP: patch size (pixels); 32 must be a multiple"),
    "class_sep": (float, 0.0, "LSP: make_classification class_sep"),
    "pixels": (int, 1, "OPS: pixels set per class (L0 budget)"),
    "blur": (float, 1e-9, "CUDA: kernel entries ~ U(0, blur)"),
    "quantize": (str, None, "LSP/CUDA: float to uint8 by truncate (the references' astype(uint8)) or round"),
    "diff_config": (str, None, "ADP: diffusion YAML (a path, or a name in config/eclipse/)"),
    "sparse_set": (str, None, "ADP: diff_ckpt/cifar10/<sparse_set>/"),
    "sparse_diff_model": (str, None, "ADP: checkpoint file in diff_ckpt/cifar10/<sparse_set>/"),
    "unet_t": (int, 0, "ADP: diffusion timestep fed to the UNet classifier"),
    "gray_p": (float, 0.0, "ADP: compensation grayscale probability"),
    "noise_std": (float, 0.0, "ADP: compensation Gaussian noise std on [0, 1]"),
}

# the reference README's class-wise command: 1 step, --use_subset (20 %), stop error 0.1
_EM_CLASSWISE = {"pgd_steps": 1, "stop_acc": 90.0, "portion": 0.2}

POISONS: dict[str, PoisonSpec] = {
    spec.name: spec
    for spec in [
        PoisonSpec(
            name="EM",
            summary="error-minimizing noise (min-min, ResNet18 surrogate), Huang et al. ICLR'21",
            norm="linf",
            kind="sample-wise (class-wise with --classwise)",
            model_based=True,
            module="utils.poisons.em",
            defaults=dict(
                eps=8.0,
                classwise=False,
                step_size=0.8,
                pgd_steps=20,
                train_steps=10,
                train_batch=512,
                batch_size=512,
                lr=0.1,
                weight_decay=5e-4,
                stop_acc=99.0,
                max_rounds=50,
                portion=1.0,
            ),
            paper="perturbation.py of HanxunH/Unlearnable-Examples: 20 steps of 0.8/255, 10 train batches of 512, stop at 1% error",
        ),
        PoisonSpec(
            name="TAP",
            summary="targeted adversarial poisoning from a clean surrogate, Fowl et al. NeurIPS'21",
            norm="linf",
            kind="sample-wise",
            model_based=True,
            module="utils.poisons.tap",
            defaults=dict(
                eps=8.0,
                epochs=40,
                lr=0.1,
                weight_decay=5e-4,
                train_batch=128,
                milestones="14,25,35",
                pgd_steps=250,
                step_size=_tau,
                restarts=8,
                target_shift=1,
                augment="shift_flip",
                batch_size=512,
            ),
            paper="anneal.py of lhfowl/adversarial_poisons (recipe targeted, PGD, tau 0.05, 250 iterations, 8 restarts, "
            "bilinear shift + flip augmentation)",
        ),
        PoisonSpec(
            name="REM",
            summary="robust error-minimizing noise (adversarially trained surrogate), Fu et al. ICLR'22",
            norm="linf",
            kind="sample-wise",
            model_based=True,
            module="utils.poisons.rem",
            defaults=dict(
                eps=8.0,
                step_size=1.6,
                pgd_steps=10,
                samples=5,
                adv_eps=4.0,
                adv_step=0.8,
                adv_steps=10,
                steps=5000,
                lr=0.1,
                lr_decay_every=2000,
                weight_decay=5e-4,
                train_batch=128,
                batch_size=512,
            ),
            paper="scripts/cifar10/gen_rem.sh of fshp971/robust-unlearnable-examples (rem8-4)",
        ),
        PoisonSpec(
            name="SEP",
            summary="self-ensemble protection (checkpoints of one training run), Chen et al. ICLR'23",
            norm="linf",
            kind="sample-wise",
            model_based=True,
            module="utils.poisons.sep",
            defaults=dict(
                eps=8.0,
                epochs=120,
                lr=0.1,
                weight_decay=5e-4,
                train_batch=128,
                milestones="75,90",
                checkpoints=30,
                pgd_steps=30,
                step_size=1.0,
                target_shift=5,
                batch_size=512,
            ),
            paper="vanilla.py + ens.py of Sizhe-Chen/SEP (checkpoints kept when test accuracy improves in 120 "
            "epochs, 30 of them picked by ens.py's index rule, 30 steps of 1/255 to (y+5) mod 10; "
            "its own budget is --eps 2, ECLIPSE's table uses 8)",
            needs_test=True,
        ),
        PoisonSpec(
            name="EFP",
            summary="EntF: entangled features against an adversarially trained reference, Wen et al. ICLR'23",
            norm="linf",
            kind="sample-wise",
            model_based=True,
            module="utils.poisons.efp",
            defaults=dict(
                eps=8.0,
                variant="push",
                epochs=100,
                lr=0.1,
                weight_decay=5e-4,
                train_batch=128,
                milestones="75,90",
                adv_eps=4.0,
                adv_step=2.0,
                adv_steps=10,
                pgd_steps=300,
                step_size=_tau,
                restarts=1,
                augment="shift_flip",
                batch_size=512,
            ),
            paper="WenRuiUSTC/EntF (train_reference_model.py, get_centroid.py, poison_generate.py --recipe push)",
        ),
        PoisonSpec(
            name="URP",
            summary="class-wise random Gaussian noise clipped to the budget",
            norm="linf",
            kind="class-wise",
            model_based=False,
            module="utils.poisons.urp",
            defaults=dict(eps=8.0, sigma=lambda p: p["eps"]),
        ),
        PoisonSpec(
            name="LSP",
            summary="linear-separable synthetic patch perturbations, Yu et al. KDD'22",
            norm="l2",
            kind="sample-wise",
            model_based=False,
            module="utils.poisons.lsp",
            defaults=dict(eps=6.0, patch=8, class_sep=10.0, quantize="truncate"),
            paper="synthetic_perturbations/cifar_train.py of dayu11/Availability-Attacks-Create-Shortcuts",
        ),
        PoisonSpec(
            name="AR",
            summary="autoregressive class filters, Sandoval-Segura et al. NeurIPS'22",
            norm="l2",
            kind="sample-wise (one filter per class)",
            model_based=False,
            module="utils.poisons.ar",
            defaults=dict(eps=AR_EPS),
            paper="psandovalsegura/autoregressive-poisoning (L2 = 1, 36x36 start cropped to 32x32)",
        ),
        PoisonSpec(
            name="ADP",
            summary="ECLIPSE's adaptive attack: EM through the diffusion UNet as a classifier, compensation in the loop",
            norm="linf",
            kind="sample-wise",
            model_based=True,
            module="utils.poisons.adp",
            defaults=dict(
                eps=8.0,
                step_size=0.8,
                pgd_steps=20,
                train_steps=10,
                train_batch=128,
                batch_size=256,
                lr=0.1,
                weight_decay=5e-4,
                stop_acc=99.0,
                max_rounds=50,
                samples=1,
                gray_p=0.4,
                noise_std=0.05,
                unet_t=0,
                diff_config="cifar10.yml",
                sparse_set="test2000ps8000",
                sparse_diff_model="ema_0.9999_250000.pt",
            ),
            paper="ECLIPSE §6 (adaptive attack); unspecified details are documented in utils/poisons/adp.py",
        ),
        PoisonSpec(
            name="OPS",
            summary="one-pixel shortcut, Wu et al. ICLR'23 (not in ECLIPSE's table)",
            norm="l0",
            kind="class-wise",
            model_based=False,
            module="utils.poisons.ops",
            defaults=dict(pixels=1),
            paper="perturb.py of cychomatica/One-Pixel-Shotcut",
        ),
        PoisonSpec(
            name="CUDA",
            summary="class-wise convolution (blur) filters, Sadasivan et al. CVPR'23 (not in ECLIPSE's table)",
            norm="none",
            kind="class-wise",
            model_based=False,
            module="utils.poisons.cuda",
            defaults=dict(blur=0.3, quantize="truncate"),
            paper="final_filter_unlearnable.py of vinusankars/Convolution-based-Unlearnability",
        ),
    ]
}


def get_poison(name: str) -> PoisonSpec:
    """The spec of ``name`` (case-insensitive); an unknown name lists the valid ones."""
    for key, spec in POISONS.items():
        if key.lower() == str(name).lower():
            return spec
    raise UserError(f"unknown poison {name!r}; valid poisons: {', '.join(POISONS)}")


def resolve_params(spec: PoisonSpec, given: dict[str, Any]) -> dict[str, Any]:
    """The poison's defaults overridden by the options the user gave, validated.

    ``given`` maps option names to values (``None`` = not given). Options the poison does
    not take are refused, so that a typo'd or misplaced flag never goes unnoticed."""
    given = {k: v for k, v in given.items() if v is not None and not (k == "classwise" and v is False)}
    foreign = sorted(k for k in given if k not in spec.defaults)
    if foreign:
        flags = ", ".join(f"--{k}" for k in foreign)
        takes = ", ".join(f"--{k}" for k in spec.defaults) or "no options"
        budget = " (its budget is fixed: L0 = --pixels)" if spec.norm == "l0" else ""
        if spec.norm == "none":
            budget = " (it is not norm-bounded)"
        raise UserError(f"{flags} does not apply to {spec.name}{budget}; {spec.name} takes {takes}")
    base = dict(spec.defaults)
    if spec.name == "EM" and given.get("classwise"):
        base.update(_EM_CLASSWISE)
    params: dict[str, Any] = {}
    for k, v in base.items():
        if k in given:
            params[k] = given[k]
        elif not callable(v):
            params[k] = v
    for k, v in base.items():  # derived defaults see the final values of the others
        if k not in params:
            params[k] = v(params)
    _validate(spec, params)
    return params


def _validate(spec: PoisonSpec, p: dict[str, Any]) -> None:
    if "eps" in p:
        eps = p["eps"]
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 < eps <= 255):
            unit = "the L∞ radius" if spec.norm == "linf" else "the per-pixel RMS of the L2 budget"
            raise UserError(f"--eps {eps} is impossible for {spec.name}: {unit} in /255 units must be in (0, 255]")
        if spec.norm == "linf" and eps < 1:
            raise UserError(
                f"--eps {eps} is below one pixel level: uint8 images cannot carry an L∞ change under 1/255 (use eps >= 1)"
            )
    for k, v in p.items():
        typ, lo, _ = OPTIONS[k]
        if lo is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and v < lo:
            raise UserError(f"--{k} must be >= {lo:g}, got {v}")
    if "milestones" in p:
        try:
            ms = [int(s) for s in str(p["milestones"]).split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--milestones must be comma-separated epochs, got {p['milestones']!r}") from None
        if any(m < 1 for m in ms) or ms != sorted(ms):
            raise UserError(f"--milestones must be increasing positive epochs, got {p['milestones']!r}")
    if p.get("variant") not in (None, "push", "pull"):
        raise UserError(f"--variant must be push or pull, got {p['variant']!r}")
    if p.get("augment") not in (None, "none", "crop_flip", "shift_flip"):
        raise UserError(f"--augment must be shift_flip, crop_flip or none, got {p['augment']!r}")
    if p.get("quantize") not in (None, "truncate", "round"):
        raise UserError(f"--quantize must be truncate or round, got {p['quantize']!r}")
    if "patch" in p and 32 % p["patch"]:
        raise UserError(f"--patch must divide 32, got {p['patch']}")
    if "portion" in p and p["portion"] > 1:
        raise UserError(f"--portion is a fraction of the images (<= 1), got {p['portion']}")
    if "portion" in p and p["portion"] < 1 and not p.get("classwise"):
        raise UserError("--portion applies to EM --classwise only: sample-wise noise needs every image")
    if "stop_acc" in p and p["stop_acc"] > 100:
        raise UserError(f"--stop_acc is a percentage (<= 100), got {p['stop_acc']}")
    if "gray_p" in p and p["gray_p"] > 1:
        raise UserError(f"--gray_p is a probability (<= 1), got {p['gray_p']}")
    if spec.name == "SEP" and p["checkpoints"] > p["epochs"]:
        raise UserError(
            f"--checkpoints {p['checkpoints']} exceeds --epochs {p['epochs']} (one checkpoint per epoch at most)"
        )


def get_craft(spec: PoisonSpec) -> Callable[[CraftContext], CraftResult]:
    return importlib.import_module(spec.module).craft
