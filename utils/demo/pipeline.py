"""The CPU-scale ECLIPSE pipeline as a list of steps (``demo.py``).

Each :class:`DemoCommand` is one command a user would run (``train_diffusion.py``, ``poison.py``,
``purification.py``, ``train.py``), with the steps it waits for. :func:`build_commands` makes
them from the recipe (``config/eclipse_cpu.yaml``); :func:`run_commands` runs those whose
output does not exist yet, up to ``jobs`` at a time in dependency order; :func:`summarise`
reads every finished victim back into a table of mean ± std over seeds.

Their outputs are the scripts' own (each script resumes and refuses other settings), so a
step counts as done when its script's result file exists and was made with this demo's
settings (``utils.demo.stored``: other settings are refused, or redone with ``--overwrite``):
an interrupted demo resumes where it stopped, and demo processes with disjoint ``--poisons``
may share a work dir. Wall times of finished steps accumulate in ``<work>/step_seconds.json``.
Each step runs in its own process group; an interrupted demo (SIGINT, SIGTERM) interrupts
its running steps and waits for them, so none is left holding its output's lock.
"""

from __future__ import annotations

import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from utils.baselines.keys import DEFENSE_KEYS, DEFENSE_OPTIONS
from utils.datasets import get_dataset
from utils.demo.recipe import defense_flags, poison_flags
from utils.demo.step_costs import UnitCosts, is_rough, step_minutes, step_threads
from utils.demo.stored import Stored
from utils.diffusion.checkpoints import checkpoint_name, resolve_checkpoint
from utils.fileio import atomic_write_json, read_state_json
from utils.paths import REPO_ROOT, diff_ckpt_dir, poisoned_file, purified_file
from utils.plots import pyplot, save_figure
from utils.poisons import POISONS

SPARSE_SET = "test2000ps8000"
# columns of the table: run suffix -> (header, train.py flags)
VARIANTS = {
    "none": ("no defence", []),
    "issg": ("ISS-G", ["--defense", "grayscale"]),
    "issj": ("ISS-J", ["--defense", "jpeg"]),
    "at": ("AT", ["--defense", "at"]),  # PGD adversarial training; its CPU flags: the recipe's defense_flags
    "cutout": ("Cutout", ["--defense", "cutout"]),
    "mixup": ("Mixup", ["--defense", "mixup"]),
    "cutmix": ("CutMix", ["--defense", "cutmix"]),
    "op": ("OP", ["--defense", "op"]),  # Orthogonal Projection
    "eclipse": ("ECLIPSE", ["--pure"]),
}
STATUS_EVERY_S = 300.0  # a status line while steps run in parallel (their output goes to logs)
STOP_GRACE_S = 60.0  # an interrupted step's time to save its work and exit before it is killed
CIFAR10_TRAIN_IMAGES = 50_000


@dataclass
class DemoCommand:
    key: str  # unique name; step_seconds.json and logs/<key>.log use it
    title: str
    cmd: list[str]
    minutes: float | None  # expected wall time on this machine (None: not estimated)
    done: bool  # its output exists, so it is skipped
    after: tuple[str, ...] = field(default_factory=tuple)  # keys of the steps it needs
    stored: Stored | None = None  # where its script stored the settings of its output


def victim_name(poison: str, variant: str | None, seed: int) -> str:
    """train.py run name of a demo victim; seed 0 keeps the single-seed demo's names
    (``poison`` '' is the clean subset: ``demo-clean``, with an optional column ``demo-clean-at``)."""
    if not poison:
        base = "demo-clean" if variant in (None, "none") else f"demo-clean-{variant}"
    else:
        base = f"demo-{poison}-{variant}"
    return base if seed == 0 else f"{base}-s{seed}"


def victim_result(work: Path, name: str) -> Path:
    return work / "runs" / "train" / name / "result.json"


def _flag_values(cmd: list[str], names: dict[str, str]) -> dict[str, Any]:
    """``{stored key: value}`` of the ``--flag value`` pairs in ``cmd`` named in ``names``
    (flag -> stored key); a flag without a value is True."""
    out = {}
    for i, word in enumerate(cmd):
        if word.startswith("--") and word[2:] in names:
            value = cmd[i + 1] if i + 1 < len(cmd) and not cmd[i + 1].startswith("--") else True
            out[names[word[2:]]] = value
    return out


