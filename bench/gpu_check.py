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
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# before the project's modules are imported: no progress lines inside the timed loops
os.environ.setdefault("PROGRESS", "off")

import torch
from common import machine

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ scales


@dataclass(frozen=True)
class Scale:
    """Models, batches and repetitions of the speed part."""

    purify_config: str
    purify_batch: int
    ddpm_config: str
    ddpm_batch: int
    train_config: str
    train_batch: int
    victim_width: int
    victim_batch: int
    warmup: int  # untimed calls first (allocator, cuDNN/oneDNN primitive creation)
    repeats: int  # timed calls; the median is reported
    train_steps: int  # optimisation steps per timed call (victim, diffusion training)
    tests: tuple[str, ...]  # what pytest is given (always with -m device)
    timeout_s: int  # per subprocess


FULL = Scale(
    purify_config="config/eclipse/cifar10.yml",  # the paper's 52.5 M-parameter UNet
    purify_batch=256,  # purification.py's default
    ddpm_config="config/ddpm/cifar10.yml",  # Ho et al.'s 35.7 M-parameter DDPM
    ddpm_batch=1024,  # DataElixir's purify_batch_size
    train_config="config/eclipse/cifar10.yml",
    train_batch=128,  # improved-diffusion's batch
    victim_width=64,
    victim_batch=128,
    warmup=1,
    repeats=3,
    train_steps=10,
    tests=("tests",),
    timeout_s=150,  # a CUDA start-up takes seconds; a hang must not eat the 8 minutes
)
# the dry run: CPU-scale models, batches of a few images, one timed call, and only the two
# fixture forwards among the device tests (the others take seconds to minutes on a busy CPU)
TINY = Scale(
    purify_config="config/eclipse/cpu.yml",
    purify_batch=4,
    ddpm_config="config/ddpm/cpu.yml",
    ddpm_batch=4,
    train_config="config/eclipse/cpu.yml",
    train_batch=8,
    victim_width=16,  # width 16 keeps channels_last on the CPU (utils.runtime.channels_last_safe)
    victim_batch=16,
    warmup=1,
    repeats=1,
    train_steps=2,
    tests=("tests/test_fixtures.py::test_tiny_unet_forward", "tests/test_fixtures.py::test_tiny_ddpm_forward"),
    timeout_s=120,
)

PURIFY_STEPS = 3  # reverse steps per timed call: the per-step rate is what scales
DDPM_STEPS_T, DDPM_RESPACE = 150, 3  # DataElixir's noise level, 3 reverse steps timed

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

# ------------------------------------------------------------------------------ report


@dataclass
class Report:
    args: dict[str, Any]
    device: dict[str, Any]
    started: str
    data: str = ""
    parts: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # per part, what its one line summarises
    measurements: list[dict[str, Any]] = field(default_factory=list)
    projections: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p["status"] == "ok" for p in self.parts)

    def as_json(self, wall_s: float) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "wall_s": round(wall_s, 1),
            "started": self.started,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": self.args,
            "device": self.device,
            "data": self.data,
            "parts": [p | {"details": self.details.get(p["name"])} for p in self.parts],
            "measurements": self.measurements,
            "projections": self.projections,
        }


class CheckFailed(Exception):
    """A check's own finding (its message is the whole story; no exception type is shown)."""


def one_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    text = text if isinstance(e, CheckFailed) else f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}g}" if abs(v) < 10 ** (digits - 1) else f"{v:,.0f}"


