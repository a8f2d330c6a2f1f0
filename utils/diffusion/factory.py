"""Build a diffusion model and its process from a YAML config, and load checkpoints.

Two config dialects, one per model family:

* improved-diffusion (ECLIPSE): a ``model:`` section with improved-diffusion's own keys
  (``num_channels``, ``noise_schedule``, ``learn_sigma`` ...), the same file layout as
  ECLIPSE's ``configs/cifar10.yml``, so that file works here unchanged.
* DDPM (DataElixir): ``model: {architecture: ddpm, ch, ch_mult, ...}`` with
  pytorch_diffusion's ``Model`` arguments and a ``diffusion:`` section
  (``beta_schedule``, ``beta_start``, ``beta_end``, ``num_diffusion_timesteps``,
  ``model_var_type``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import yaml

from models.ddpm import DDPMModel
from models.unet import create_unet
from utils.diffusion.checkpoints import parse_checkpoint_name, resolve_checkpoint
from utils.diffusion.gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule, space_timesteps
from utils.fileio import UserError, load_state_dict_strict, read_text_file, safe_torch_load
from utils.paths import REPO_ROOT
from utils.runtime import compiled

# improved-diffusion's model_and_diffusion_defaults()
IMPROVED_DEFAULTS: dict[str, Any] = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    attention_resolutions="16,8",
    dropout=0.0,
    learn_sigma=False,
    sigma_small=False,
    class_cond=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=True,
    rescale_learned_sigmas=True,
    use_checkpoint=False,
    use_scale_shift_norm=True,
)

DDPM_MODEL_DEFAULTS: dict[str, Any] = dict(
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=[1, 2, 2, 2],
    num_res_blocks=2,
    attn_resolutions=[16],
    dropout=0.1,
)
DDPM_DIFFUSION_DEFAULTS: dict[str, Any] = dict(
    beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_diffusion_timesteps=1000, model_var_type="fixedlarge"
)

_VAR_TYPES = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}


@dataclass
class DiffusionSpec:
    """What a config file describes: the network and the diffusion process."""

    architecture: str  # "improved_unet" | "ddpm"
    model: dict[str, Any]
    diffusion: dict[str, Any]
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

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


def _check_keys(section: dict, allowed: dict, where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(allowed))}")


def spec_from_dict(cfg: dict, source: str = "<dict>") -> DiffusionSpec:
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise UserError(
            f"{source}: expected a 'model:' section (see config/eclipse/cifar10.yml or config/ddpm/cifar10.yml)"
        )
    model = dict(cfg["model"])
    arch = model.pop("architecture", "improved_unet")
    if arch == "ddpm":
        _check_keys(model, DDPM_MODEL_DEFAULTS, f"{source} model")
        m = {**DDPM_MODEL_DEFAULTS, **model}
        dsec = cfg.get("diffusion") or {}
        _check_keys(dsec, {**DDPM_DIFFUSION_DEFAULTS, "timestep_respacing": ""}, f"{source} diffusion")
        d = {**DDPM_DIFFUSION_DEFAULTS, **dsec}
        if d["model_var_type"] not in _VAR_TYPES:
            raise UserError(
                f"{source}: diffusion.model_var_type must be fixedlarge or fixedsmall, got {d['model_var_type']!r}"
            )
        diffusion = dict(
            beta_schedule=d["beta_schedule"],
            beta_start=float(d["beta_start"]),
            beta_end=float(d["beta_end"]),
            num_steps=int(d["num_diffusion_timesteps"]),
            model_var_type=_VAR_TYPES[d["model_var_type"]],
            loss_type="mse",
            rescale_timesteps=False,
            timestep_respacing=str(d.get("timestep_respacing", "") or ""),
        )
    elif arch == "improved_unet":
        _check_keys(model, IMPROVED_DEFAULTS, f"{source} model")
        m = {**IMPROVED_DEFAULTS, **model}
        if m["class_cond"]:
            raise UserError(f"{source}: class_cond=True is not supported (ECLIPSE's model is unconditional)")
        if m["predict_xstart"]:
            raise UserError(f"{source}: predict_xstart=True is not supported (epsilon prediction only)")
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
            num_steps=int(m["diffusion_steps"]),
            model_var_type=var,
            loss_type=loss,
            rescale_timesteps=bool(m["rescale_timesteps"]),
            timestep_respacing=str(m["timestep_respacing"] or ""),
        )
    else:
        raise UserError(f"{source}: model.architecture must be 'improved_unet' or 'ddpm', got {arch!r}")
    if diffusion["beta_schedule"] not in ("linear", "cosine"):
        raise UserError(f"{source}: noise schedule must be linear or cosine, got {diffusion['beta_schedule']!r}")
    spec = DiffusionSpec(arch, m, diffusion, source, cfg)
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
    try:
        cfg = yaml.safe_load(read_text_file(path, "diffusion config"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    return spec_from_dict(cfg, str(path))


def load_diffusion_model(
    spec: DiffusionSpec, ckpt: str | Path, device: torch.device, hint: str = "", compile: bool = False
) -> nn.Module:
    """The network of ``spec`` with weights from ``ckpt`` (strict), in eval mode on ``device``;
    ``compile``: its forward compiled in place (:func:`utils.runtime.compiled`)."""
    model = spec.build_model()
    state = safe_torch_load(ckpt, "diffusion checkpoint", hint)
    load_state_dict_strict(model, state, ckpt)
    return compiled(model.eval().requires_grad_(False).to(device), compile)


def diffusion_train_command(
    config: str | Path, sparse_set: str, checkpoint_name: str, work: str | Path | None = None
) -> str:
    """The ``train_diffusion.py`` command that produces ``diff_ckpt/cifar10/<sparse_set>/<checkpoint_name>``.

    ``work``: the work folder the checkpoint belongs to; given, the config is named as it
    is found (relative to the repository, where that command runs) and ``--work_dir``
    added when the work folder is not the repository."""
    import re

    if work is not None:
        config = resolve_config(config)
        try:
            config = config.resolve().relative_to(REPO_ROOT.resolve())
        except ValueError:
            pass
    parts = [f"python train_diffusion.py --config {config}"]
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
