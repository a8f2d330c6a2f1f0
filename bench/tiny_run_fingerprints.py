"""Fingerprints of a tiny end-to-end run of every script: proof that a refactor did not
change results.

Runs, in a fresh temporary work dir, a tiny run of train_diffusion.py (ECLIPSE UNet and
DDPM), poison.py (every poison of ``poison.py --list``), purification.py, train.py (clean,
poisoned without defence, --defense grayscale / jpeg, --pure), every attack/*.py (the
DataElixir flow) and demo.py, each as a subprocess from the repository root with one
thread, fixed seeds and no downloads. Then hashes what each case wrote (files new or
changed since the case started), keyed ``<case>/<path relative to the work dir>``:

- tensors in .pt/.pth/.ckpt (``torch.load(weights_only=True)``), arrays in .npz
  (``allow_pickle=False``) and the (image bytes, label) lists in .pkl (a restricted
  unpickler) by content: every leaf's key path, dtype, shape and bytes, keys sorted, so the
  container (zip layout, pickle protocol) does not matter;
- .json / .csv / .yaml / .md / .txt as text after dropping the fields named by DROPPED_KEYS
  and DROPPED_ENDINGS (wall times, speeds, dates, host and device info) and writing the
  work dir and the repository as ``<WORK>`` / ``<REPO>`` (paths differ between runs); the
  same keys are dropped and paths replaced in the dicts and strings inside torch files;
- every other file (PNGs, raw stores such as candidates.u8) by its bytes; logs (LOG_SUFFIXES)
  are ignored.

Usage:
  python bench/tiny_run_fingerprints.py --write bench/tiny_run_fingerprints.baseline.json
  python bench/tiny_run_fingerprints.py --compare bench/tiny_run_fingerprints.baseline.json
  python bench/tiny_run_fingerprints.py --compare BASELINE --only 'attack_*'   # a subset
``--compare`` prints one line per differing / missing / new output and exits 1 on any
difference, 0 when identical. ``--only`` takes fnmatch patterns (comma-separated) of case
names (``--list`` shows them); the cases a selected case needs (its diffusion model, its
poisoned set) run too. The bytes are machine-specific (CPU kernels, torch version): compare
only against a baseline recorded on the same machine and torch.

Determinism: two full runs at the pre-refactor commit 923672c give identical fingerprints
once (a) the wall times inside results AND inside torch files (training histories in
checkpoints carry ``seconds`` / ``images_per_s``) are dropped, and (b) the global RNGs are
seeded before each script starts (SEEDED_RUN): ``poison.py --poison ADP`` draws its
classifier head from torch's unseeded global generator and otherwise crafts different
images on every run. Everything else was bit-identical run to run with one thread.

The script imports nothing of the project, so it runs unchanged against the old and the
refactored code; the tiny settings of poison.py's EM/TAP and of the attack flow are read
(not imported) from tests/test_poison_cli.py and tests/test_attack_cli.py, with the
overrides below to make them smaller. Run time: about 8 minutes when the 2-core AMD EPYC
machine is quiet, 19-23 minutes when it is loaded (load average ~15); ``--only`` for less.
"""

from __future__ import annotations

import argparse
import ast
import csv
import fnmatch
import hashlib
import io
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# fields whose values are wall times, dates, hosts or devices: dropped (at any depth) from
# .json / .yaml / .csv and from the dicts inside torch files before hashing; besides these
# names, every key ending in DROPPED_ENDINGS (crafting_seconds, images_per_s, total_s, ...)
DROPPED_KEYS = frozenset({"timings", "created", "device", "torch"})
DROPPED_ENDINGS = ("seconds", "_s")
# endings of files never hashed (logs and lock files carry times and PIDs; the demo's step_seconds.json wall times)
LOG_SUFFIXES = (".log", ".lock", ".err", ".out", "_seconds.json")
TEXT_SUFFIXES = (".json", ".csv", ".yaml", ".yml", ".md", ".txt")
TENSOR_SUFFIXES = (".pt", ".pth", ".ckpt")


