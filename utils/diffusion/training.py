"""Diffusion training loop: uniform timesteps, EMA, and the recipe of the config's
``training:`` section (``utils.diffusion.factory.TRAINING_KEYS``): improved-diffusion's
AdamW by default, Ho et al.'s Adam with warm-up, gradient clipping and flips for the DDPM.

One loop trains both model families; the loss comes from ``GaussianDiffusion.
training_losses`` (hybrid MSE + rescaled VB for learned sigmas, plain epsilon MSE for
the DDPM). Checkpoints are improved-diffusion's trio ``model%06d.pt``,
``ema_<rate>_%06d.pt`` (plain state_dicts, loadable by the reference code) and
``opt%06d.pt`` (optimiser + RNG state, for exact resumption); names come from
``utils.diffusion.checkpoints``, which also reads this project's earlier ``model_<step>.pt`` spelling. Multi-process
data-parallel training under ``torchrun`` splits each global batch across ranks.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from utils.augment import random_flip
from utils.diffusion.checkpoints import checkpoint_name, checkpoint_steps, find_checkpoint, parse_checkpoint_name
from utils.diffusion.gaussian_diffusion import GaussianDiffusion
from utils.diffusion.purify import to_model_range
from utils.fileio import UserError, atomic_torch_save, atomic_write_bytes, load_state_dict_strict, safe_torch_load
from utils.plots import save_curves
from utils.progress import progress
from utils.runtime import autocast, barrier


@dataclass
class DiffusionTrainConfig:
    iterations: int = 250_000
    batch_size: int = 128  # global batch, split across ranks
    lr: float = 1e-4  # the peak, reached after warmup_steps
    weight_decay: float = 0.0
    ema_rate: float = 0.9999
    save_interval: int = 10_000
    log_interval: int = 100
    flip: bool = False
    optimizer: str = "adamw"  # adamw (improved-diffusion) | adam (Ho et al.)
    warmup_steps: int = 0  # linear warm-up from 0 (Ho et al.: 5000)
    grad_clip: float = 0.0  # global L2 norm the gradients are clipped to; 0: none (Ho et al.: 1.0)
    max_timestep: int | None = None  # CPU-scale option: train only on t < max_timestep
    precision: str = "fp32"  # resolved: fp32 | bf16 (utils/precision.py)
    seed: int = 0


def latest_step(ckpt_dir: Path, ema_rate: float) -> int:
    """The newest step with a complete model/ema/opt trio (either spelling), 0 if none."""
    for s in reversed(checkpoint_steps(ckpt_dir, "model")):
        if find_checkpoint(ckpt_dir, "ema", s, ema_rate) and find_checkpoint(ckpt_dir, "opt", s):
            return s
    return 0


@dataclass
class ResumeState:
    """The newest complete checkpoint trio of a run, loaded and checked (:func:`load_resume_state`)."""

    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    opt: dict[str, Any]  # {"optimizer": ..., "step": ..., "rng": one dict per process}
    model_path: Path
    opt_path: Path


def _first_non_finite(obj: Any, name: str = "") -> tuple[str, str] | None:
    """The first floating-point tensor in ``obj`` (nested dicts, lists) holding NaN or Inf:
    its name and which; None when all are finite."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return name or "tensor", "NaN" if bool(torch.isnan(obj).any()) else "Inf"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    for k, v in items:
        bad = _first_non_finite(v, f"{name}.{k}" if name else str(k))
        if bad:
            return bad
    return None


def _check_weights_file(state: Any, path: Path) -> None:
    """A model or EMA checkpoint: a dict of floating-point tensors, all finite."""
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            what = str(v.dtype).removeprefix("torch.") if isinstance(v, torch.Tensor) else type(v).__name__
            raise UserError(f"{path}: {k} is {what}; a diffusion checkpoint holds floating-point weights")


