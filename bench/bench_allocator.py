"""glibc's default malloc against ``utils.fileio.keep_freed_memory`` (what every script
runs with), on the CPU workloads whose tensors pass glibc's 32 MiB mmap threshold or not:
the DataElixir DDPM and the ECLIPSE UNet denoising a batch, and a classifier training step.

Each measurement is a fresh process (the malloc setting is process-wide and cannot be
undone), the two settings INTERLEAVED (default, kept, default, kept, ...) and the medians
compared, so that background load affects both alike. Per step: image-steps/s, minor page
faults (the kernel handing out fresh zeroed pages) and the share of time spent in the kernel.

    OMP_NUM_THREADS=1 python bench/bench_allocator.py [--reps 3] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_purification import random_model
from common import machine, record

from models.classifiers import build_classifier
from utils.diffusion.factory import load_diffusion_spec
from utils.fileio import keep_freed_memory
from utils.precision import cpu_capability, resolve_precision
from utils.runtime import autocast, to_channels_last

WORKLOADS = {
    # name: (what, batch, steps timed, the precision policy's computation)
    "ddpm_denoise": ("DataElixir CPU DDPM (config/ddpm/cpu.yml), one denoising step", 500, 3, "ddpm_rounds"),
    "unet_denoise": ("ECLIPSE CPU UNet (config/eclipse/cpu.yml), one denoising step", 256, 3, "purification"),
    "classifier_train": ("PreActResNet18 width 16, one training step", 64, 40, "backdoor_training"),
}


def _step(workload: str, batch: int, bf16: bool):
    device = torch.device("cpu")
    torch.manual_seed(0)
    if workload == "classifier_train":
        model = to_channels_last(build_classifier("preactresnet18", 10, 16), device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))

        def step() -> None:
            with autocast(device, bf16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step
    config = "config/ddpm/cpu.yml" if workload == "ddpm_denoise" else "config/eclipse/cpu.yml"
    model = random_model(load_diffusion_spec(Path(__file__).resolve().parents[1] / config))
    x, t = torch.randn(batch, 3, 32, 32), torch.full((batch,), 10)

    def step() -> None:
        with torch.no_grad(), autocast(device, bf16):
            model(x, t)

    return step


def child(workload: str, bf16: bool) -> dict:
    """One measurement in this (fresh) process, with the malloc setting ``MALLOC_TUNING`` asks for."""
    applied = keep_freed_memory()
    _, batch, steps, _ = WORKLOADS[workload]
    step = _step(workload, batch, bf16)
    step()
    step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "applied": applied,
        "image_steps_per_s": steps * batch / seconds,
        "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
        "kernel_time_pct": 100 * (r1.ru_stime - r0.ru_stime) / seconds,
        "max_rss_mib": r1.ru_maxrss / 1024,
    }


def measure(workload: str, kept: bool, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--child", workload, "--precision", precision]
    env = dict(os.environ, MALLOC_TUNING="on" if kept else "off")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per setting and workload")
    ap.add_argument("--precision", default="auto", help="auto (the policy's choice here), fp32 or bf16")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    def bf16(workload: str) -> bool:
        return resolve_precision(args.precision, torch.device("cpu"), WORKLOADS[workload][3]).bf16

    if args.child:
        print(json.dumps(child(args.child, bf16(args.child))))
        return
    print(f"CPU capability {cpu_capability()}, {torch.get_num_threads()} thread(s); {machine()['cpu']}")
    rows = []
    for workload in args.only.split(","):
        if workload not in WORKLOADS:
            raise SystemExit(f"error: --only {workload!r}: expected some of {', '.join(WORKLOADS)}")
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.reps):
            for kept in (False, True):
                runs[kept].append(measure(workload, kept, args.precision))
        what, batch = WORKLOADS[workload][:2]
        row = {"workload": workload, "what": what, "batch": batch, "bf16": bf16(workload)}
        for kept, name in ((False, "default"), (True, "kept")):
            for key in ("image_steps_per_s", "minor_faults_per_step", "kernel_time_pct", "max_rss_mib"):
                row[f"{name}_{key}"] = statistics.median(r[key] for r in runs[kept])
        row["speedup"] = row["kept_image_steps_per_s"] / row["default_image_steps_per_s"]
        rows.append(row)
        print(
            f"{workload:17s} batch {batch:3d} {'bf16' if row['bf16'] else 'fp32'}: default {row['default_image_steps_per_s']:7.1f}/s "
            f"({row['default_minor_faults_per_step']:8.0f} faults/step, {row['default_kernel_time_pct']:4.1f} % kernel, "
            f"{row['default_max_rss_mib']:5.0f} MiB) | kept {row['kept_image_steps_per_s']:7.1f}/s "
            f"({row['kept_minor_faults_per_step']:8.0f}, {row['kept_kernel_time_pct']:4.1f} %, "
            f"{row['kept_max_rss_mib']:5.0f} MiB) | x{row['speedup']:.2f}"
        )
    record("allocator", rows)


if __name__ == "__main__":
    main()