# --------------------------------------------------------------------------- hashing


def _leaf_bytes(obj: Any) -> tuple[str, bytes]:
    """(type tag, bytes) of one leaf value."""
    import numpy as np

    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the project
        torch = None
    if torch is not None and isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: view the bits
            raw = t.view(torch.int16).numpy().tobytes()
        else:
            raw = t.numpy().tobytes()
        return f"tensor:{t.dtype}:{tuple(t.shape)}", raw
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return f"ndarray:{a.dtype.str}:{a.shape}", a.tobytes()
    if isinstance(obj, (bytes, bytearray)):
        return "bytes", bytes(obj)
    if isinstance(obj, np.generic):
        return f"np:{obj.dtype.str}", obj.tobytes()
    return type(obj).__name__, repr(obj).encode()


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, leaf) pairs of nested dicts / lists / tuples."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            yield from _flatten(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        yield f"{prefix}#len", len(obj)
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def hash_structure(obj: Any) -> str:
    """sha256 of every leaf's key path, type, shape and bytes, dict keys sorted."""
    h = hashlib.sha256()
    for key, leaf in _flatten(obj):
        tag, raw = _leaf_bytes(leaf)
        h.update(f"{key}\0{tag}\0{len(raw)}\0".encode())
        h.update(raw)
    return h.hexdigest()