_VICTIM_KEYS = ("arch", "width", "epochs", "schedule", "weight_decay", "poison", "subset", "test_subset", "t", "iter")
# every defence's own options (train.py stores them only with that defence, so a victim of
# another defence holds none of them and is not compared on them); read from their one
# declaration, so a defence added there is compared here too
_DEFENSE_OPTION_KEYS = tuple(k for keys in DEFENSE_KEYS.values() for k in keys)


def _victim_values(cmd: list[str], seed: int) -> dict[str, Any]:
    """What ``train.py`` will store for the victim command ``cmd``: its flags, and for its
    defence's options that ``cmd`` leaves out train.py's defaults (a recipe that drops a flag
    still differs from a victim made with it)."""
    values = {"seed": seed, "pure": "--pure" in cmd, "defense": "none", "subset": None, "test_subset": None}
    values |= _flag_values(cmd, {k: k for k in (*_VICTIM_KEYS, *_DEFENSE_OPTION_KEYS, "defense")})
    for key in DEFENSE_KEYS.get(str(values["defense"]), ()):
        values.setdefault(key, DEFENSE_OPTIONS[key].default)
    return values


def _dataset_of(args: Any) -> tuple[str, list[str], str]:
    """The demo's dataset, the flag every step gets for it (none for CIFAR-10, whose commands
    stay as they were) and the CPU-scale UNet config of its image size."""
    dataset = getattr(args, "dataset", "cifar10")
    flags = [] if dataset == "cifar10" else ["--dataset", dataset]
    return (
        dataset,
        flags,
        "config/eclipse/cpu.yml" if get_dataset(dataset).image_size == 32 else "config/eclipse/cpu_64.yml",
    )


def _diffusion_step(
    args: Any, work: Path, py: str, unet_config: str, on_dataset: list[str], minutes: float | None
) -> DemoCommand:
    """The demo's first step: the sparse diffusion model (its stored training settings compared)."""
    it, dataset = args.diffusion_iterations, getattr(args, "dataset", "cifar10")
    ckpt = checkpoint_name("ema", it, args.diffusion_ema)
    return DemoCommand(
        "diffusion",
        f"sparse diffusion model ({it} iterations)",
        [py, "train_diffusion.py", "--config", unet_config, "--iterations", str(it)]
        + ["--batch_size", str(args.diffusion_batch), "--max_timestep", str(args.diffusion_max_timestep)]
        + ["--ema_rate", str(args.diffusion_ema), "--save_interval", "500", "--work_dir", str(work), *on_dataset],
        minutes,
        resolve_checkpoint(diff_ckpt_dir(work, SPARSE_SET, dataset) / ckpt).is_file(),
        stored=Stored(
            (diff_ckpt_dir(work, SPARSE_SET, dataset) / "run.json",),
            {
                "training.batch_size": args.diffusion_batch,
                "training.max_timestep": args.diffusion_max_timestep,
                "training.ema_rate": args.diffusion_ema,
            },
        ),
    )


