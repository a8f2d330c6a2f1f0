"""The registry of clean-label availability poisons, ``POISONS``, and their options.

Each poison module exposes ``craft(ctx: CraftContext) -> CraftResult``; ``POISONS[name]`` holds
the poison's norm, its defaults (the papers' settings, see ``../shared/docs/RESEARCH_NOTES.md``
§2 and the README), and a recommended CPU-scale setting. ``OPTIONS`` declares every poison-specific
option once as a ``Key`` (type, range, choices, help); a poison's ``defaults`` are those
Keys with its own default values, and it accepts exactly those options. A default may be
a function of the other resolved options (e.g. TAP's step is 0.05·ε).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

from utils.data import NUM_CLASSES
from utils.datasets import DatasetSpec, diffusion_config_name
from utils.fileio import UserError
from utils.options import FINITE, FRACTION, GT0, NONNEG, POSITIVE, BadValue, Key, Range, check
from utils.poisons.common import CraftContext, CraftResult, PoisonSpec

AR_EPS = 255.0 / math.sqrt(3 * 32 * 32)  # L2 = 1 on the [0, 1] scale, as an RMS in /255 units


def _tau(p: dict) -> float:
    return 0.05 * p["eps"]


_QUANTIZE = ("truncate", "round")

# every poison-specific option, declared once; a poison's ``defaults`` are these Keys
# with its own default values (``_takes``)
OPTIONS: dict[str, Key] = {
    "eps": Key(
        None,
        "budget in /255 units: L∞ radius, or for L2 poisons the per-pixel RMS (L2 = eps/255·√3072); "
        "SEP's default 8 is ECLIPSE's common budget, --eps 2 is SEP's own",
        float,
        range=FINITE,
    ),
    "classwise": Key(None, "EM: one pattern per class (Huang et al.'s class-wise variant)", bool, flag=True),
    "portion": Key(
        None,
        "EM --classwise: fraction of the images (class-stratified) the patterns are crafted on",
        float,
        range=Range(0, 1, low_open=True),
    ),
    "step_size": Key(None, "PGD step on the perturbation, /255 units", float, range=GT0),
    "pgd_steps": Key(None, "PGD steps on the perturbation (per round for EM/ADP)", int, range=POSITIVE),
    "train_steps": Key(None, "surrogate SGD steps per min-min round", int, range=POSITIVE),
    "train_batch": Key(None, "surrogate training batch size", int, range=POSITIVE),
    "batch_size": Key(None, "images per perturbation batch", int, range=POSITIVE),
    "lr": Key(None, "surrogate learning rate (SGD, momentum 0.9)", float, range=Range(1e-12)),
    "weight_decay": Key(None, "surrogate weight decay", float, range=NONNEG),
    "stop_acc": Key(
        None,
        "min-min: stop when the surrogate's accuracy on the poisoned data reaches this (%)",
        float,
        range=Range(0, 100),
    ),
    "max_rounds": Key(None, "min-min: give up after this many rounds", int, range=POSITIVE),
    "steps": Key(None, "REM: min-min steps (one batch each)", int, range=POSITIVE),
    "lr_decay_every": Key(None, "REM: multiply the lr by 0.1 every this many steps", int, range=POSITIVE),
    "samples": Key(None, "transformation samples averaged per perturbation step (EOT)", int, range=POSITIVE),
    "adv_eps": Key(None, "adversarial training radius of the surrogate/reference, /255", float, range=NONNEG),
    "adv_step": Key(None, "adversarial training PGD step, /255", float, range=NONNEG),
    "adv_steps": Key(None, "adversarial training PGD steps", int, range=NONNEG),
    "epochs": Key(None, "surrogate / reference model training epochs", int, range=POSITIVE),
    "milestones": Key(None, "epochs (comma-separated) at which the surrogate's lr drops x0.1", str),
    "restarts": Key(
        None,
        "random restarts of the whole crafting pass (the one with the lowest total loss is kept)",
        int,
        range=POSITIVE,
    ),
    "checkpoints": Key(
        None,
        "SEP: checkpoints in the ensemble, picked among those saved when test accuracy improved",
        int,
        range=POSITIVE,
    ),
    "target_shift": Key(None, "targeted poisons: target label (y + shift) mod 10", int, range=POSITIVE),
    "variant": Key(
        None,
        "EFP: push (away from the own class centroid) or pull (to the nearest other)",
        str,
        choices=("push", "pull"),
    ),
    "augment": Key(
        None,
        "differentiable augmentation while crafting (TAP: and training its surrogate): shift_flip (the "
        "references' bilinear ±4 px shift + flip, padded as each reference pads: TAP the mean colour, EFP black), "
        "crop_flip (integer crop, black padding) or none",
        str,
        choices=("shift_flip", "crop_flip", "none"),
    ),
    "pull_own": Key(
        None,
        "EFP --variant pull: the own class's distance before the nearest centroid is picked: one (EntF's "
        "forgemaster_pull.py sets it to 1, so the own centroid wins where every other is farther) or exclude",
        str,
        choices=("one", "exclude"),
    ),
    "final_drop_last": Key(
        None,
        "REM: the final pass re-crafts shuffled batches of --train_batch and drops the last partial one, as "
        "the reference's drop_last loader does (those images keep their last δ); false re-crafts every image",
        bool,
    ),
    "sigma": Key(None, "URP: std of the class-wise Gaussian noise, /255 (then clipped to eps)", float, range=GT0),
    "patch": Key(
        None,
        "LSP: patch size (pixels); the image side must be a multiple (default: 8 at 32x32, 16 at 64x64)",
        int,
        range=POSITIVE,
    ),
    "class_sep": Key(None, "LSP: make_classification class_sep", float, range=NONNEG),
    "pixels": Key(None, "OPS: pixels set per class (L0 budget)", int, range=POSITIVE),
    "blur": Key(None, "CUDA: kernel entries ~ U(0, blur)", float, range=GT0),
    "quantize": Key(
        None,
        "LSP/CUDA/SEP: float to uint8 by truncate (the references' astype(uint8); SEP: of its [0, 1] float "
        "image ×255, kept within the budget) or round",
        str,
        choices=_QUANTIZE,
    ),
    "diff_config": Key(
        None,
        "ADP: diffusion YAML (a path, or a name in config/eclipse/; default: the dataset's, e.g. cifar10.yml)",
        str,
    ),
    "sparse_set": Key(None, "ADP: diff_ckpt/<dataset>/<sparse_set>/", str),
    "sparse_diff_model": Key(None, "ADP: checkpoint file in diff_ckpt/<dataset>/<sparse_set>/", str),
    "unet_t": Key(None, "ADP: diffusion timestep fed to the UNet classifier", int, range=NONNEG),
    "gray_p": Key(None, "ADP: compensation grayscale probability", float, range=FRACTION),
    "noise_std": Key(None, "ADP: compensation Gaussian noise std on [0, 1]", float, range=NONNEG),
}


def _takes(**defaults: Any) -> dict[str, Key]:
    """A poison's options: the declared Keys with its defaults (a default may be a function
    of the other resolved options)."""
    return {k: OPTIONS[k].with_default(v) for k, v in defaults.items()}


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
            defaults=_takes(
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
            defaults=_takes(
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
            defaults=_takes(
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
                final_drop_last=False,
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
            defaults=_takes(
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
                quantize="round",
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
            defaults=_takes(
                eps=8.0,
                variant="push",
                pull_own="one",
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
            defaults=_takes(eps=8.0, sigma=lambda p: p["eps"]),
        ),
        PoisonSpec(
            name="LSP",
            summary="linear-separable synthetic patch perturbations, Yu et al. KDD'22",
            norm="l2",
            kind="sample-wise",
            model_based=False,
            module="utils.poisons.lsp",
            defaults=_takes(eps=6.0, patch=8, class_sep=10.0, quantize="truncate"),
            paper="synthetic_perturbations/cifar_train.py of dayu11/Availability-Attacks-Create-Shortcuts",
        ),
        PoisonSpec(
            name="AR",
            summary="autoregressive class filters, Sandoval-Segura et al. NeurIPS'22",
            norm="l2",
            kind="sample-wise (one filter per class)",
            model_based=False,
            module="utils.poisons.ar",
            defaults=_takes(eps=AR_EPS),
            paper="psandovalsegura/autoregressive-poisoning (L2 = 1, 36x36 start cropped to 32x32)",
        ),
        PoisonSpec(
            name="ADP",
            summary="ECLIPSE's adaptive attack: EM through the diffusion UNet as a classifier, compensation in the loop",
            norm="linf",
            kind="sample-wise",
            model_based=True,
            module="utils.poisons.adp",
            defaults=_takes(
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
            defaults=_takes(pixels=1),
            paper="perturb.py of cychomatica/One-Pixel-Shotcut",
        ),
        PoisonSpec(
            name="CUDA",
            summary="class-wise convolution (blur) filters, Sadasivan et al. CVPR'23 (not in ECLIPSE's table)",
            norm="none",
            kind="class-wise",
            model_based=False,
            module="utils.poisons.cuda",
            defaults=_takes(blur=0.3, quantize="truncate"),
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


def resolve_params(
    spec: PoisonSpec, given: dict[str, Any], image_size: int = 32, data: DatasetSpec | None = None
) -> dict[str, Any]:
    """The poison's defaults overridden by the options the user gave, validated.

    ``given`` maps option names to values (``None`` = not given). Options the poison does
    not take are refused, so that a typo'd or misplaced flag never goes unnoticed.
    ``image_size``: the dataset's; LSP's patch scales with it (the same 4×4 grid). ``data``:
    the dataset, when known (its image size replaces ``image_size``; its class count and ADP's
    default config follow it); without it CIFAR-10's ten classes."""
    if data is not None:
        image_size = data.image_size
    given = {k: v for k, v in given.items() if v is not None and not (k == "classwise" and v is False)}
    foreign = sorted(k for k in given if k not in spec.defaults)
    if foreign:
        flags = ", ".join(f"--{k}" for k in foreign)
        takes = ", ".join(f"--{k}" for k in spec.defaults) or "no options"
        budget = " (its budget is fixed: L0 = --pixels)" if spec.norm == "l0" else ""
        if spec.norm == "none":
            budget = " (it is not norm-bounded)"
        raise UserError(f"{flags} does not apply to {spec.name}{budget}; {spec.name} takes {takes}")
    base = {k: key.default for k, key in spec.defaults.items()}
    if "patch" in base and image_size != 32:
        base["patch"] = base["patch"] * image_size // 32
    if spec.name == "EM" and given.get("classwise"):
        base.update(_EM_CLASSWISE)
    if "diff_config" in base and "diff_config" not in given and data is not None:
        base["diff_config"] = diffusion_config_name(data, "eclipse", "--diff_config")  # CIFAR-10: cifar10.yml
    params: dict[str, Any] = {}
    for k, v in base.items():
        if k in given:
            params[k] = given[k]
        elif not callable(v):
            params[k] = v
    for k, v in base.items():  # derived defaults see the final values of the others
        if k not in params:
            params[k] = v(params)
    _validate(spec, params, image_size, data.num_classes if data is not None else NUM_CLASSES)
    return params