def load_resume_state(ckpt_dir: Path, ema_rate: float, world: int) -> ResumeState | None:
    """The trio a run resumes from (None when there is none), refused in one line when it
    cannot be resumed: a tensor of the model, EMA or optimiser holding NaN/Inf (training had
    diverged), weights that are not floating-point, or a state written by another number of
    processes (each process's random streams are stored; they cannot be split differently)."""
    step = latest_step(ckpt_dir, ema_rate)
    if not step:
        return None
    paths = [find_checkpoint(ckpt_dir, "model", step), find_checkpoint(ckpt_dir, "ema", step, ema_rate)]
    opt_path = find_checkpoint(ckpt_dir, "opt", step)
    states = [safe_torch_load(p, what) for p, what in zip(paths, ("model checkpoint", "EMA checkpoint"))]
    for state, path in zip(states, paths):
        _check_weights_file(state, path)
    if set(states[1]) != set(states[0]):
        raise UserError(f"{paths[1]}: its tensors are not those of {paths[0].name}; the run's checkpoints are mixed")
    opt = safe_torch_load(opt_path, "optimiser checkpoint")
    if not isinstance(opt, dict) or not isinstance(opt.get("optimizer"), dict) or not isinstance(opt.get("rng"), list):
        raise UserError(f"{opt_path}: expected the optimiser and random state train_diffusion.py writes")
    for state, path in ((states[0], paths[0]), (states[1], paths[1]), (opt["optimizer"], opt_path)):
        bad = _first_non_finite(state)
        if bad:
            raise UserError(
                f"{path}: {bad[0]} holds {bad[1]} values (training had diverged when it was written); "
                "the run cannot resume from it: start again with other settings and --overwrite, "
                "or under another --sparse_set"
            )
    stored = len(opt["rng"])
    if stored != world:
        how = "run it without torchrun" if stored == 1 else f"run it with torchrun --nproc_per_node={stored}"
        raise UserError(
            f"{opt_path}: written by {stored} training process(es), resumed with {world}; each process's "
            f"random streams are stored, so {how} to resume it, or train under another --sparse_set"
        )
    return ResumeState(step, states[0], states[1], opt, paths[0], opt_path)


def make_optimizer(params, cfg: DiffusionTrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser at its peak lr (:func:`lr_at` sets each step's). Adam's
    defaults (betas 0.9/0.999, eps 1e-8) are TensorFlow's, which Ho et al. trained with."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected adamw or adam")


def lr_at(cfg: DiffusionTrainConfig, step: int) -> float:
    """The lr of the update made after ``step`` completed updates: Ho et al.'s warm-up,
    lr * min(step / warmup_steps, 1), so the first update has lr 0; constant without one."""
    if cfg.warmup_steps <= 0:
        return cfg.lr
    return cfg.lr * min(step / cfg.warmup_steps, 1.0)


def _update(
    model: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, cfg: DiffusionTrainConfig, step: int
) -> float:
    """One optimiser update at the recipe's lr for ``step``, the gradients clipped to
    ``cfg.grad_clip`` first (after DDP's averaging: the clip applies to the global batch's
    gradient, as on one device); returns the lr used."""
    lr = lr_at(cfg, step)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return lr


class UniformTimesteps:
    def __init__(self, num_steps: int, max_timestep: int | None = None):
        self.high = min(num_steps, max_timestep) if max_timestep else num_steps

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randint(0, self.high, (n,), generator=generator).to(device)


def train_diffusion(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    cfg: DiffusionTrainConfig,
    ckpt_dir: Path,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    log=print,
    resume: ResumeState | None = None,
) -> dict:
    """Train on uint8 ``images`` [N, 3, H, W]; resumes from the newest checkpoint in ``ckpt_dir``
    (``resume``: that checkpoint, already loaded by :func:`load_resume_state`). A loss or
    weights going NaN/Inf stop the run with a ``UserError`` before anything is saved, so
    the last good checkpoint stays the newest."""
    if cfg.batch_size % world:
        raise UserError(f"batch size {cfg.batch_size} must be divisible by the {world} processes")
    per_rank = cfg.batch_size // world
    model.to(device).train()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model.parameters(), cfg)
    data_g = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    t_g = torch.Generator().manual_seed(cfg.seed * 1000 + 500 + rank)
    noise_g = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + 900 + rank)

    resume = resume if resume is not None else load_resume_state(ckpt_dir, cfg.ema_rate, world)
    step, resumed_ema, perm, pos = _resume(model, opt, resume, rank, device, (data_g, t_g, noise_g), log)
    if resumed_ema is not None:
        ema = resumed_ema
    if step >= cfg.iterations:
        log(f"already trained for {step} >= {cfg.iterations} iterations; nothing to do")
        return {"step": step}

    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    sampler = UniformTimesteps(diffusion.num_timesteps, cfg.max_timestep)
    n = len(images)
    if perm is None or len(perm) != n:
        perm, pos = torch.randperm(n, generator=data_g), 0
    csv_path = ckpt_dir / "progress.csv"
    if rank == 0:
        _truncate_csv(csv_path, step)
    fields = ["step", "loss", "mse", "vb", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "images_per_s", "lr"]
    window: dict[str, list[float]] = {}
    t_last = time.time()
    bar = progress(total=cfg.iterations, initial=step, desc="diffusion", dynamic_ncols=True, disable=rank != 0)
    while step < cfg.iterations:
        if pos + per_rank > n:
            perm, pos = torch.randperm(n, generator=data_g), 0
        idx = perm[pos : pos + per_rank] if per_rank <= n else torch.randint(0, n, (per_rank,), generator=data_g)
        pos += per_rank
        xb = images[idx].to(device)
        if cfg.flip:
            xb = random_flip(xb, noise_g)
        x0 = to_model_range(xb)
        t = sampler.sample(per_rank, t_g, device)
        noise = torch.randn(x0.shape, generator=noise_g, device=device)
        with autocast(device, cfg.precision == "bf16"):
            out = ddp_model(diffusion.q_sample(x0, t, noise), diffusion.model_timesteps(t))
        terms = diffusion.training_losses(None, x0, t, noise=noise, model_output=out.float())
        loss = terms["loss"].mean()
        _stop_if_diverged(loss, step + 1, ckpt_dir, cfg.ema_rate, world, log)
        lr = _update(model, opt, loss, cfg, step)
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.mul_(cfg.ema_rate).add_(p.detach(), alpha=1 - cfg.ema_rate)
        step += 1
        bar.update(1)
        _record_terms(window, terms, t, diffusion.num_timesteps)
        if step % cfg.log_interval == 0 or step == cfg.iterations:
            rec = {k: sum(v) / len(v) for k, v in window.items()}
            rec.update(
                step=step, images_per_s=cfg.log_interval * cfg.batch_size / max(time.time() - t_last, 1e-9), lr=lr
            )
            t_last, window = time.time(), {}
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if rank == 0:
                _append_csv(csv_path, fields, rec)
                log(" ".join(f"{k}={rec[k]:.5g}" for k in fields if k in rec))
        if step % cfg.save_interval == 0 or step == cfg.iterations:
            _stop_if_diverged(_all_finite([*model.parameters(), *ema]), step, ckpt_dir, cfg.ema_rate, 1, log)
            _save(model, ema, opt, step, cfg, ckpt_dir, rank, world, (data_g, t_g, noise_g, perm, pos))
    bar.close()
    if rank == 0:
        _plot_progress(csv_path, ckpt_dir / "loss.png")
    return {"step": step}


