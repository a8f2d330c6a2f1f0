"""One prepared check of the CUDA path: does every script run on the GPU, and how fast is it?

Four parts, each recorded as ok or failed (with its one-line error) without stopping the
others; the exit code is 1 if any part failed:

1. ``tests``: the device-marked tests (``pytest -m device --device <dev>``: UNet and DDPM
   forwards against the reference fixtures, fused attention, the purification loop);
2. ``e2e``: each script once at tiny scale on the device, as a subprocess with a temporary
   ``--work_dir``: train_diffusion.py, poison.py (LSP and EM), purification.py,
   train.py --pure, attack/badnet.py through the DataElixir defence; each output's
   recorded device is checked;
3. ``speed``: purification (the float32 reference loop against the precision policy's
   choice, bf16 and fp32, einsum and fused SDPA attention) on the paper UNet at batch 256;
   DataElixir candidate construction (``build_chunk``) with the paper DDPM; a training
   iteration of the paper UNet at batch 128; victim training (ResNet18, batch 128); with
   the peak GPU memory of each;
4. ``projection``: the wall time of each paper-scale job from those rates.

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` after every part, so a run cut
short still leaves what it measured. On a GPU it takes a few minutes (``--budget_s`` stops
the speed part early); ``--device cpu --tiny`` is a dry run of seconds (CPU-scale models,
tiny batches: it proves the script, its figures mean nothing).

    python bench/gpu_check.py --device cuda --out bench/results/gpu_check
    python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu_check

This file is the entry point and parts 1, 2 and 4; the speed part and the scales are in
bench/gpu_speed.py, the report and its files in bench/gpu_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# before the project's modules are imported: no progress lines inside the timed loops. Those
# (utils, models) are imported inside the functions that use them, here and in gpu_speed.py,
# so that a module broken by a change fails only the part (or speed workload) that needs it
os.environ.setdefault("PROGRESS", "off")

import numpy as np
import torch
from gpu_report import CheckFailed, Report, device_info, fmt_hours, need_device, one_line, write_report
from gpu_speed import FULL, TINY, Scale, part_speed

REPO = Path(__file__).resolve().parents[1]

# the paper-scale jobs: (key, what, amount of work, its unit, the speed workload whose rate it takes)
JOBS = [
    ("purification", "ECLIPSE purification: 50,000 images at t* = 100", 50_000 * 100, "image-steps", "purification"),
    (
        "dataelixir",
        "DataElixir candidates: 50,000 images × 5 rounds × 150 steps (DDPM only, not the labels)",
        50_000 * 5 * 150,
        "image-steps",
        "dataelixir_candidates",
    ),
    (
        "diffusion_training",
        "sparse diffusion model: 250,000 iterations at batch 128",
        250_000,
        "iterations",
        "diffusion_training",
    ),
    ("victim", "victim: 80 epochs × 50,000 images (training steps only)", 80 * 50_000, "images", "victim_training"),
]


# ------------------------------------------------------------------------------ helpers


def child_env(threads: int | None) -> dict[str, str]:
    """The subprocesses' environment: never the network, no progress bars, the threads asked."""
    env = {**os.environ, "CIFAR10_DOWNLOAD": "0", "DDPM_DOWNLOAD": "0", "PROGRESS": "off", "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_logged(cmd: list[str], env: dict[str, str], timeout_s: int, log: Path) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root, its output kept in ``log``; a timeout is a one-line
    failure (with what the process had printed by then in the log)."""
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        # TimeoutExpired may carry bytes even with text=True
        got = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        log.write_text(f"$ {' '.join(cmd)}\n{got[0]}\n{got[1]}\n(killed after {timeout_s} s)\n")
        raise CheckFailed(f"timed out after {timeout_s} s (log: {log.name})") from None
    log.write_text(f"$ {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    return res


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def synthetic_cifar10(root: Path, train: int = 1000, test: int = 500) -> Path:
    """Random images in CIFAR-10's ``cifar-10-batches-py`` layout (labels cycling 0..9), for a
    machine without CIFAR-10 (it cannot be downloaded there): the e2e runs and the device
    tests need images of the right shape, not real ones."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [(f"data_batch_{i}", train // 5) for i in range(1, 6)] + [("test_batch", test)]
    for name, n in names:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def choose_data(mode: str, scratch: Path) -> str:
    """Where the subprocesses read CIFAR-10 (``os.environ``, inherited): the real set when
    present (``--data auto|real``), else synthetic images (``auto|synthetic``)."""
    from utils.data import cifar10_present, resolve_data_root

    shared = REPO.parent / "shared" / "datasets" / "cifar10"
    if "CIFAR10_ROOT" not in os.environ and not cifar10_present() and shared.is_dir():
        os.environ["CIFAR10_ROOT"] = str(shared)  # the Makefile's and the tests' copy beside the checkout
    real = resolve_data_root(None)
    if mode == "real" or (mode == "auto" and cifar10_present()):
        if not cifar10_present():
            raise CheckFailed(f"--data real: no CIFAR-10 at {real} (set CIFAR10_ROOT)")
        return f"CIFAR-10 at {real}"
    root = synthetic_cifar10(scratch / "cifar10")
    os.environ["CIFAR10_ROOT"] = str(root)
    os.environ["CIFAR10_CACHE"] = str(scratch / "cache")  # not the repository's data/cache
    why = "as asked" if mode == "synthetic" else f"no CIFAR-10 at {real}"
    return f"synthetic random images ({why}): proves the path, not accuracy"


# ------------------------------------------------------------------------------ 1. tests


def part_tests(args: argparse.Namespace, dev: torch.device, scale: Scale, out: Path) -> str:
    need_device(dev)
    # no -q: the project's addopts has one, and a second one drops the "N passed" line read below
    cmd = [sys.executable, "-m", "pytest", "-x", "-rs", "-p", "no:cacheprovider", "-m", "device"]
    cmd += ["--device", str(dev), *scale.tests]
    res = run_logged(cmd, child_env(args.threads), scale.timeout_s, out / "tests.log")
    summary = last_line(res.stdout) or last_line(res.stderr)
    if res.returncode != 0:
        failed = re.search(r"^FAILED (\S+)", res.stdout, re.M)
        raise CheckFailed(f"pytest exit {res.returncode}: {failed.group(1) + ' — ' if failed else ''}{summary}")
    if not re.search(r"\b\d+ passed", summary):
        # every test skipped (no CUDA, no ../shared): nothing was proven on the device
        skip = re.search(r"^SKIPPED \[\d+\] \S+ (.*)$", res.stdout, re.M)
        raise CheckFailed(f"no device test passed ({summary}){': ' + skip.group(1) if skip else ''}")
    return summary


# ------------------------------------------------------------------------------ 2. e2e


@dataclass
class Step:
    name: str
    argv: list[str]
    check: Callable[[Path], str]  # the work dir -> the device its output records (raises if missing)


def _json_device(path: Path, key: str = "device") -> Callable[[Path], str]:
    def check(work: Path) -> str:
        return str(json.loads((work / path).read_text())[key])

    return check


def _log_device(path: Path, pattern: str) -> Callable[[Path], str]:
    def check(work: Path) -> str:
        m = re.search(pattern, (work / path).read_text(), re.M)
        if not m:
            raise CheckFailed(f"{path} names no device")
        return m.group(1)

    return check


def e2e_chains(dev: str) -> list[list[Step]]:
    """Two independent chains of tiny runs (each step needs the previous one of its chain);
    flags as small as the scripts accept, after tests/test_eclipse_pipeline.py,
    tests/test_poison_cli.py and tests/test_attack_cli.py."""
    d = ["--device", dev]
    sparse = "test16ps16"  # --num_clean 16 --replicas 1
    eclipse = [
        Step(
            "train_diffusion",
            ["train_diffusion.py", "--config", "config/eclipse/cpu.yml", "--num_clean", "16", "--replicas", "1"]
            + ["--iterations", "2", "--batch_size", "4", "--save_interval", "2", "--log_interval", "1", *d],
            _log_device(Path(f"diff_ckpt/cifar10/{sparse}/train.log"), r"; device (\S+)"),
        ),
        Step(
            "poison LSP",
            ["poison.py", "--poison", "LSP", "--subset", "40", "--no_progress", *d],
            _json_device(Path("poisoned_data/cifar10/LSP.json")),
        ),
        Step(
            "purification",
            ["purification.py", "--poison", "LSP", "--config", "config/eclipse/cpu.yml", "--sparse_set", sparse]
            + ["--sparse_diff_model", "ema_0.9999_000002.pt", "--t", "4", "--batch_size", "8", *d],
            _json_device(Path(f"purified_data/cifar10/{sparse}/4/2/LSP-pure.json")),
        ),
        Step(
            "train.py --pure",
            ["train.py", "--poison", "LSP", "--pure", "--t", "4", "--iter", "2", "--sparse_set", sparse]
            + ["--arch", "resnet18", "--width", "4", "--epochs", "1", "--batch_size", "20", "--test_subset", "50", *d],
            _json_device(Path("runs/train/LSP-pure-resnet18-w4-s0/result.json")),
        ),
    ]
    attack_tiny = {
        "subset": 50,
        "test_subset": 50,
        "model_width": 4,
        "epochs": 1,
        "batch_size": 25,
        "diffusion_config": "config/ddpm/cpu.yml",
        "diffusion_ckpt": "diff_ckpt/cifar10/tiny/ema_0.999_1.pt",  # written by part_e2e
        "steps_T": 20,
        "purify_respace": 2,
        "rounds_n": 1,
        "last_steps_m": 1,
        "threshold_tau": 1,
        "purify_batch_size": 50,
        "pratio": 0.2,
        "device": dev,
    }
    models = [
        Step(
            "poison EM",
            ["poison.py", "--poison", "EM", "--subset", "40", "--arch", "resnet18", "--width", "4"]
            + ["--pgd_steps", "1", "--max_rounds", "1", "--train_steps", "1", "--train_batch", "20"]
            + ["--batch_size", "20", "--no_progress", *d],
            _json_device(Path("poisoned_data/cifar10/EM.json")),
        ),
        Step(
            "attack/badnet.py",
            ["attack/badnet.py", "--yaml_path", "config/badnet/cifar10.yaml", "--save_folder_name", "gpu_check"]
            + [a for k, v in attack_tiny.items() for a in (f"--{k}", str(v))],
            _log_device(Path("record/gpu_check/run.log"), r'"device": "([^"]+)"'),
        ),
    ]
    return [eclipse, models]


def _tiny_ddpm(work: Path) -> None:
    """A random CPU-scale DDPM for the attack's defence (as tests/test_attack_cli.py makes one)."""
    from utils.diffusion.factory import load_diffusion_spec

    spec = load_diffusion_spec(REPO / "config/ddpm/cpu.yml")
    torch.manual_seed(0)
    ckpt = work / "diff_ckpt/cifar10/tiny/ema_0.999_1.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(spec.build_model().state_dict(), ckpt)


def part_e2e(args: argparse.Namespace, dev: torch.device, scale: Scale, out: Path, report: Report) -> str:
    need_device(dev)
    logs = out / "e2e_logs"
    logs.mkdir(exist_ok=True)
    env = child_env(args.threads)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        _tiny_ddpm(work)

        def run_chain(chain: list[Step]) -> list[dict[str, Any]]:
            done: list[dict[str, Any]] = []
            for i, step in enumerate(chain):
                t0 = time.perf_counter()
                cmd = [sys.executable, *step.argv, "--work_dir", str(work)]
                log = logs / (re.sub(r"[^A-Za-z0-9]+", "_", step.name).strip("_") + ".log")
                rec = {"step": step.name, "status": "ok", "seconds": 0.0, "log": str(log), "device": None}
                try:
                    res = run_logged(cmd, env, scale.timeout_s, log)
                    if res.returncode != 0:
                        raise CheckFailed(f"exit {res.returncode}: {last_line(res.stderr) or last_line(res.stdout)}")
                    rec["device"] = step.check(work)
                    # the output says where it ran: a silent fall-back to the CPU is a failure
                    if not rec["device"].startswith(dev.type):
                        raise CheckFailed(f"ran on {rec['device']!r}, not on {dev}")
                except Exception as e:  # the chain's later steps need this one's output: skipped
                    rec["status"] = "failed: " + one_line(e, 300)
                    done.append(rec | {"seconds": time.perf_counter() - t0})
                    done += [{"step": s.name, "status": f"skipped: needs {step.name}"} for s in chain[i + 1 :]]
                    break
                done.append(rec | {"seconds": time.perf_counter() - t0})
            return done

        chains = e2e_chains(str(dev))
        # the two chains are independent: run side by side (tiny runs are start-up bound)
        with ThreadPoolExecutor(max_workers=max(1, min(args.jobs, len(chains)))) as pool:
            steps = [r for rs in pool.map(run_chain, chains) for r in rs]
    report.details["e2e"] = steps
    failed = [r for r in steps if r["status"].startswith("failed")]
    if failed:
        skipped = [r["step"] for r in steps if r["status"].startswith("skipped")]
        more = [f"also failed: {', '.join(r['step'] for r in failed[1:])}"] if failed[1:] else []
        more += [f"skipped: {', '.join(skipped)}"] if skipped else []
        raise CheckFailed(f"{failed[0]['step']} {failed[0]['status']}" + "".join(f"; {m}" for m in more))
    return ", ".join(f"{r['step']} {r['seconds']:.1f} s" for r in steps)


# ------------------------------------------------------------------------------ 3. speed: gpu_speed.py
# ------------------------------------------------------------------------------ 4. projection


def part_projection(report: Report) -> str:
    report.projections.clear()
    missing = []
    for key, what, work, unit, workload in JOBS:
        rows = [m for m in report.measurements if m["workload"] == workload and m["value"]]
        pick = {
            "policy": next((m for m in rows if m["policy"]), None),
            "reference": next((m for m in rows if m["reference"]), None),
            "fastest": max(rows, key=lambda m: m["value"], default=None),
        }
        if pick["policy"] is None:
            missing.append(workload)
            continue
        job: dict[str, Any] = {"key": key, "job": what, "work": work, "unit": unit}
        for name, m in pick.items():
            job[name] = None
            if m is not None:
                seconds = work / m["value"]
                job[name] = {
                    "variant": m["variant"],
                    "rate": m["value"],
                    "rate_unit": m["unit"],
                    "batch": m["batch"],
                    "seconds": seconds,
                    "hours": seconds / 3600,
                }
        report.projections.append(job)
    if missing:
        raise CheckFailed(f"no measured rate in the policy's precision for {', '.join(missing)}")
    return "; ".join(f"{j['key']} {fmt_hours(j['policy']['seconds'])}" for j in report.projections)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the logs")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="dry run: CPU-scale models, tiny batches, two device tests")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads, here and in the subprocesses (--tiny: 1)")
    ap.add_argument("--jobs", type=int, default=2, help="e2e runs side by side (two independent chains)")
    ap.add_argument(
        "--budget_s", type=float, default=420.0, help="the speed part stops starting measurements after this"
    )
    ap.add_argument(
        "--data",
        choices=("auto", "real", "synthetic"),
        default="auto",
        help="CIFAR-10 for the tests and e2e runs: auto = the real set when found, else random images",
    )
    ap.add_argument("--parts", default="tests,e2e,speed,projection", help="comma-separated subset of the parts")
    args = ap.parse_args(argv)
    if args.threads is None and args.tiny:
        args.threads = 1  # a dry run on a shared CPU: more threads only wait on each other
    unknown = set(args.parts.split(",")) - {"tests", "e2e", "speed", "projection"}
    if unknown:
        ap.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        print(f"error: --device {args.device!r}: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = TINY if args.tiny else FULL
    report = Report(args=vars(args), device=device_info(dev), started=time.strftime("%Y-%m-%d %H:%M:%S"))
    with tempfile.TemporaryDirectory(prefix="gpu_check_data_") as scratch:
        try:
            report.data = choose_data(args.data, Path(scratch))
        except CheckFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        run_parts(args, dev, scale, report, out, t_start)
    wall = time.perf_counter() - t_start
    write_report(report, out, wall)
    print(f"gpu_check: {'all parts ok' if report.ok else 'FAILED'} in {wall:.0f} s -> {out / 'gpu_check.md'}")
    return 0 if report.ok else 1


def run_parts(
    args: argparse.Namespace, dev: torch.device, scale: Scale, report: Report, out: Path, t_start: float
) -> None:
    """Each part in turn, one progress line each; the report is rewritten after every part."""
    print(
        f"gpu_check: {report.device['name']} ({dev}), torch {torch.__version__}, "
        f"{'dry run (--tiny)' if args.tiny else 'full'} -> {out}; data: {report.data}",
        flush=True,
    )
    parts: dict[str, Callable[[], str]] = {
        "tests": lambda: part_tests(args, dev, scale, out),
        "e2e": lambda: part_e2e(args, dev, scale, out, report),
        "speed": lambda: part_speed(args, dev, scale, report, t_start),
        "projection": lambda: part_projection(report),
    }
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            summary, error = parts[name](), None
        except Exception as e:  # one failing part is recorded; the next one still runs
            summary, error = "", one_line(e, 800)
        secs = time.perf_counter() - t0
        status = "ok" if error is None else "failed"
        report.parts.append({"name": name, "status": status, "seconds": secs, "summary": summary, "error": error})
        write_report(report, out, time.perf_counter() - t_start)
        print(
            f"[{time.perf_counter() - t_start:6.1f} s] {name}: {'ok' if error is None else 'FAILED'} in {secs:.1f} s"
            f" — {error or summary}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