def _validate(spec: PoisonSpec, p: dict[str, Any], image_size: int = 32, num_classes: int = NUM_CLASSES) -> None:
    if "eps" in p:
        eps = p["eps"]
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 < eps <= 255):
            unit = "the L∞ radius" if spec.norm == "linf" else "the per-pixel RMS of the L2 budget"
            raise UserError(f"--eps {eps} is impossible for {spec.name}: {unit} in /255 units must be in (0, 255]")
        if spec.norm == "linf" and eps < 1:
            raise UserError(
                f"--eps {eps} is below one pixel level: uint8 images cannot carry an L∞ change under 1/255 (use eps >= 1)"
            )
    for k, v in p.items():  # type, range and choices, as declared
        try:
            check(spec.defaults[k], v)
        except BadValue as e:
            raise UserError(e.message(f"--{k}")) from None
    if "milestones" in p:
        try:
            ms = [int(s) for s in str(p["milestones"]).split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--milestones must be comma-separated epochs, got {p['milestones']!r}") from None
        if any(m < 1 for m in ms) or ms != sorted(ms):
            raise UserError(f"--milestones must be increasing positive epochs, got {p['milestones']!r}")
    if "patch" in p and image_size % p["patch"]:
        raise UserError(f"--patch must divide the image side {image_size}, got {p['patch']}")
    if spec.name == "LSP" and num_classes > 2 ** (3 * (image_size // p["patch"]) ** 2):
        # one distinct hypercube vertex per class: the search for them would never end
        features = 3 * (image_size // p["patch"]) ** 2
        raise UserError(
            f"--patch {p['patch']} leaves {features} features ({image_size // p['patch']}x{image_size // p['patch']}x3), "
            f"too few for {num_classes} classes (at most 2^{features} = {2**features}); use a smaller --patch"
        )
    if "portion" in p and p["portion"] < 1 and not p.get("classwise"):
        raise UserError("--portion applies to EM --classwise only: sample-wise noise needs every image")
    if spec.name == "SEP" and p["checkpoints"] > p["epochs"]:
        raise UserError(
            f"--checkpoints {p['checkpoints']} exceeds --epochs {p['epochs']} (one checkpoint per epoch at most)"
        )


def get_craft(spec: PoisonSpec) -> Callable[[CraftContext], CraftResult]:
    return importlib.import_module(spec.module).craft
