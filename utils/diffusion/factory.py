"""Build a diffusion model and its process from a YAML config, and load checkpoints.

Two config dialects, one per model family:

* improved-diffusion (ECLIPSE): a ``model:`` section with improved-diffusion's own keys
  (``num_channels``, ``noise_schedule``, ``learn_sigma`` ...), the same file layout as
  ECLIPSE's ``configs/cifar10.yml``, so that file works here unchanged.
* DDPM (DataElixir): ``model: {architecture: ddpm, ch, ch_mult, ...}`` with
  pytorch_diffusion's ``Model`` arguments and a ``diffusion:`` section
  (``beta_schedule``, ``beta_start``, ``beta_end``, ``num_diffusion_timesteps``,
  ``model_var_type``).

Either may carry a ``training:`` section (``TRAINING_KEYS``), the recipe
``train_diffusion.py`` trains the model with; without one it is improved-diffusion's.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from models.ddpm import DDPMModel
from models.unet import channel_mult_for, create_unet
from utils.diffusion.checkpoints import parse_checkpoint_name, resolve_checkpoint
from utils.diffusion.gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule, space_timesteps
from utils.fileio import UserError, load_state_dict_strict, safe_torch_load
from utils.options import GT0, NONNEG, POSITIVE, Key, Range, coerce, load_yaml_file
from utils.paths import REPO_ROOT
from utils.runtime import compiled

# the ranges only these configs use (the shared ones come from utils.options)
DROPOUT = Range(0, 1, high_open=True)
BETA = Range(0, 1, low_open=True, high_open=True)
NORM_GROUPS = 32  # both UNets normalise with GroupNorm(32, channels)
MAX_DDPM_LEVELS = 5  # a 32x32 input halves per level down to 2x2 (one more level at 64x64)

# improved-diffusion's model_and_diffusion_defaults(), each key declared
IMPROVED_KEYS: dict[str, Key] = {
    "image_size": Key(64, "image size the channel multipliers are chosen for", choices=(32, 64)),
    "num_channels": Key(128, f"base channels (a multiple of {NORM_GROUPS})", range=POSITIVE),
    "num_res_blocks": Key(2, "residual blocks per level", range=POSITIVE),
    "num_heads": Key(4, "attention heads (dividing the attention blocks' channels)", range=POSITIVE),
    "num_heads_upsample": Key(-1, "attention heads of the upsampling path; -1: num_heads", range=Range(-1)),
    "attention_resolutions": Key("16,8", "comma list of feature-map sizes with attention", str),
    "dropout": Key(0.0, range=DROPOUT),
    "learn_sigma": Key(False, "learn the variance (6 output channels)"),
    "sigma_small": Key(False, "fixed small variance instead of fixed large (without learn_sigma)"),
    "class_cond": Key(False, "class-conditional model (not supported)"),
    "diffusion_steps": Key(1000, range=POSITIVE),
    "noise_schedule": Key("linear", choices=("linear", "cosine")),
    "timestep_respacing": Key("", "respacing of the sampling steps (improved-diffusion's spelling)", str, True),
    "use_kl": Key(False, "train with the rescaled KL loss"),
    "predict_xstart": Key(False, "predict x_0 instead of the noise (not supported)"),
    "rescale_timesteps": Key(True, "the model sees t scaled to 0..1000"),
    "rescale_learned_sigmas": Key(True, "hybrid loss: MSE plus the rescaled variational bound"),
    "use_checkpoint": Key(False, "gradient checkpointing (ignored)"),
    "use_scale_shift_norm": Key(True),
}
IMPROVED_DEFAULTS: dict[str, Any] = {k: key.default for k, key in IMPROVED_KEYS.items()}

# pytorch_diffusion's Model arguments and DDPM's diffusion settings, each key declared
DDPM_MODEL_KEYS: dict[str, Key] = {
    "resolution": Key(32, "input resolution (CIFAR-10's 32; Tiny-ImageNet's 64)", choices=(32, 64)),
    "in_channels": Key(3, "input channels (RGB)", choices=(3,)),
    "out_ch": Key(3, "output channels (the predicted noise)", choices=(3,)),
    "ch": Key(128, f"base channels (a multiple of {NORM_GROUPS})", range=POSITIVE),
    "ch_mult": Key([1, 2, 2, 2], f"channel multiplier per level (1 to {MAX_DDPM_LEVELS} positive integers)", list),
    "num_res_blocks": Key(2, "residual blocks per level", range=POSITIVE),
    "attn_resolutions": Key([16], "feature-map sizes with attention", list),
    "dropout": Key(0.1, range=DROPOUT),
}
DDPM_DIFFUSION_KEYS: dict[str, Key] = {
    "beta_schedule": Key("linear", choices=("linear", "cosine")),
    "beta_start": Key(0.0001, range=BETA),
    "beta_end": Key(0.02, range=BETA),
    "num_diffusion_timesteps": Key(1000, range=POSITIVE),
    "model_var_type": Key("fixedlarge", choices=("fixedlarge", "fixedsmall")),
    "timestep_respacing": Key("", "respacing of the sampling steps", str, True),
}
# the diffusion training recipe; the defaults are improved-diffusion's (ECLIPSE's configs
# have no training: section), config/ddpm/*.yml set Ho et al.'s (run_cifar.py / tpu_utils.py)
TRAINING_KEYS: dict[str, Key] = {
    "optimizer": Key("adamw", "adamw (improved-diffusion) or adam (Ho et al.)", choices=("adamw", "adam")),
    "lr": Key(1e-4, "peak learning rate", range=GT0),
    "weight_decay": Key(0.0, "weight decay (AdamW: decoupled; Adam: L2)", range=NONNEG),
    "warmup_steps": Key(0, "linear warm-up, lr * min(step / warmup_steps, 1); 0: none", range=NONNEG),
    "grad_clip": Key(0.0, "clip the gradients' global L2 norm to this; 0: no clipping", range=NONNEG),
    "flip": Key(False, "random horizontal flip of the training images"),
    "ema_rate": Key(0.9999, "EMA decay of the saved weights", range=Range(0, 1, low_open=True, high_open=True)),
}
TRAINING_DEFAULTS: dict[str, Any] = {k: key.default for k, key in TRAINING_KEYS.items()}
DDPM_MODEL_DEFAULTS: dict[str, Any] = {k: key.default for k, key in DDPM_MODEL_KEYS.items()}
DDPM_DIFFUSION_DEFAULTS: dict[str, Any] = {
    k: key.default for k, key in DDPM_DIFFUSION_KEYS.items() if k != "timestep_respacing"
}
# YAML 1.1 reads an exponent without a dot (1e-4) as text: such text is the number it spells
_EXPONENT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")

_VAR_TYPES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}


@dataclass
class DiffusionSpec:
    """What a config file describes: the network and the diffusion process."""

    architecture: str  # "improved_unet" | "ddpm"
    model: dict[str, Any]
    diffusion: dict[str, Any]
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    # how train_diffusion.py trains it (TRAINING_KEYS); not part of summary(): the weights,
    # not the recipe that made them, decide what a loaded model does
    training: dict[str, Any] = field(default_factory=lambda: dict(TRAINING_DEFAULTS))

    def build_model(self, compile: bool = False) -> nn.Module:
        """The network; ``compile``: its forward compiled in place (:func:`utils.runtime.compiled`)."""
        return compiled(self._build_model(), compile)

    def _build_model(self) -> nn.Module:
        if self.architecture == "ddpm":
            kw = dict(self.model)
            kw["ch_mult"] = tuple(kw["ch_mult"])
            kw["attn_resolutions"] = tuple(kw["attn_resolutions"])
            return DDPMModel(**kw)

        m = self.model
        return create_unet(
            image_size=m["image_size"],
            num_channels=m["num_channels"],
            num_res_blocks=m["num_res_blocks"],
            learn_sigma=m["learn_sigma"],
            attention_resolutions=m["attention_resolutions"],
            num_heads=m["num_heads"],
            num_heads_upsample=m["num_heads_upsample"],
            dropout=m["dropout"],
            use_scale_shift_norm=m["use_scale_shift_norm"],
        )

    def build_diffusion(self, respacing: str | None = None) -> GaussianDiffusion:
        """The process (:func:`create_diffusion`); ``respacing`` overrides the config's
        ``timestep_respacing``."""
        return create_diffusion(self, respacing)

    @property
    def image_size(self) -> int:
        return int(self.model.get("image_size", self.model.get("resolution", 32)))

    def summary(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "model": self.model,
            "diffusion": self.diffusion,
            "source": self.source,
        }


def create_diffusion(spec: DiffusionSpec | Mapping[str, Any], timestep_respacing: str | None = "") -> GaussianDiffusion:
    """The one factory of a diffusion process (as DiT's ``create_diffusion``): the process a
    spec (or its ``diffusion`` section) describes, over the timesteps ``timestep_respacing``
    keeps. ``""`` keeps all (the process purification noises and trains with); None takes
    the config's own ``timestep_respacing``."""
    d = spec.diffusion if isinstance(spec, DiffusionSpec) else spec
    betas = get_named_beta_schedule(d["beta_schedule"], d["num_steps"], d.get("beta_start"), d.get("beta_end"))
    spacing = d.get("timestep_respacing", "") if timestep_respacing is None else timestep_respacing
    use = space_timesteps(d["num_steps"], spacing) if spacing else None
    if use is not None and len(use) == d["num_steps"]:
        use = None
    return GaussianDiffusion(
        betas,
        model_var_type=d["model_var_type"],
        loss_type=d["loss_type"],
        rescale_timesteps=d["rescale_timesteps"],
        use_timesteps=use,
    )


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _checked(section: Any, keys: dict[str, Key], name: str, source: str) -> dict[str, Any]:
    """The ``name`` section with every key checked by its declaration (``utils.options.check``):
    unknown keys refused, missing ones at their defaults."""
    if not isinstance(section, Mapping):
        raise UserError(f"{source}: '{name}:' must be a mapping of key: value, got {type(section).__name__}")
    unknown = sorted(str(k) for k in section if k not in keys)
    if unknown:
        raise UserError(f"{source} {name}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(keys))}")
    out = {k: copy.deepcopy(key.default) for k, key in keys.items()}
    for k, value in section.items():
        key = keys[k]
        if key.kind is float and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            value = float(value)
        out[k] = coerce(f"{name}.{k}", key, value, keys, source)
    return out


def _heads_divide(m: dict[str, Any], mults: tuple[int, ...], sizes: list[int], res: list[int], source: str) -> None:
    """Each attention block splits its channels into whole heads."""
    attn_ch = [mult * m["num_channels"] for mult, size in zip(mults, sizes) if size in res]
    up = m["num_heads"] if m["num_heads_upsample"] == -1 else m["num_heads_upsample"]
    for name, heads, chans in (
        ("num_heads", m["num_heads"], [*attn_ch, mults[-1] * m["num_channels"]]),
        ("num_heads_upsample", up, attn_ch),
    ):
        bad = [c for c in chans if c % heads]
        if bad:
            raise UserError(
                f"model.{name} in {source}: must divide the channels of every attention block, "
                f"got {heads} heads for {bad[0]} channels"
            )


def _check_improved_model(m: dict[str, Any], source: str) -> None:
    """What improved-diffusion's UNet needs of its keys together."""
    if m["class_cond"]:
        raise UserError(f"{source}: class_cond=True is not supported (ECLIPSE's model is unconditional)")
    if m["predict_xstart"]:
        raise UserError(f"{source}: predict_xstart=True is not supported (epsilon prediction only)")
    if m["num_channels"] % NORM_GROUPS:
        raise UserError(
            f"model.num_channels in {source}: must be a multiple of {NORM_GROUPS} "
            f"(GroupNorm's groups), got {m['num_channels']}"
        )
    if m["num_heads_upsample"] == 0:
        raise UserError(f"model.num_heads_upsample in {source}: must be -1 (num_heads) or >= 1, got 0")
    mults = channel_mult_for(m["image_size"])
    sizes = [m["image_size"] >> level for level in range(len(mults))]  # the feature maps' sizes
    text = m["attention_resolutions"]
    try:
        res = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        res = None
    if res is None or any(r not in sizes for r in res):
        raise UserError(
            f"model.attention_resolutions in {source}: must be a comma list of feature-map sizes "
            f"among {','.join(map(str, sizes))}, got {text!r}"
        )
    _heads_divide(m, mults, sizes, res, source)


def _improved_spec(model: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    m = _checked(model, IMPROVED_KEYS, "model", source)
    _check_improved_model(m, source)
    if m["use_kl"]:
        loss = "rescaled_kl"
    elif m["rescale_learned_sigmas"]:
        loss = "rescaled_mse"
    else:
        loss = "mse"
    if m["learn_sigma"]:
        var = "learned_range"
    else:
        var = "fixed_small" if m["sigma_small"] else "fixed_large"
    diffusion = dict(
        beta_schedule=m["noise_schedule"],
        num_steps=m["diffusion_steps"],
        model_var_type=var,
        loss_type=loss,
        rescale_timesteps=m["rescale_timesteps"],
        timestep_respacing=m["timestep_respacing"] or "",
    )
    return m, diffusion


def _check_ddpm_model(m: dict[str, Any], source: str) -> None:
    """What pytorch_diffusion's Model needs of its keys together."""
    if m["ch"] % NORM_GROUPS:
        raise UserError(
            f"model.ch in {source}: must be a multiple of {NORM_GROUPS} (GroupNorm's groups), got {m['ch']}"
        )
    mult = m["ch_mult"]
    levels = MAX_DDPM_LEVELS + (m["resolution"] // 32).bit_length() - 1
    if not 1 <= len(mult) <= levels or not all(_positive_int(x) for x in mult):
        raise UserError(f"model.ch_mult in {source}: must be a list of 1 to {levels} positive integers, got {mult!r}")
    sizes = [m["resolution"] >> level for level in range(len(mult))]
    if not all(_positive_int(r) and r in sizes for r in m["attn_resolutions"]):
        raise UserError(
            f"model.attn_resolutions in {source}: must be a list of feature-map sizes among {sizes}, "
            f"got {m['attn_resolutions']!r}"
        )


def _ddpm_spec(cfg: dict, model: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    m = _checked(model, DDPM_MODEL_KEYS, "model", source)
    _check_ddpm_model(m, source)
    d = _checked(cfg.get("diffusion") or {}, DDPM_DIFFUSION_KEYS, "diffusion", source)
    diffusion = dict(
        beta_schedule=d["beta_schedule"],
        beta_start=d["beta_start"],
        beta_end=d["beta_end"],
        num_steps=d["num_diffusion_timesteps"],
        model_var_type=_VAR_TYPES[d["model_var_type"]],
        loss_type="mse",
        rescale_timesteps=False,
        timestep_respacing=d["timestep_respacing"] or "",
    )
    return m, diffusion


def spec_from_dict(cfg: dict, source: str = "<dict>") -> DiffusionSpec:
    """The spec a config describes, every key checked by its declaration (``IMPROVED_KEYS``,
    ``DDPM_MODEL_KEYS``, ``DDPM_DIFFUSION_KEYS``, ``TRAINING_KEYS``) and the keys checked
    together, so that a spec builds its model and process; a bad key is a one-line
    ``UserError`` naming it."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise UserError(
            f"{source}: expected a 'model:' section (see config/eclipse/cifar10.yml or config/ddpm/cifar10.yml)"
        )
    model = dict(cfg["model"])
    arch = model.pop("architecture", "improved_unet")
    if arch not in ("improved_unet", "ddpm"):
        raise UserError(f"{source}: model.architecture must be 'improved_unet' or 'ddpm', got {arch!r}")
    sections = ("data", "diffusion", "model", "training") if arch == "ddpm" else ("data", "model", "training")
    unknown = sorted(str(k) for k in cfg if k not in sections)
    if unknown:
        where = " (improved-diffusion's keys all go under model:)" if arch == "improved_unet" else ""
        raise UserError(
            f"{source}: unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(sections)}{where}"
        )
    m, diffusion = _ddpm_spec(cfg, model, source) if arch == "ddpm" else _improved_spec(model, source)
    spacing = diffusion["timestep_respacing"]
    if spacing:
        try:
            space_timesteps(diffusion["num_steps"], spacing)
        except ValueError as e:
            section = "diffusion" if arch == "ddpm" else "model"
            raise UserError(
                f"{section}.timestep_respacing in {source}: must respace the {diffusion['num_steps']} steps "
                f"(a comma list of step counts or ddimN), got {spacing!r} ({e})"
            ) from None
    training = _checked(cfg.get("training") or {}, TRAINING_KEYS, "training", source)
    spec = DiffusionSpec(arch, m, diffusion, source, cfg, training)
    try:
        create_diffusion(spec, None)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    return spec


def resolve_config(name: str | Path) -> Path:
    """A diffusion config by path, by path from the repository, or by name in config/eclipse/."""
    for cand in (Path(name), REPO_ROOT / name, REPO_ROOT / "config" / "eclipse" / name):
        if cand.is_file():
            return cand
    raise UserError(f"diffusion config {str(name)!r} not found (looked in ., the repository and config/eclipse/)")


def load_diffusion_spec(path: str | Path) -> DiffusionSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"diffusion config not found: {path} (see config/eclipse/ and config/ddpm/)")
    return spec_from_dict(load_yaml_file(path, "diffusion config"), str(path))


def check_weight_dtypes(model: nn.Module, state: Any, path: str | Path) -> None:
    """Refuse a state dict whose entries for the model's floating-point tensors are not
    floating-point tensors (an int64 file would load silently rounded), naming the first."""
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # as load_state_dict_strict reads it
    if not isinstance(state, dict):
        return  # load_state_dict_strict names what it is
    for k, own in model.state_dict().items():
        v = state.get(k)
        if v is None or not own.is_floating_point():
            continue
        if not isinstance(v, torch.Tensor):
            raise UserError(f"{path}: {k} is a {type(v).__name__}, not a tensor; expected a state_dict of tensors")
        if not v.is_floating_point():
            raise UserError(
                f"{path}: tensor {k} has dtype {str(v.dtype).removeprefix('torch.')}; "
                "a diffusion checkpoint holds floating-point weights"
            )


def load_diffusion_model(
    spec: DiffusionSpec, ckpt: str | Path, device: torch.device, hint: str = "", compile: bool = False
) -> nn.Module:
    """The network of ``spec`` with weights from ``ckpt`` (strict), in eval mode on ``device``;
    ``compile``: its forward compiled in place (:func:`utils.runtime.compiled`)."""
    model = spec.build_model()
    state = safe_torch_load(ckpt, "diffusion checkpoint", hint)
    check_weight_dtypes(model, state, ckpt)
    load_state_dict_strict(model, state, ckpt)
    return compiled(model.eval().requires_grad_(False).to(device), compile)


def diffusion_train_command(
    config: str | Path, sparse_set: str, checkpoint_name: str, work: str | Path | None = None, dataset: str = "cifar10"
) -> str:
    """The ``train_diffusion.py`` command that produces ``diff_ckpt/<dataset>/<sparse_set>/<checkpoint_name>``.

    ``work``: the work folder the checkpoint belongs to; given, the config is named as it
    is found (relative to the repository, where that command runs) and ``--work_dir``
    added when the work folder is not the repository."""
    if work is not None:
        config = resolve_config(config)
        try:
            config = config.resolve().relative_to(REPO_ROOT.resolve())
        except ValueError:
            pass
    parts = [f"python train_diffusion.py --config {config}"] + (
        [f"--dataset {dataset}"] if dataset != "cifar10" else []
    )
    m = re.fullmatch(r"(test|train)(\d+)ps(\d+)", sparse_set)
    if m and int(m.group(3)) % int(m.group(2)) == 0:
        source, n, total = m.group(1), int(m.group(2)), int(m.group(3))
        if (source, n, total) != ("test", 2000, 8000):
            parts.append(f"--source {source} --num_clean {n} --replicas {total // n}")
    else:
        parts.append(f"--sparse_set {sparse_set}")

    parsed = parse_checkpoint_name(checkpoint_name)
    if parsed and parsed.kind == "ema":
        if parsed.rate != "0.9999":
            parts.append(f"--ema_rate {parsed.rate}")
        parts.append(f"--iterations {parsed.step}")
    if work is not None and Path(work).resolve() != REPO_ROOT.resolve():
        parts.append(f"--work_dir {work}")
    return " ".join(parts)


class Purifier(NamedTuple):
    """A loaded purifier: the network (eval mode, frozen), its un-respaced process, its spec."""

    model: nn.Module
    diffusion: GaussianDiffusion
    spec: DiffusionSpec


def purifier_checkpoint(path: str | Path, missing: str = "") -> Path:
    """The diffusion checkpoint ``path`` (either spelling of a ``train_diffusion.py`` name);
    a missing one is a one-line error saying ``missing`` (how to make it)."""
    ckpt = resolve_checkpoint(path)
    if not ckpt.is_file():
        raise UserError(f"diffusion checkpoint not found: {ckpt}" + (f"; {missing}" if missing else ""))
    return ckpt


def load_purifier(
    config: str | Path | DiffusionSpec,
    checkpoint: str | Path,
    device: torch.device,
    *,
    missing: str = "",
    t: int | None = None,
    t_error: str = "--t {t} exceeds the diffusion's {steps} steps",
    compile: bool = False,
) -> Purifier:
    """The purifier of ``config`` (a config file or its spec) with the weights of
    ``checkpoint``: the one way a diffusion model is loaded to purify or attack.

    The noise step ``t`` (when given) is checked against the process's length first,
    refused with ``t_error`` (``{t}``, ``{steps}``); a missing checkpoint is refused saying
    ``missing``; the weights load weights-only, strict and finite."""
    spec = config if isinstance(config, DiffusionSpec) else load_diffusion_spec(config)
    diffusion = create_diffusion(spec)
    if t is not None and t > diffusion.num_timesteps:
        raise UserError(t_error.format(t=t, steps=diffusion.num_timesteps))
    ckpt = purifier_checkpoint(checkpoint, missing)
    return Purifier(load_diffusion_model(spec, ckpt, device, compile=compile), diffusion, spec)