def _resume(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    resume: ResumeState | None,
    rank: int,
    device: torch.device,
    gens: tuple[torch.Generator, torch.Generator, torch.Generator],
    log=print,
) -> tuple[int, list[torch.Tensor] | None, torch.Tensor | None, int | None]:
    """Load the checked checkpoint ``resume`` into ``model``, ``opt`` and the generators
    (data, timesteps, noise); returns its step, the EMA weights and the data order and
    position within the epoch (None where there is none)."""
    if resume is None:
        return 0, None, None, None
    data_g, t_g, noise_g = gens
    load_state_dict_strict(model, resume.model, resume.model_path)
    ema = [resume.ema[name].to(device).clone() for name, _ in model.named_parameters()]
    opt.load_state_dict(resume.opt["optimizer"])
    rngs = resume.opt["rng"][rank]  # load_resume_state: one per process of this run
    data_g.set_state(rngs["data"])
    t_g.set_state(rngs["t"])
    noise_g.set_state(rngs["noise"].to(noise_g.device) if device.type == "cuda" else rngs["noise"])
    # the data order and position within the epoch (older checkpoints lack them)
    perm, pos = rngs.get("perm"), rngs.get("pos")
    if "torch" in rngs:  # the global generator drives dropout
        torch.set_rng_state(rngs["torch"])
        if device.type == "cuda" and "cuda" in rngs:
            torch.cuda.set_rng_state(rngs["cuda"], device)
    log(f"resuming diffusion training from step {resume.step} in {resume.opt_path.parent}")
    return resume.step, ema, perm, pos


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One boolean tensor: whether every element of ``tensors`` is finite (one device sync)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def _stop_if_diverged(value: torch.Tensor, step: int, ckpt_dir: Path, ema_rate: float, world: int, log=print) -> None:
    """Stop the run (every process) when ``value`` (the loss, or ``_all_finite`` of the
    weights) is not finite, before the step updates or saves anything."""
    mine = (~torch.isfinite(value) if value.is_floating_point() else ~value).detach().reshape(1).float()
    bad = mine.clone()
    if world > 1:  # one process's NaN stops them all, none waits in a collective
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if not bool(bad.item()):
        return
    if not value.is_floating_point():
        what = "the weights hold NaN/Inf"
    else:
        what = f"the loss is {value.item()}" if bool(mine.item()) else "another process's loss is NaN/Inf"
    last = latest_step(ckpt_dir, ema_rate)
    kept = f"the last good checkpoint (step {last}) in {ckpt_dir} is kept" if last else "no checkpoint was written"
    msg = (
        f"diffusion training diverged at step {step}: {what}; stopped before saving, {kept}; "
        "a re-run resumes from it and may diverge again (to start again with a lower --lr, add --overwrite)"
    )
    log(msg)
    raise UserError(msg)