def _cell(text: Any) -> str:
    """Text for a markdown table cell (an error message may hold a pipe)."""
    return str(text).replace("|", "\\|")


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def write_report(report: Report, out: Path, wall_s: float) -> None:
    """``gpu_check.json`` and ``gpu_check.md`` in ``out`` (rewritten after every part)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report.as_json(wall_s), indent=2) + "\n")
    d = report.device
    md = [
        f"# GPU check: {d['name']}",
        "",
        "| device | torch | CUDA | date | result | wall time |",
        "|---|---|---|---|---|---|",
        f"| {d['name']} | {d['torch']} | {d.get('cuda_version') or '—'} | {d['date']} | "
        f"{'all parts ok' if report.ok else 'FAILED'} | {wall_s:.0f} s |",
        "",
        f"`{report.as_json(wall_s)['command']}`"
        + (" (dry run: CPU-scale models, figures not paper-scale)" if report.args["tiny"] else ""),
        "",
        f"Data for the tests and e2e runs: {report.data}.",
        "",
        "| part | status | seconds | result |",
        "|---|---|---|---|",
    ]
    for p in report.parts:
        md.append(f"| {p['name']} | {p['status']} | {p['seconds']:.1f} | {_cell(p['error'] or p['summary'])} |")
    md += [
        "",
        "| workload | model | batch | variant | figure | unit | peak GPU memory (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in report.measurements:
        tags = [t for t, on in (("reference", m["reference"]), ("policy", m["policy"])) if on]
        variant = m["variant"] + (f" ({', '.join(tags)})" if tags else "")
        figure = _fmt(m["value"])
        if m["value"] is None:
            figure = m["note"] if str(m["note"]).startswith("failed") else f"skipped: {m['note']}"
        md.append(
            f"| {m['workload']} | {m['model']} | {m['batch']} | {variant} | {_cell(figure)} | {m['unit']} | "
            f"{_fmt(m['peak_mib'], 4) if m['peak_mib'] is not None else '—'} |"
        )
    if report.measurements:
        tf32 = d.get("cudnn_allow_tf32")
        md += [
            "",
            "Each workload runs as its script runs it: the precision policy's choice (`policy`) is "
            "`--precision auto` with the models' own attention (einsum); `sdpa` swaps in their fused "
            "`scaled_dot_product_attention` variants; cuDNN deterministic for the victim (train.py), "
            "autotuned for DataElixir, torch's default otherwise"
            + (f"; fp32 convolutions in TF32: {tf32}" if tf32 is not None else "")
            + ". Projections below take the rate per image-step, iteration or image; "
            "DataElixir's excludes labelling the candidates.",
        ]
    if report.projections:
        md += [
            "",
            "| paper-scale job | work | policy's choice | fp32 reference | fastest measured |",
            "|---|---|---|---|---|",
        ]
        for j in report.projections:
            cells = [
                f"{_hours(j[k]['seconds'])} ({j[k]['variant']}, batch {j[k]['batch']})" if j.get(k) else "—"
                for k in ("policy", "reference", "fastest")
            ]
            md.append(f"| {j['job']} | {j['work']:,} {j['unit']} | " + " | ".join(cells) + " |")
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")


def device_info(dev: torch.device) -> dict[str, Any]:
    info = machine()
    info |= {"device": str(dev), "cuda_version": torch.version.cuda, "threads": torch.get_num_threads()}
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        info |= {
            "name": torch.cuda.get_device_name(dev),
            "capability": f"sm_{props.major}{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(),
            # fp32 convolutions run in TF32 unless this is off: the "fp32" figures are TF32 convs then
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    elif dev.type == "cuda":
        info["name"] = f"{dev} not available (CPU: {info['cpu'] or 'unknown'})"
    else:
        info["name"] = info["cpu"] or "CPU"
    return info


# ------------------------------------------------------------------------------ helpers


def need_device(dev: torch.device) -> None:
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckFailed(f"--device {dev}: torch {torch.__version__} sees no CUDA device")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise CheckFailed(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s)")


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


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_seconds(fn: Callable[[], Any], dev: torch.device, warmup: int, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls
    (synchronised, so queued GPU work is counted)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def attention(kind: str) -> Iterator[None]:
    """The models' attention formula for the duration: ``einsum`` (the reference formulas,
    what the models use) or ``sdpa`` (their fused ``scaled_dot_product_attention`` variants,
    equal up to rounding: tests/test_attention.py). The models look them up at call time."""
    from models import ddpm, unet

    saved = unet.qkv_attention, ddpm.attention
    if kind == "sdpa":
        unet.qkv_attention, ddpm.attention = unet.qkv_attention_sdpa, ddpm.attention_sdpa
    try:
        yield
    finally:
        unet.qkv_attention, ddpm.attention = saved


@contextlib.contextmanager
def cudnn_mode(mode: str) -> Iterator[None]:
    """cuDNN as the script being measured sets it: ``deterministic`` (train.py's default
    ``--deterministic true``), ``benchmark`` (the DataElixir flow autotunes), ``default``
    (torch's: purification.py, train_diffusion.py). Only CUDA runs read these flags."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    if mode != "default":
        torch.backends.cudnn.deterministic = mode == "deterministic"
        torch.backends.cudnn.benchmark = mode == "benchmark"
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def synthetic_cifar10(root: Path, train: int = 1000, test: int = 500) -> Path:
    """Random images in CIFAR-10's ``cifar-10-batches-py`` layout (labels cycling 0..9), for a
    machine without CIFAR-10 (it cannot be downloaded there): the e2e runs and the device
    tests need images of the right shape, not real ones."""
    import pickle

    import numpy as np

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


# ------------------------------------------------------------------------------ 3. speed


@dataclass(frozen=True)
class Variant:
    precision: str  # fp32 | bf16
    attention: str | None  # einsum | sdpa; None: the model has no attention

    @property
    def label(self) -> str:
        return self.precision + (f" {self.attention}" if self.attention else "")


DIFFUSION_VARIANTS = [Variant(p, a) for a in ("einsum", "sdpa") for p in ("fp32", "bf16")]
CLASSIFIER_VARIANTS = [Variant("fp32", None), Variant("bf16", None)]


class Speed:
    """Times each workload in each variant, appending to ``report.measurements``."""

    def __init__(self, args: argparse.Namespace, dev: torch.device, scale: Scale, report: Report, t_start: float):
        from utils.precision import native_bf16

        self.args, self.dev, self.scale, self.report, self.t_start = args, dev, scale, report, t_start
        self.native_bf16, self.bf16_where = native_bf16(dev)
        self.skipped: list[str] = []
        self.errors: list[str] = []

    def measure(
        self,
        workload: str,
        computation: str,
        model: str,
        batch: int,
        unit: str,
        variants: list[Variant],
        per_call: Callable[[Variant], tuple[Callable[[], Any], float]],
        cudnn: str = "default",
    ) -> None:
        """``per_call(variant)`` -> (the timed function, the work it does per call);
        figure = work / median seconds. The policy's choice is the variant with the
        precision ``--precision auto`` resolves for ``computation`` and the models' own
        attention (einsum)."""
        from utils.precision import resolve_precision

        policy = resolve_precision("auto", self.dev, computation)
        for v in variants:
            row: dict[str, Any] = {
                "workload": workload,
                "computation": computation,
                "model": model,
                "batch": batch,
                "variant": v.label,
                "precision": v.precision,
                "attention": v.attention,
                "unit": unit,
                "value": None,
                "peak_mib": None,
                "reference": v.precision == "fp32" and v.attention in (None, "einsum"),
                "policy": v.precision == policy.name and v.attention in (None, "einsum"),
                "policy_reason": policy.line(computation),
                "cudnn": cudnn,
                "note": None,
            }
            self.report.measurements.append(row)
            if v.precision == "bf16" and not self.native_bf16:
                # emulated bf16 runs 25-125x slower: it would only burn the time budget
                row["note"] = self.bf16_where
                continue
            if time.perf_counter() - self.t_start > self.args.budget_s:
                row["note"] = f"time budget of {self.args.budget_s:.0f} s spent"
                self.skipped.append(f"{workload} {v.label}")
                continue
            if self.dev.type == "cuda":
                torch.cuda.synchronize(self.dev)
                torch.cuda.reset_peak_memory_stats(self.dev)
            try:
                with attention(v.attention or "einsum"), cudnn_mode(cudnn):
                    fn, work = per_call(v)
                    seconds = median_seconds(fn, self.dev, self.scale.warmup, self.scale.repeats)
            except Exception as e:  # e.g. out of memory in one variant: the others are still measured
                row["note"] = "failed: " + one_line(e, 200)
                self.errors.append(f"{workload} {v.label}: {one_line(e, 200)}")
                free_memory(self.dev)
                continue
            row["value"] = work / seconds
            if self.dev.type == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated(self.dev) / 2**20

    # -------------------------------------------------------------- workloads

    def purification(self) -> None:
        from utils.diffusion.factory import load_diffusion_spec
        from utils.diffusion.purify import noise_and_denoise

        s, dev = self.scale, self.dev
        spec = load_diffusion_spec(REPO / s.purify_config)
        torch.manual_seed(0)
        model = spec.build_model()
        for p in model.parameters():  # as bench_precision.py: a zero-initialised output layer is no UNet
            p.data.normal_(0, 0.02)
        model.to(dev).eval()
        base = spec.build_diffusion(respacing="")
        x = torch.rand(s.purify_batch, 3, 32, 32, device=dev) * 2 - 1
        g = torch.Generator(device=dev).manual_seed(0)

        def per_call(v: Variant) -> tuple[Callable[[], Any], float]:
            return (
                lambda: noise_and_denoise(model, base, x, PURIFY_STEPS, generator=g, bf16=v.precision == "bf16"),
                s.purify_batch * PURIFY_STEPS,
            )

        self.measure(
            "purification",
            "purification",
            f"ECLIPSE UNet ({s.purify_config})",
            s.purify_batch,
            "image-steps/s",
            DIFFUSION_VARIANTS,
            per_call,
        )

    def dataelixir(self) -> None:
        from utils.dataelixir.defence import build_chunk
        from utils.diffusion.factory import load_diffusion_spec

        s, dev = self.scale, self.dev
        spec = load_diffusion_spec(REPO / s.ddpm_config)
        torch.manual_seed(0)
        model = spec.build_model().to(dev).eval()  # random weights: speed only
        base = spec.build_diffusion(respacing="")
        x = torch.randint(0, 256, (s.ddpm_batch, 3, 32, 32), dtype=torch.uint8, device=dev)
        g = torch.Generator(device=dev).manual_seed(0)

        def per_call(v: Variant) -> tuple[Callable[[], Any], float]:
            def call() -> None:
                build_chunk(
                    model,
                    base,
                    x,
                    steps_T=DDPM_STEPS_T,
                    rounds_n=1,
                    last_steps_m=1,
                    respace=DDPM_RESPACE,
                    noise_offset=0,
                    generator=g,
                    bf16=v.precision == "bf16",
                )

            return call, s.ddpm_batch * DDPM_RESPACE

        self.measure(
            "dataelixir_candidates",
            "ddpm_rounds",
            f"DDPM ({s.ddpm_config})",
            s.ddpm_batch,
            "image-steps/s",
            DIFFUSION_VARIANTS,
            per_call,
            cudnn="benchmark",  # utils/dataelixir/flow.py turns autotuning on
        )

    def diffusion_training(self) -> None:
        from utils.diffusion.factory import load_diffusion_spec
        from utils.runtime import autocast

        s, dev = self.scale, self.dev
        spec = load_diffusion_spec(REPO / s.train_config)
        torch.manual_seed(0)
        model = spec.build_model().to(dev).train()
        diffusion = spec.build_diffusion(respacing="")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        params = list(model.parameters())
        ema = [p.detach().clone() for p in params]
        x0 = torch.rand(s.train_batch, 3, 32, 32, device=dev) * 2 - 1

        def per_call(v: Variant) -> tuple[Callable[[], Any], float]:
            bf16 = v.precision == "bf16"

            def iterations() -> None:
                # one iteration of utils/diffusion/training.py: forward, hybrid loss, AdamW, EMA
                for _ in range(s.train_steps):
                    t = torch.randint(0, diffusion.num_timesteps, (s.train_batch,), device=dev)
                    noise = torch.randn_like(x0)
                    with autocast(dev, bf16):
                        out = model(diffusion.q_sample(x0, t, noise), diffusion.model_timesteps(t))
                    terms = diffusion.training_losses(None, x0, t, noise=noise, model_output=out.float())
                    opt.zero_grad(set_to_none=True)
                    terms["loss"].mean().backward()
                    opt.step()
                    with torch.no_grad():
                        for e, p in zip(ema, params):
                            e.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)

            return iterations, s.train_steps

        self.measure(
            "diffusion_training",
            "diffusion_training",
            f"ECLIPSE UNet ({s.train_config})",
            s.train_batch,
            "iterations/s",
            DIFFUSION_VARIANTS,
            per_call,
        )

    def victim(self) -> None:
        from models import build_classifier
        from utils.augment import compensation_augment
        from utils.precision import prefer_channels_last
        from utils.runtime import to_channels_last
        from utils.trainer import TrainConfig, cross_entropy_step, prepare_batch

        s, dev = self.scale, self.dev
        torch.manual_seed(0)
        model = build_classifier("resnet18", 10, s.victim_width)
        channels_last = prefer_channels_last(dev)  # as train.py's default
        if channels_last:
            to_channels_last(model, dev)
        else:
            model.to(dev)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        n = 4 * s.victim_batch
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=dev)
        labels = torch.randint(0, 10, (n,), device=dev)
        augment = compensation_augment(0.4, 0.05)  # train.py --pure's augmentation, on the device
        g = torch.Generator(device=dev).manual_seed(0)

        def per_call(v: Variant) -> tuple[Callable[[], Any], float]:
            step = cross_entropy_step(model, opt, TrainConfig(precision=v.precision), dev)

            def steps() -> None:
                for i in range(s.train_steps):
                    j = (i % 4) * s.victim_batch
                    x = prepare_batch(augment(images[j : j + s.victim_batch], g), dev, channels_last)
                    step(x, labels[j : j + s.victim_batch])

            return steps, s.train_steps * s.victim_batch

        self.measure(
            "victim_training",
            "victim",
            f"ResNet18 width {s.victim_width}" + (", channels_last" if channels_last else ""),
            s.victim_batch,
            "images/s",
            CLASSIFIER_VARIANTS,
            per_call,
            cudnn="deterministic",  # train.py --deterministic true (its default)
        )


def part_speed(args: argparse.Namespace, dev: torch.device, scale: Scale, report: Report, t_start: float) -> str:
    need_device(dev)
    speed = Speed(args, dev, scale, report, t_start)
    errors = speed.errors
    for workload in (speed.purification, speed.dataelixir, speed.diffusion_training, speed.victim):
        try:
            workload()
        except Exception as e:  # an OOM in one workload leaves the others to measure
            errors.append(f"{workload.__name__}: {one_line(e)}")
        finally:
            free_memory(dev)
    if errors:
        raise CheckFailed("; ".join(errors))
    if speed.skipped:
        raise CheckFailed(f"--budget_s {args.budget_s:.0f} spent; not measured: {', '.join(speed.skipped)}")
    rows = [m for m in report.measurements if m["policy"] and m["value"]]
    return "; ".join(f"{m['workload']} {_fmt(m['value'])} {m['unit']} ({m['variant']})" for m in rows)


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
    return "; ".join(f"{j['key']} {_hours(j['policy']['seconds'])}" for j in report.projections)


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
