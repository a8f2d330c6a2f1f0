"""Device selection, autocast, seeding and process-group helpers."""

from __future__ import annotations

import contextlib
import os
import random
from datetime import timedelta

import numpy as np
import torch
from torch import nn

from utils.fileio import UserError


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present (this rank's GPU under torchrun), else CPU."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name (try cpu, cuda, cuda:0)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled`` (the precision policy's choice,
    ``utils.precision``); a no-op context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def channels_last_safe(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model`` may run in channels_last on ``device``.

    torch 2.13's CPU (oneDNN) backward of a strided 1x1 convolution with fewer than 16 input
    channels in channels_last corrupts the heap when more than one thread runs (the process
    aborts, e.g. in the shortcut of a width-4 or width-8 ResNet at batch 25; seen on AMD EPYC
    with AVX-512 bf16). Wider models (the CPU recipe's width 16 and up) are unaffected.
    """
    if device.type != "cpu":
        return True
    return not any(
        isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels < 16
        for m in model.modules()
    )


def _contiguous_input(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


def to_channels_last(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device`` in channels_last (faster for convolutions under bf16), or,
    where that is unsafe (:func:`channels_last_safe`), in the default layout with its inputs
    made contiguous on entry, so callers may pass channels_last batches either way. The
    chosen layout is kept as ``model.input_layout`` for calls that bypass ``forward``; a
    model placed already keeps its layout (and gets no second input hook)."""
    if hasattr(model, "input_layout"):
        return model.to(device)
    model.to(device)
    if channels_last_safe(model, device):
        model.input_layout = torch.channels_last
        return model.to(memory_format=torch.channels_last)
    model.input_layout = torch.contiguous_format
    model.register_forward_pre_hook(_contiguous_input)
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(deterministic: bool) -> None:
    """cuDNN's mode: ``True`` as ECLIPSE's ``same_seeds`` (deterministic kernels, no
    autotuning); ``False`` lets cuDNN pick the fastest, non-deterministic kernels. The
    flags only affect CUDA runs."""
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


# --------------------------------------------------------------------------- torchrun


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when not distributed."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device, timeout: timedelta | None = None) -> tuple[int, int]:
    """Start the process group under torchrun (gloo on CPU, NCCL on GPU); ``timeout``: how
    long a collective may wait for a rank (torch's default: 30 minutes)."""
    rank, world = dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, **({"timeout": timeout} if timeout else {}))
        if device.type == "cuda" and device.index is not None:
            # NCCL's object collectives (on_rank0's broadcast) use the current device
            torch.cuda.set_device(device)
        if device.type == "cpu":
            # share the machine's cores between the ranks instead of oversubscribing
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return rank, world


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def cleanup_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- speed options
# measured in bench/bench_speedups.py (BENCHMARKS.md, "Speed options")


def compiled(model: nn.Module, enabled: bool = True) -> nn.Module:
    """``model`` with its forward compiled in place by ``torch.compile`` (inductor) when
    ``enabled``; its parameters and ``state_dict`` keys stay as they are. The first calls
    compile (minutes on a CPU, longer on a busy one) and results differ from eager ones in
    rounding only (fused kernels; BENCHMARKS.md, "Speed options")."""
    if enabled:
        model.compile()
    return model