def _record_terms(window: dict[str, list[float]], terms: dict, t: torch.Tensor, num_timesteps: int) -> None:
    """Bookkeeping: the overall loss terms and the loss per quarter of the timestep range."""
    for k in ("loss", "mse", "vb"):
        if k in terms:
            window.setdefault(k, []).append(terms[k].mean().item())
    quart = (t * 4 // num_timesteps).tolist()
    for q, lv in zip(quart, terms["loss"].detach().tolist()):
        window.setdefault(f"loss_q{q}", []).append(lv)


def _append_csv(path: Path, fields: list[str], rec: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: (f"{rec[k]:.6g}" if isinstance(rec.get(k), float) else rec.get(k, "")) for k in fields})


def _plot_progress(csv_path: Path, png: Path) -> None:
    if not csv_path.exists():
        return
    rows = list(csv.DictReader(open(csv_path)))
    series = {}
    for k in ("loss", "loss_q0", "loss_q3"):
        pts = [(int(r["step"]), float(r[k])) for r in rows if r.get(k)]
        series[k] = ([p[0] for p in pts], [p[1] for p in pts])
    save_curves(png, series, "diffusion training loss", "step", "loss")


def _truncate_csv(path: Path, step: int) -> None:
    """Drop the rows logged after the checkpoint a run resumes from (they are logged again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if ln.split(",", 1)[0].isdigit() and int(ln.split(",", 1)[0]) <= step]
    if len(keep) < len(lines):
        atomic_write_bytes(path, "".join(keep).encode())


def _gather_rng(gens, world: int) -> list[dict]:
    mine = {"data": gens[0].get_state(), "t": gens[1].get_state(), "noise": gens[2].get_state().cpu()}
    mine.update(perm=gens[3].clone(), pos=gens[4], torch=torch.get_rng_state())
    if gens[2].device.type == "cuda":  # this rank's GPU generator (dropout on the GPU)
        mine["cuda"] = torch.cuda.get_rng_state(gens[2].device)
    if world == 1:
        return [mine]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, mine)
    return out


def _save(model, ema, opt, step, cfg, ckpt_dir: Path, rank: int, world: int, gens) -> None:
    rng = _gather_rng(gens, world)
    if rank == 0:
        ema_state = {name: e.detach().cpu() for (name, _), e in zip(model.named_parameters(), ema)}
        # buffers (none in these UNets) would be copied from the model
        for name, b in model.named_buffers():
            ema_state[name] = b.detach().cpu()
        # write ema, then model, then opt: a trio is complete only once opt exists
        atomic_torch_save(ema_state, ckpt_dir / checkpoint_name("ema", step, cfg.ema_rate))
        model_state = {k: v.cpu() for k, v in model.state_dict().items()}
        atomic_torch_save(model_state, ckpt_dir / checkpoint_name("model", step))
        buf = io.BytesIO()
        torch.save({"optimizer": opt.state_dict(), "step": step, "rng": rng}, buf)
        atomic_write_bytes(ckpt_dir / checkpoint_name("opt", step), buf.getvalue())
        # resumption needs only the newest model/opt pair (either spelling); EMA snapshots are all kept
        for old in list(ckpt_dir.glob("model*.pt")) + list(ckpt_dir.glob("opt*.pt")):
            parsed = parse_checkpoint_name(old.name)
            if parsed and parsed.kind in ("model", "opt") and parsed.step < step:
                old.unlink(missing_ok=True)
    barrier()