def build_commands(
    args: Any,
    poisons: Sequence[str],
    variants: Sequence[str],
    py: str = sys.executable,
    costs: UnitCosts | None = None,
) -> list[DemoCommand]:
    """Every step of the demo for ``args`` (the recipe's keys, ``work_dir``, ``seeds``,
    ``skip_clean``); with ``costs`` (measured here, ``utils.demo.step_costs``) each step's
    expected minutes."""

    def expected(kind: str, poison: str = "", flags: str = "") -> float | None:
        return None if costs is None else step_minutes(kind, args, costs, poison, flags)

    work = Path(args.work_dir)
    it = args.diffusion_iterations
    dataset, on_dataset, unet_config = _dataset_of(args)
    test_subset = getattr(args, "test_subset", None)
    diff_ckpt = checkpoint_name("ema", it, args.diffusion_ema)
    victim_flags = ["--arch", args.arch, "--width", str(args.width), "--epochs", str(args.epochs)]
    victim_flags += ["--schedule", args.schedule, "--weight_decay", str(args.weight_decay), "--work_dir", str(work)]
    victim_flags += (["--test_subset", str(test_subset)] if test_subset else []) + on_dataset

    def victim(name: str, title: str, flags: list[str], seed: int, after: tuple[str, ...]) -> DemoCommand:
        seed_flags = ["--seed", str(seed)] if seed else []
        cmd = [py, "train.py", *flags, *victim_flags, *seed_flags, "--run_name", name]
        title += f", seed {seed}" if args.seeds > 1 else ""
        result = victim_result(work, name)
        stored = Stored((result, result.with_name("settings.json")), _victim_values(cmd, seed), ("settings", None))
        return DemoCommand(name, title, cmd, expected("victim", flags=" ".join(flags)), result.is_file(), after, stored)

    diffusion = _diffusion_step(args, work, py, unet_config, on_dataset, expected("diffusion"))
    steps = [diffusion]
    seeds = range(args.seeds)

    def purify_step(poison: str, subset: list[str], after: tuple[str, ...]) -> DemoCommand:
        """ECLIPSE's stage 1 on ``poison`` (``clean`` with ``subset``: the clean subset)."""
        purified = purified_file(work, SPARSE_SET, args.t, it, poison, dataset)
        drawn = {"subset": args.subset} if subset else {}  # the clean images it purified
        return DemoCommand(
            f"{poison} purification",
            f"purify {'the clean subset' if subset else poison} (ECLIPSE stage 1)",
            [py, "purification.py", "--poison", poison, *subset, "--config", unet_config]
            + ["--sparse_diff_model", diff_ckpt, "--t", str(args.t), "--respace", str(args.respace)]
            + ["--work_dir", str(work), *on_dataset],
            expected("purification"),
            purified.is_file(),
            ("diffusion", *after),
            Stored((purified.with_suffix(".json"),), {"t": args.t, "respace": args.respace, **drawn}),
        )

    if not args.skip_clean:
        clean = ["--poison", "clean", "--subset", str(args.subset)]
        steps += [victim(victim_name("", None, s), "victim on the clean subset", clean, s, ()) for s in seeds]
        # what each defence costs on clean data: the optional columns always, the others with --clean_costs
        costed = [v for v in variants if v in OPTIONAL_COLUMNS or (getattr(args, "clean_costs", False) and v != "none")]
        for v in costed:
            flags, after = [*clean, *VARIANTS[v][1], *defense_flags(v)], ()
            if v == "eclipse":
                purify = purify_step("clean", clean[2:], ())
                steps.append(purify)
                flags, after = ["--poison", "clean", "--pure", "--t", str(args.t), "--iter", str(it)], (purify.key,)
            title = f"victim on the clean subset, {VARIANTS[v][0]}"
            steps += [victim(victim_name("", v, s), title, flags, s, after) for s in seeds]
    for poison in poisons:
        flags = poison_flags(poison, bool(getattr(args, "tiny", False)))
        craft_cmd = [py, "poison.py", "--poison", poison, "--subset", str(args.subset), "--work_dir", str(work)]
        craft_cmd += flags.split() + on_dataset
        craft_after: tuple[str, ...] = ()
        if "sparse_diff_model" in POISONS[poison].defaults:  # the adaptive attack crafts through our UNet
            craft_cmd += ["--sparse_diff_model", diff_ckpt]
            craft_after = ("diffusion",)
        rough = " (rough estimate)" if costs is not None and is_rough(poison, flags, args.subset) else ""
        crafted = {"n_images": min(args.subset, CIFAR10_TRAIN_IMAGES) if dataset == "cifar10" else args.subset}
        crafted |= _flag_values(flags.split(), {"arch": "surrogate_arch", "width": "surrogate_width"})
        craft = DemoCommand(
            f"{poison} poison",
            f"craft {poison} on {args.subset} images{rough}",
            craft_cmd,
            expected("poison", poison, flags),
            poisoned_file(work, poison, dataset).is_file(),
            craft_after,
            Stored((poisoned_file(work, poison, dataset).with_suffix(".json"),), crafted),
        )
        purify = purify_step(poison, [], (craft.key,))
        steps += [craft, purify]
        for s in seeds:
            for v in variants:
                flags = ["--poison", poison, *VARIANTS[v][1], *defense_flags(v)]
                flags += ["--t", str(args.t), "--iter", str(it)] if v == "eclipse" else []
                after = (purify.key,) if v == "eclipse" else (craft.key,)
                title = f"victim on {poison}, {VARIANTS[v][0]}"
                steps.append(victim(victim_name(poison, v, s), title, flags, s, after))
    return _needed(steps)


def _needed(steps: list[DemoCommand]) -> list[DemoCommand]:
    """``steps`` without the purifications and the diffusion model that no other step waits
    for (a demo of the baselines alone, ``--defenses none,at``, skips ECLIPSE's stage 1)."""
    wanted = {a for s in steps if not s.key.endswith(" purification") for a in s.after}
    steps = [s for s in steps if not s.key.endswith(" purification") or s.key in wanted]
    wanted = {a for s in steps for a in s.after}
    return [s for s in steps if s.key != "diffusion" or s.key in wanted]