class _DataUnpickler(pickle.Unpickler):
    """Plain containers and numpy arrays only (what ECLIPSE's .pkl files hold)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} not allowed")
        return super().find_class(module, name)


def is_dropped(key: Any) -> bool:
    return isinstance(key, str) and (key in DROPPED_KEYS or key.endswith(DROPPED_ENDINGS))


def normalise(obj: Any, subst: dict[str, str]) -> Any:
    """obj without the dropped keys, with the paths in subst replaced in its strings; a
    string holding a JSON object (the attack flow stores its info so) is normalised too."""
    if isinstance(obj, dict):
        return {k: normalise(v, subst) for k, v in obj.items() if not is_dropped(k)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(normalise(v, subst) for v in obj)
    if isinstance(obj, str):
        for old, new in subst.items():
            obj = obj.replace(old, new)
        if obj[:1] in ("{", "["):
            try:
                return json.dumps(normalise(json.loads(obj), subst), sort_keys=True)
            except ValueError:
                pass
    return obj


def normalise_text(path: Path, text: str, subst: dict[str, str]) -> str:
    """The text of a results file with DROPPED_KEYS removed and the paths in subst replaced."""
    for old, new in subst.items():
        text = text.replace(old, new)
    suffix = path.suffix
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except ValueError:
            return text
        return json.dumps(normalise(obj, subst), sort_keys=True)
    if suffix in (".yaml", ".yml"):
        try:
            import yaml

            obj = yaml.safe_load(text)
        except Exception:
            return text
        return json.dumps(normalise(obj, subst), sort_keys=True, default=repr)
    if suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return text
        keep = [i for i, name in enumerate(rows[0]) if not is_dropped(name)]
        return "\n".join(",".join(r[i] for i in keep if i < len(r)) for r in rows)
    return text


def hash_file(path: Path, subst: dict[str, str] | None = None) -> str | None:
    """Content hash of one output file; None for a file that is not hashed (logs)."""
    subst = subst or {}
    name = path.name
    if name.endswith(LOG_SUFFIXES):
        return None
    suffix = path.suffix
    if suffix in TENSOR_SUFFIXES:
        import torch

        try:
            return hash_structure(normalise(torch.load(path, map_location="cpu", weights_only=True), subst))
        except Exception:
            pass  # not a torch file (or not weights-only): its bytes
    elif suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as z:
                return hash_structure({k: z[k] for k in z.files})
        except (ValueError, OSError, zipfile.BadZipFile):
            pass
    elif suffix == ".pkl":
        try:
            with open(path, "rb") as f:
                return hash_structure(normalise(_DataUnpickler(f).load(), subst))
        except Exception:
            pass
    elif suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            pass
        else:
            return hashlib.sha256(normalise_text(path, text, subst).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the cases


def _literal(test_file: str, name: str) -> Any:
    """A module-level literal of a test file, read without importing it (the tests import
    project modules a refactor may move)."""
    tree = ast.parse((REPO / test_file).read_text())
    known: dict[str, Any] = {}  # earlier module-level literals, which a later one may name

    class _Inline(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:  # noqa: N802 - ast's name
            return ast.Constant(known[node.id]) if node.id in known else node

    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                known[node.targets[0].id] = ast.literal_eval(_Inline().visit(node.value))
            except ValueError:
                continue
    if name not in known:
        raise SystemExit(f"{test_file}: no literal {name}")
    return known[name]


@dataclass
class Case:
    name: str
    argv: Callable[[Path], list[str]]  # script and arguments, given the work dir
    needs: list[str] = field(default_factory=list)


def _flags(d: dict[str, Any]) -> list[str]:
    return [a for k, v in d.items() for a in (f"--{k}", str(v))]


ECLIPSE_CFG = "config/eclipse/cpu.yml"
DDPM_CFG = "config/ddpm/cpu.yml"
SPARSE = "tiny"  # the ECLIPSE sparse set's run name
DIFF_ITERS = 2
ECLIPSE_CKPT = f"ema_0.999_{DIFF_ITERS}.pt"
SUBSET = 20  # images poisoned / trained on by the ECLIPSE cases
PURE_T = 4


def _train_diffusion(cfg: str, sparse: str, source: str) -> Callable[[Path], list[str]]:
    def argv(w: Path) -> list[str]:
        flags = f"--config {cfg} --source {source} --num_clean 10 --replicas 2 --sparse_set {sparse} --iterations"
        flags += f" {DIFF_ITERS} --batch_size 4 --ema_rate 0.999 --save_interval {DIFF_ITERS} --log_interval 1"
        return ["train_diffusion.py", *flags.split(), "--max_timestep", "20", "--device", "cpu", "--work_dir", str(w)]

    return argv


def _poison_flags() -> dict[str, list[str]]:
    em = _literal("tests/test_poison_cli.py", "EM_TINY")
    tap = _literal("tests/test_poison_cli.py", "TAP_TINY")
    small = ["--width", "2"]  # after the tests' flags: the later value wins
    return {
        "EM": em + small,
        "TAP": tap + small,
        "REM": ["--width", "2", "--steps", "2", "--lr_decay_every", "1", "--pgd_steps", "1", "--samples", "1",
                "--adv_steps", "1", "--adv_step", "2", "--step_size", "4", "--train_batch", "10", "--batch_size", "10"],
        "SEP": ["--width", "2", "--epochs", "2", "--milestones", "1", "--checkpoints", "2", "--pgd_steps", "2",
                "--train_batch", "10", "--batch_size", "10"],
        "EFP": ["--width", "2", "--epochs", "2", "--milestones", "1", "--adv_steps", "1", "--adv_step", "2",
                "--pgd_steps", "2", "--step_size", "2", "--train_batch", "10", "--batch_size", "10"],
        "URP": [],
        "LSP": [],
        "AR": [],
        "ADP": ["--diff_config", "cpu.yml", "--sparse_set", SPARSE, "--sparse_diff_model", ECLIPSE_CKPT,
                "--pgd_steps", "1", "--step_size", "2", "--train_steps", "1", "--train_batch", "10",
                "--batch_size", "10", "--max_rounds", "1"],
        "OPS": [],
        "CUDA": [],
    }  # fmt: skip


POISON_LIST = ["EM", "TAP", "REM", "SEP", "EFP", "URP", "LSP", "AR", "ADP", "OPS", "CUDA"]


def _poison_case(name: str, flags: list[str]) -> Case:
    def argv(w: Path) -> list[str]:
        common = f"--poison {name} --subset {SUBSET} --threads 1 --no_progress".split()
        return ["poison.py", *common, "--work_dir", str(w), *flags]

    return Case(f"poison_{name}", argv, ["diffusion_eclipse"] if name == "ADP" else [])


def _train_case(name: str, flags: list[str], needs: list[str]) -> Case:
    def argv(w: Path) -> list[str]:
        common = "--arch resnet18 --width 2 --epochs 1 --batch_size 10 --test_subset 50 --device cpu".split()
        return ["train.py", *flags, *common, "--work_dir", str(w), "--run_name", name]

    return Case(name, argv, needs)


ATTACKS = ["badnet", "blended", "ftrojan", "inputaware", "lc", "lf", "sig", "ssba", "wanet"]
# the auxiliary models' settings of the attacks that train one, at their smallest
ATTACK_EXTRA = {
    "lc": {"aux_width": 2, "aux_epochs": 1, "aux_subset": 50, "at_steps": 1, "adv_steps": 2},
    "lf": {"aux_width": 2, "aux_epochs": 1, "aux_subset": 50, "lf_max_passes": 1, "lf_max_iter_df": 2},
    "ssba": {"aux_width": 2, "aux_epochs": 1, "aux_subset": 50},
    "inputaware": {"aux_width": 2, "gen_width": 2, "aux_epochs": 1, "mask_epochs": 1, "aux_subset": 50},
}
DDPM_SET = "ddpm_tiny"
PURIFY = (
    f"--poison URP --config {ECLIPSE_CFG} --sparse_set {SPARSE} --sparse_diff_model {ECLIPSE_CKPT} --t {PURE_T}"
    " --respace 2 --batch_size 8 --device cpu"
)
# every step of the CPU-scale recipe at its smallest; the clean and ISS victims are train.py cases
DEMO = (
    f"--poisons URP --skip_clean --subset {SUBSET} --diffusion_iterations 1 --diffusion_batch 4"
    " --diffusion_max_timestep 10 --t 3 --respace 2 --width 2 --epochs 1"
)


def _attack_case(name: str) -> Case:
    def argv(w: Path) -> list[str]:
        tiny = _literal("tests/test_attack_cli.py", "TINY")
        over = {"subset": 100, "test_subset": 50, "model_width": 2, "steps_T": 10, "purify_respace": 2,
                "diffusion_ckpt": f"diff_ckpt/cifar10/{DDPM_SET}/ema_0.999_{DIFF_ITERS}.pt",
                **ATTACK_EXTRA.get(name, {})}  # fmt: skip
        cfg = {**tiny, **over}
        return [f"attack/{name}.py", "--yaml_path", f"config/{name}/cifar10.yaml", "--save_folder_name", name,
                "--work_dir", str(w), *_flags(cfg)]  # fmt: skip

    return Case(f"attack_{name}", argv, ["diffusion_ddpm"])


def build_cases() -> list[Case]:
    cases = [
        Case("diffusion_eclipse", _train_diffusion(ECLIPSE_CFG, SPARSE, "test")),
        Case("diffusion_ddpm", _train_diffusion(DDPM_CFG, DDPM_SET, "train")),
    ]
    flags = _poison_flags()
    cases += [_poison_case(p, flags[p]) for p in POISON_LIST]
    cases.append(
        Case(
            "purification_URP",
            lambda w: ["purification.py", *PURIFY.split(), "--work_dir", str(w)],
            ["diffusion_eclipse", "poison_URP"],
        )
    )
    cases += [
        _train_case("train_clean", ["--poison", "clean", "--subset", str(SUBSET)], []),
        _train_case("train_URP_none", ["--poison", "URP"], ["poison_URP"]),
        _train_case("train_URP_grayscale", ["--poison", "URP", "--defense", "grayscale"], ["poison_URP"]),
        _train_case("train_URP_jpeg", ["--poison", "URP", "--defense", "jpeg"], ["poison_URP"]),
        _train_case(
            "train_URP_pure",
            ["--poison", "URP", "--pure", "--sparse_set", SPARSE, "--t", str(PURE_T), "--iter", str(DIFF_ITERS)],
            ["purification_URP"],
        ),
    ]
    cases += [_attack_case(a) for a in ATTACKS]
    cases.append(
        Case(
            "demo",
            lambda w: ["demo.py", *DEMO.split(), "--work_dir", str(w / "demo")],
        )
    )
    return cases


def select(cases: list[Case], patterns: list[str] | None) -> tuple[list[Case], set[str]]:
    """The cases to run (selected ones plus what they need, in order) and the selected names."""
    if not patterns:
        return cases, {c.name for c in cases}
    by_name = {c.name: c for c in cases}
    chosen = {c.name for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)}
    if not chosen:
        raise SystemExit(f"--only {','.join(patterns)} matches no case; cases: {', '.join(by_name)}")
    todo, stack = set(), list(chosen)
    while stack:
        n = stack.pop()
        if n not in todo:
            todo.add(n)
            stack += by_name[n].needs
    return [c for c in cases if c.name in todo], chosen


# --------------------------------------------------------------------------- running


def _snapshot(work: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in work.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(work).as_posix()] = (st.st_mtime_ns, st.st_size)
    return out


# runs a script as `python SCRIPT ARGS` would (its folder first on sys.path, __main__), with
# the global RNGs seeded first: ADP's classifier head (models/unet_classifier.py, a fresh
# nn.Conv2d) draws from torch's unseeded global generator, so without this two runs of
# `poison.py --poison ADP` craft different images
SEEDED_RUN = """
import os, random, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(script))
import numpy, torch
random.seed(0)
numpy.random.seed(0)
torch.manual_seed(0)
runpy.run_path(script, run_name="__main__")
"""


def _env() -> dict[str, str]:
    env = {**os.environ}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CIFAR10_DOWNLOAD="0",
        DDPM_DOWNLOAD="0",
        PYTHONHASHSEED="0",
        PYTHONWARNINGS="ignore",
    )
    return env


def run_cases(cases: list[Case], work: Path, verbose: bool) -> dict[str, Any]:
    """Run the cases in order in work; returns {"status": {...}, "hashes": {...}, "seconds": {...}}."""
    subst = {str(work): "<WORK>", str(REPO): "<REPO>", sys.executable: "<PYTHON>"}
    status: dict[str, int] = {}
    hashes: dict[str, str] = {}
    seconds: dict[str, float] = {}
    logs = work.parent / "logs"
    logs.mkdir(exist_ok=True)
    total = time.time()
    for k, case in enumerate(cases, 1):
        failed = [n for n in case.needs if status.get(n, 0) != 0]
        if failed:
            status[case.name] = -1
            print(f"[{k}/{len(cases)}] {case.name}: skipped ({', '.join(failed)} failed)", flush=True)
            continue
        before = _snapshot(work)
        cmd = [sys.executable, "-c", SEEDED_RUN, *case.argv(work)]
        t0 = time.time()
        with open(logs / f"{case.name}.txt", "w") as log:
            res = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        seconds[case.name] = round(time.time() - t0, 1)
        status[case.name] = res.returncode
        after = _snapshot(work)
        changed = sorted(p for p, st in after.items() if before.get(p) != st)
        n = 0
        for rel in changed:
            h = hash_file(work / rel, subst)
            if h is not None:
                hashes[f"{case.name}/{rel}"] = h
                n += 1
        note = "" if res.returncode == 0 else f"  EXIT {res.returncode} (log: {logs / (case.name + '.txt')})"
        print(f"[{k}/{len(cases)}] {case.name}: {seconds[case.name]:.1f} s, {n} outputs{note}", flush=True)
        if res.returncode != 0:  # the log goes with the temporary folder: show its end now
            tail = (logs / f"{case.name}.txt").read_text().splitlines()[-(200 if verbose else 15) :]
            print("\n".join("    " + line for line in tail), flush=True)
    print(f"total {time.time() - total:.0f} s", flush=True)
    return {"status": status, "hashes": hashes, "seconds": seconds}


def machine() -> str:
    from common import machine as benchmark_machine  # bench/common.py, beside this script

    m = benchmark_machine()
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, python {platform.python_version()}"


# this tool's own files: the commit recorded is the last one that changed anything else
OWN_FILES = ("bench/tiny_run_fingerprints.py", "bench/tiny_run_fingerprints.baseline.json", "BENCHMARKS.md",
             "tests/test_tiny_run_fingerprints.py")  # fmt: skip


def commit() -> str:
    """The last commit of the code that ran, '+dirty' with uncommitted changes to it."""
    exclude = [f":(exclude){f}" for f in OWN_FILES]
    git = ["git", "-C", str(REPO)]
    res = subprocess.run([*git, "log", "-1", "--format=%h", "--", ".", *exclude], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "--", ".", *exclude], capture_output=True, text=True)
    return (res.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def compare(base: dict[str, Any], new: dict[str, Any], selected: set[str]) -> list[str]:
    """One line per difference between two results, restricted to the selected cases."""

    def case_of(key: str) -> str:
        return key.split("/", 1)[0]

    lines = []
    for name in sorted(selected):
        a, b = base["status"].get(name), new["status"].get(name)
        if a != b:
            lines.append(f"status  {name}: baseline {a}, now {b}")
    old = {k: v for k, v in base["hashes"].items() if case_of(k) in selected}
    cur = {k: v for k, v in new["hashes"].items() if case_of(k) in selected}
    for key in sorted(old.keys() | cur.keys()):
        if key not in cur:
            lines.append(f"missing {key}")
        elif key not in old:
            lines.append(f"new     {key}")
        elif old[key] != cur[key]:
            lines.append(f"differs {key}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--write", metavar="FILE", help="run every (selected) case and record the fingerprints in FILE")
    ap.add_argument("--compare", metavar="FILE", help="run and compare with FILE; exit 1 on any difference")
    ap.add_argument("--only", metavar="PATTERNS", help="comma-separated fnmatch patterns of case names")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR (kept) instead of a deleted temporary folder")
    ap.add_argument("--verbose", action="store_true", help="print 200 lines, not 15, of a failed case's log")
    args = ap.parse_args(argv)
    cases = build_cases()
    if args.list:
        for c in cases:
            print(c.name + (f"  (needs {', '.join(c.needs)})" if c.needs else ""))
        return 0
    if not (args.write or args.compare):
        ap.error("give --write FILE or --compare FILE (or --list)")
    todo, selected = select(cases, args.only.split(",") if args.only else None)
    if args.keep:
        root = Path(args.keep).resolve()
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        tmp = None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="fingerprints-")
        root = Path(tmp.name)
    try:
        work = root / "work"
        work.mkdir()
        result = run_cases(todo, work, args.verbose)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["selected"] = sorted(selected)
    code = 0
    if args.compare:
        base = json.loads(Path(args.compare).read_text())
        lines = compare(base, result, selected)
        for line in lines:
            print(line)
        n_keys = sum(1 for k in result["hashes"] if k.split("/", 1)[0] in selected)
        print(f"{len(lines)} difference(s) in {len(selected)} case(s), {n_keys} outputs" if lines else
              f"identical: {len(selected)} case(s), {n_keys} outputs")  # fmt: skip
        code = 1 if lines else 0
    if args.write:
        out = {"commit": commit(), "machine": machine(), **result}
        Path(args.write).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.write}")
    return code


if __name__ == "__main__":
    sys.exit(main())
