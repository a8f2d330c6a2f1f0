"""The precision policy: which number format each computation runs in, on the device at hand.

Every script takes ``--precision auto|fp32|bf16`` (the attack YAMLs: ``precision:``);
``--bf16 true|false`` is the older spelling of ``bf16|fp32``. ``fp32`` and ``bf16`` are
taken as asked. ``auto`` (the default) resolves per device and per computation:

* bf16 autocast only where the device runs bf16 natively — a CUDA GPU with bf16, or a CPU
  whose oneDNN has native bf16 kernels (AVX-512-bf16 or AMX). On a CPU without them (AVX2
  only, most laptops) oneDNN emulates bf16 25–125× slower than float32;
* and only for the computations whose results bf16 is measured to change negligibly
  (:data:`BF16_EVIDENCE`, the README's table). Everything else runs in float32, the
  arithmetic of every reference implementation.

The resolved precision is logged in one line at the start of a run ("precision: fp32 —
CPU AVX2 has no native bf16"), stored in the run's settings, and a resumed run keeps the
stored precision (:func:`keep_stored`) rather than refusing or mixing two precisions.

channels_last follows the same rule (:func:`prefer_channels_last`): it is used where it
is measured faster (BENCHMARKS.md, "Precision and layout").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from utils.compat import legacy_precision
from utils.fileio import UserError

PRECISIONS = ("auto", "fp32", "bf16")

# what each computation is, in the words the log and the README use
COMPUTATIONS: dict[str, str] = {
    "purification": "diffusion purification (ECLIPSE stage 1, the survival bench, ADP's purifier)",
    "diffusion_training": "diffusion model training (train_diffusion.py)",
    "victim": "victim training and evaluation (train.py)",
    "surrogate": "poison crafting: surrogate training, PGD, feature extraction (poison.py)",
    "trigger": "triggers' auxiliary models (SSBA encoder, Input-aware generator, LC, LF)",
    "backdoor_training": "DataElixir flow: backdoored, stage-1 and stage-2 classifier training",
    "ddpm_rounds": "DataElixir candidate construction: the DDPM's forward/reverse rounds",
    "candidate_labels": "DataElixir: classifier labels and features of the candidates",
}

# Computations where bf16's effect on results is measured small: auto may use bf16 for
# these (where the device runs it natively). Each entry says what was measured; the
# victim, diffusion and DataElixir figures are from an Intel Xeon Sapphire Rapids (AMX),
# 2026-12-05, the purification and surrogate ones from earlier runs (BENCHMARKS.md).
BF16_EVIDENCE: dict[str, str] = {
    "purification": (
        "purified uint8 images within 1 grey level of float32's (4.2 % of values differ, mean 0.04 levels, "
        "against 3.5 levels of change by purification itself; BENCHMARKS.md)"
    ),
    "victim": (
        "victim test accuracy over 3 seeds 61.75 ± 1.23 % against 62.05 ± 1.74 % in float32 (paired difference "
        "-0.30 ± 0.54), within the seeds' spread (BENCHMARKS.md, precision effects)"
    ),
    "diffusion_training": (
        "training loss within 0.25 % of float32's over 600 iterations (same seed), and the two models purify "
        "to the same PSNR (30.61 dB both; images 0.03 grey levels apart) (BENCHMARKS.md, precision effects)"
    ),
}

# Computations measured and found sensitive: kept in float32 under auto, with the reason.
_DATAELIXIR = (
    "bf16 moves 0.66 % of the candidates' labels, 0.3 % of the transitions and the target scores by up to "
    "0.06 (BENCHMARKS.md, precision effects)"
)
BF16_SENSITIVE: dict[str, str] = {
    "surrogate": "bf16 weakens EM by 5.4 points of victim accuracy (docs/RESULTS.md, surrogate precision)",
    "ddpm_rounds": _DATAELIXIR,
    "candidate_labels": _DATAELIXIR,
}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` is ``fp32`` or ``bf16``; ``reason`` says why."""

    name: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def line(self, computation: str | None = None, used: str | None = None) -> str:
        """One log line: ``precision: fp32 — CPU AVX2 has no native bf16``; with ``used``
        (the precision a resumed run keeps) when that differs, the line says so."""
        what = f" ({computation})" if computation else ""
        if used is not None and used != self.name:
            return f"precision{what}: {used} — kept from the run being resumed (this machine's choice: {self.name})"
        return f"precision{what}: {self.name} — {self.reason}"