def format_minutes(m: float | None) -> str:
    if m is None:
        return "time not estimated"
    return f"~{m:.0f} min" if m >= 10 else f"~{m:.1f} min" if m >= 0.05 else "< 0.1 min"


def plan_lines(steps: list[DemoCommand], jobs: int, costs: UnitCosts | None = None) -> list[str]:
    todo = [s for s in steps if not s.done]
    known = sum(s.minutes or 0.0 for s in todo)
    unknown = sum(s.minutes is None for s in todo)
    where = "not timed" if costs is None else f"timed just now on this machine: {costs.describe()}"
    lines = [f"demo plan (expected wall time of each step, {where})"]
    k = 0
    for s in steps:
        if s.done:
            lines.append(f"   -  {s.title}: done earlier, skipped")
        else:
            k += 1
            lines.append(f"  {k:2d}. {s.title}: {format_minutes(s.minutes)}")
    total = f"~{known:.0f} min" + (f" plus {unknown} step(s) not estimated" if unknown else "")
    lines.append(f"  {len(todo)} step(s) to run, {total} of work" + (f", {jobs} at a time" if jobs > 1 else ""))
    return lines


class CommandFailed(Exception):
    pass


def _record_seconds(work: Path, key: str, seconds: float) -> None:
    path = work / "step_seconds.json"
    times = read_state_json(path, "delete it (it only holds the demo's step timings)") if path.is_file() else {}
    times[key] = round(seconds, 1)
    atomic_write_json(path, times)


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within it, SIGTERM interrupts the demo as Ctrl-C does (``KeyboardInterrupt``), so its
    steps are stopped and waited for (:func:`stop_steps`) instead of left running."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    # A shell starts a background job (`nohup demo.py ... &`) with SIGINT ignored, and its steps
    # inherit that across exec: stop_steps' SIGINT would then go unheard and each step be killed
    # after the grace time instead of saving its work. A caught SIGINT is reset to the default
    # at exec, so catching it here gives the steps (and this process) Ctrl-C's behaviour back.
    sigint_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if sigint_ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if sigint_ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_step(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """A step's process, in a process group of its own: the demo alone decides when to
    interrupt it (a terminal's Ctrl-C reaches the demo, which passes it on)."""
    return subprocess.Popen(cmd, cwd=REPO_ROOT, process_group=0, **kwargs)


def stop_steps(procs: Sequence[subprocess.Popen], grace_s: float | None = None) -> None:
    """Interrupt each running step's process group (SIGINT: a script saves its work and
    releases its lock) and wait for them; what is still running after ``grace_s`` (default
    :data:`STOP_GRACE_S`), or after a second interrupt, is killed."""
    grace_s = STOP_GRACE_S if grace_s is None else grace_s
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGINT)
    deadline = time.time() + grace_s
    try:
        while any(p.poll() is None for p in live) and time.time() < deadline:
            time.sleep(0.05)
    except KeyboardInterrupt:  # interrupted again: no more waiting
        pass
    for p in live:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
    for p in live:
        p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:  # it has just ended
        pass


def run_command(cmd: list[str]) -> float:
    """Run one step in the foreground (its output on this terminal); its wall time. An
    interrupted demo interrupts the step and waits for it."""
    t0 = time.time()
    proc = start_step(cmd)
    try:
        returncode = proc.wait()
    except BaseException:
        stop_steps([proc])
        raise
    if returncode != 0:
        raise CommandFailed(f"exit {returncode}: {' '.join(shlex.quote(c) for c in cmd)}")
    return time.time() - t0


def run_commands(
    steps: list[DemoCommand],
    work: Path,
    jobs: int = 1,
    log: TextIO | None = None,
    runner: Callable[[list[str]], float] = run_command,
    say: Callable[[str], None] = print,
    poll_s: float = 1.0,
    on_step_done: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Run the steps not yet done, up to ``jobs`` at a time, each once all its ``after`` are done.

    With one job each step runs in the foreground through ``runner``; with several, each
    step writes ``<work>/logs/<key>.log`` and its start and end (and a status line every
    few minutes) are printed here. After a failure no new step starts; running ones
    finish, then :class:`CommandFailed` names the failed command and its log. Interrupted
    (Ctrl-C, SIGTERM after :func:`interrupt_on_sigterm`), it interrupts the running steps
    and waits for them before the ``KeyboardInterrupt`` goes on. Returns the wall time of
    each step run; they also accumulate in ``<work>/step_seconds.json``.
    ``on_step_done(done, total)`` is called after each step that succeeds (the demo
    rewrites its partial table there, so hours-long runs show their results as they come)."""
    known = {s.key for s in steps}
    for s in steps:
        missing = [a for a in s.after if a not in known]
        if missing:
            raise ValueError(f"step {s.key!r} waits for unknown step(s) {missing}")
    run = _Run(steps, work, jobs, log, runner, say, on_step_done)
    try:
        run.loop(poll_s)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM) or failed here: no step is left running
        stop_steps([proc for proc, *_ in run.running.values()])
        for *_, out in run.running.values():
            out.close()
        raise
    if run.failed:
        raise CommandFailed("; ".join(run.failed))
    return run.seconds


class _Run:
    """The state of :func:`run_commands`: what is pending, running, finished and failed."""

    def __init__(self, steps, work, jobs, log, runner, say, on_step_done) -> None:
        self.steps, self.work, self.jobs, self.log = steps, work, jobs, log
        self.runner, self.say, self.on_step_done = runner, say, on_step_done
        self.finished = {s.key for s in steps if s.done}
        self.pending = [s for s in steps if not s.done]
        self.running: dict[str, tuple[subprocess.Popen, float, DemoCommand, TextIO]] = {}
        self.seconds: dict[str, float] = {}
        self.failed: list[str] = []
        self.env = dict(os.environ)
        if jobs > 1 and "OMP_NUM_THREADS" not in self.env:  # oversubscribed threads slow every process down
            self.env["OMP_NUM_THREADS"] = str(step_threads(jobs))
        self.total, self.started = len(self.pending), 0

    def note(self, line: str) -> None:
        self.say(line)
        if self.log is not None:
            self.log.write(line + "\n")
            self.log.flush()

    def finish(self, s: DemoCommand, took: float) -> None:
        self.finished.add(s.key)
        self.seconds[s.key] = took
        _record_seconds(self.work, s.key, took)
        if self.jobs > 1:
            self.note(
                f"   done: {s.title} in {took / 60:.1f} min ({len(self.finished)} of {len(self.steps)} steps done)"
            )
        if self.on_step_done is not None:
            self.on_step_done(len(self.finished), len(self.steps))

    def start_ready(self) -> None:
        for s in list(self.pending):
            if self.failed or len(self.running) >= self.jobs:
                break
            if not all(a in self.finished for a in s.after):
                continue
            self.pending.remove(s)
            self.started += 1
            self.note(f"\n== step {self.started} of {self.total}: {s.title} ({format_minutes(s.minutes)})")
            self.note("$ " + " ".join(shlex.quote(c) for c in s.cmd))
            if self.jobs == 1:
                self.finish(s, self.runner(s.cmd))  # CommandFailed propagates: nothing else is running
                continue
            (self.work / "logs").mkdir(parents=True, exist_ok=True)
            out = open(self.work / "logs" / f"{_file_key(s.key)}.log", "a")  # noqa: SIM115 - closed when it ends
            proc = start_step(s.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
            self.running[s.key] = (proc, time.time(), s, out)

    def collect(self) -> None:
        for key, (proc, t0, s, out) in list(self.running.items()):
            if proc.poll() is None:
                continue
            del self.running[key]
            out.close()
            if proc.returncode == 0:
                self.finish(s, time.time() - t0)
            else:
                where = self.work / "logs" / f"{_file_key(key)}.log"
                self.failed.append(f"exit {proc.returncode}: {' '.join(shlex.quote(c) for c in s.cmd)} (log: {where})")
                self.note(f"   FAILED: {s.title} (log: {where}); no new step starts")

    def loop(self, poll_s: float) -> None:
        last_status = time.time()
        while self.pending or self.running:
            self.start_ready()
            if not self.running:
                if self.pending and not self.failed:
                    raise ValueError(f"steps {[s.key for s in self.pending]} wait for steps that never run")
                break
            time.sleep(poll_s)
            self.collect()
            if self.running and time.time() - last_status >= STATUS_EVERY_S:
                last_status = time.time()
                now = ", ".join(
                    f"{s.title} ({(time.time() - t0) / 60:.0f} min)" for _, t0, s, _ in self.running.values()
                )
                self.note(f"   running: {now}; {len(self.pending)} step(s) waiting")


def _file_key(key: str) -> str:
    return key.replace(" ", "-")


# --------------------------------------------------------------------------- the table


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "std": None, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"n": len(values), "mean": statistics.fmean(values), "std": std, "values": values}


def _cell(st: dict[str, Any]) -> str:
    if not st["n"]:
        return "—"
    if st["n"] == 1:
        return f"{st['mean']:.2f}"
    return f"{st['mean']:.2f} ± {st['std']:.2f}"


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Whether mean ``a`` beats mean ``b`` beyond the seeds' spread (the sum of their stds).

    'yes'/'no' need at least two seeds on both sides; with one seed it is 'n/a'."""
    if a["n"] < 2 or b["n"] < 2:
        return "n/a"
    gap = a["mean"] - b["mean"]
    spread = a["std"] + b["std"]
    return "yes" if gap > spread else "no (worse)" if gap < -spread else "within spread"


def summarise(work: Path, poisons: Sequence[str], seeds: int) -> dict[str, Any]:
    """Every finished demo victim in ``work`` (any poison, seeds 0..seeds-1), as statistics."""

    def acc(name: str) -> float | None:
        f = victim_result(work, name)
        return read_state_json(f, "re-run that victim with --overwrite")["final_test_acc"] if f.is_file() else None

    def collect(poison: str, variant: str | None) -> dict[str, Any]:
        values = [acc(victim_name(poison, variant, s)) for s in range(seeds)]
        return _stats([v for v in values if v is not None])

    clean = collect("", None)
    clean_defended = {v: collect("", v) for v in VARIANTS if v != "none"}
    rows: dict[str, dict[str, Any]] = {}
    for p in poisons:
        cells = {v: collect(p, v) for v in VARIANTS}
        if any(c["n"] for c in cells.values()):
            eclipse = cells["eclipse"]
            cells["recovery"] = (
                eclipse["mean"] / clean["mean"] if eclipse["n"] and clean["n"] and clean["mean"] else None
            )
            cells["beats_issj"] = compare(eclipse, cells["issj"])
            cells["beats_issg"] = compare(eclipse, cells["issg"])
            cells |= {f"beats_{v}": compare(eclipse, cells[v]) for v in OPTIONAL_COLUMNS}
            rows[p] = cells
    return {"clean": clean, "clean_defended": clean_defended, "poisons": rows}


OPTIONAL_COLUMNS = ("at", "cutout", "mixup", "cutmix", "op")  # shown only where some victim of theirs finished


def shown_variants(summary: dict[str, Any]) -> list[str]:
    rows = summary["poisons"].values()
    return [v for v in VARIANTS if v not in OPTIONAL_COLUMNS or any(r[v]["n"] for r in rows)]


def table_markdown(summary: dict[str, Any], heading: str) -> str:
    shown = shown_variants(summary)
    header = ["poison", "clean subset", *(VARIANTS[v][0] for v in shown), "ECLIPSE / clean"]
    versus = ["issj", "issg"] + [v for v in OPTIONAL_COLUMNS if v in shown]
    header += [f"ECLIPSE > {VARIANTS[v][0]}" for v in versus]
    lines = [heading, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p, cells in summary["poisons"].items():
        rec = "—" if cells["recovery"] is None else f"{100 * cells['recovery']:.0f} %"
        row = [p, _cell(summary["clean"]), *(_cell(cells[v]) for v in shown), rec]
        lines.append("| " + " | ".join(row + [cells[f"beats_{v}"] for v in versus]) + " |")
    for v, st in summary.get("clean_defended", {}).items():
        if st["n"]:
            lines.append(f"\nClean subset with {VARIANTS[v][0]}: {_cell(st)} (no defence: {_cell(summary['clean'])}).")
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Bar chart of the table (mean with the seeds' std as error bars), written atomically."""
    poisons = list(summary["poisons"])
    if not poisons:
        return
    fig, ax = pyplot().subplots(figsize=(max(6.0, 1.2 * len(poisons) + 2), 3.6))
    shown = shown_variants(summary)
    width = 0.8 / len(shown)
    for i, v in enumerate(shown):
        cells = [summary["poisons"][p][v] for p in poisons]
        xs = [k + (i - (len(shown) - 1) / 2) * width for k in range(len(poisons))]
        ax.bar(
            xs, [c["mean"] or 0.0 for c in cells], width, yerr=[c["std"] or 0.0 for c in cells], label=VARIANTS[v][0]
        )
    if summary["clean"]["n"]:
        ax.axhline(summary["clean"]["mean"], color="k", ls="--", lw=1, label="clean subset")
    ax.set_xticks(range(len(poisons)), poisons)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