def cpu_capability() -> str:
    """torch's name for this CPU's vector instruction set (``AVX2``, ``AVX512``, ...)."""
    return torch.backends.cpu.get_cpu_capability()


def _cpu_native_bf16() -> bool:
    # oneDNN's own check honours ONEDNN_MAX_CPU_ISA (so AVX2-only machines can be emulated);
    # the instruction checks exclude AVX-512 CPUs without bf16 (oneDNN converts there)
    try:
        mkldnn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return mkldnn and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and the device in words for the log."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} has native bf16"
        return False, f"{name} has no native bf16"
    if device.type == "cpu":
        cap = cpu_capability()
        if _cpu_native_bf16():
            kind = "AMX" if torch.cpu._is_amx_tile_supported() else "AVX-512-bf16"
            return True, f"CPU {cap} with {kind} has native bf16"
        return False, f"CPU {cap} has no native bf16"
    return False, f"{device.type} is not a device the policy knows"


def resolve_precision(requested: str, device: torch.device, computation: str) -> Precision:
    """The precision ``computation`` runs in on ``device`` for ``--precision requested``."""
    if computation not in COMPUTATIONS:
        raise ValueError(f"unknown computation {computation!r}")
    if requested not in PRECISIONS:
        raise UserError(f"precision must be {', '.join(PRECISIONS)}, got {requested!r}")
    native, where = native_bf16(device)
    if requested == "fp32":
        return Precision("fp32", "as asked (--precision fp32)")
    if requested == "bf16":
        return Precision("bf16", "as asked (--precision bf16)" + ("" if native else f"; slow here: {where}"))
    if not native:
        return Precision("fp32", where)
    if computation in BF16_EVIDENCE:
        return Precision("bf16", f"{where}; bf16's effect on {computation} is measured small")
    if computation in BF16_SENSITIVE:
        return Precision("fp32", f"{where}, but {BF16_SENSITIVE[computation]}")
    return Precision("fp32", f"{where}, but bf16's effect on {computation} is not shown to be negligible")


def precision_from_args(args: Any, device: torch.device, computation: str) -> Precision:
    """The precision of ``computation`` for a script's ``--precision`` and ``--bf16``."""
    return resolve_precision(requested_precision(args.precision, getattr(args, "bf16", None)), device, computation)


def requested_precision(precision: str, bf16: bool | None, flag: str = "--bf16") -> str:
    """``--precision`` with the older ``--bf16 true|false`` folded in (a clash is an error)."""
    if bf16 is None:
        return precision
    spelled = "bf16" if bf16 else "fp32"
    if precision not in ("auto", spelled):
        raise UserError(f"{flag} {str(bf16).lower()} and --precision {precision} disagree; give one of them")
    return spelled


def keep_stored(
    settings: MutableMapping[str, Any],
    old: Mapping[str, Any] | None,
    where: Any,
    say: Callable[[str], None] = print,
    keys: tuple[str, ...] = ("precision", "channels_last"),
    how: str = "pass --overwrite to start it afresh",
) -> None:
    """A resumed run keeps the precision (and layout) it was started with.

    ``settings`` (this run's, resolved) takes the stored value of each of ``keys`` that
    ``old`` (the stored settings; None for a new run) holds with another value, and
    says so, so that a run resumed on another machine neither refuses nor mixes two
    precisions. A ``bf16`` true/false stored by older versions counts as ``precision``."""
    if not isinstance(old, Mapping):
        return
    old = legacy_precision(old)
    for key in keys:
        if key in old and key in settings and old[key] != settings[key]:
            say(
                f"{key}: {old[key]!r} kept from the run being resumed in {where} (this machine's choice: "
                f"{settings[key]!r}); {how}"
            )
            settings[key] = old[key]


def prefer_channels_last(device: torch.device) -> bool:
    """Whether convolutional models run in channels_last on ``device``: measured faster in
    float32 and bf16 on every CPU tried (AVX2, AVX-512, AMX; BENCHMARKS.md) and on CUDA."""
    return device.type in ("cpu", "cuda")
