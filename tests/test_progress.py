"""utils/progress.py: a bar on a terminal, plain lines with the same numbers elsewhere."""

from __future__ import annotations

import io
import json

import pytest
from tqdm import tqdm

from utils import progress as pm
from utils.demo.step_costs import UnitCosts
from utils.progress import LineProgress, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _defaults(monkeypatch):
    monkeypatch.delenv("PROGRESS", raising=False)
    monkeypatch.delenv("PROGRESS_PERCENT", raising=False)
    monkeypatch.delenv("PROGRESS_SECONDS", raising=False)
    monkeypatch.setattr(pm, "MIN_GAP_S", 0.0)  # every 10 % step prints, however fast the loop


def test_log_gets_one_plain_line_per_ten_percent():
    out = io.StringIO()
    bar = progress(total=100, desc="train", unit="batch", file=out, mininterval=0)
    assert isinstance(bar, LineProgress)
    for _ in range(100):
        bar.update(1)
        bar.set_postfix(loss="0.5")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [ln.split(": ", 1)[1].split(" ", 1)[0] for ln in lines] == [f"{n}/100" for n in range(10, 101, 10)]
    assert "(50%)" in lines[4] and "batch/s" in lines[4] and "ETA" in lines[4] and "loss=0.5" in lines[4]
    assert lines[-1].startswith("train: 100/100 batch (100%)") and "ETA" not in lines[-1]


def test_iterables_resumed_bars_and_byte_units(monkeypatch):
    monkeypatch.setattr(pm, "MIN_GAP_S", 1e9)
    out = io.StringIO()
    assert list(progress(range(5), desc="loop", file=out)) == list(range(5))
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # a fast loop: its closing line only
    assert out.getvalue().startswith("loop: 5/5 it (100%)")

    monkeypatch.setattr(pm, "MIN_GAP_S", 0.0)
    out = io.StringIO()
    bar = progress(total=10, initial=5, desc="resumed", file=out, mininterval=0)
    bar.update(5)
    bar.close()
    assert [ln.split(" ")[1] for ln in out.getvalue().splitlines()] == ["10/10"]

    out = io.StringIO()
    bar = progress(total=4 << 20, desc="file", unit="B", unit_scale=True, unit_divisor=1024, file=out)
    bar.update(4 << 20)
    bar.close()
    assert out.getvalue().startswith("file: 4.00M/4.00M B (100%)")


def test_time_based_lines_when_total_is_unknown(monkeypatch):
    monkeypatch.setenv("PROGRESS_SECONDS", "0")
    out = io.StringIO()
    bar = progress(desc="stream", file=out, mininterval=0)
    for _ in range(3):
        bar.update(2)
    bar.close()
    assert [ln.split(", ")[0] for ln in out.getvalue().splitlines()] == ["stream: 2 it", "stream: 4 it", "stream: 6 it"]


def test_terminal_gets_a_tqdm_bar_and_the_style_can_be_forced(monkeypatch):
    tty = _Tty()
    bar = progress(total=3, file=tty)
    assert type(bar) is tqdm
    bar.update(3)
    bar.close()
    assert "\r" in tty.getvalue()

    monkeypatch.setenv("PROGRESS", "lines")
    assert isinstance(progress(total=3, file=_Tty()), LineProgress)
    monkeypatch.setenv("PROGRESS", "off")
    quiet = io.StringIO()
    bar = progress(total=3, file=quiet)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""


def test_tqdm_api_used_by_the_call_sites_works():
    out = io.StringIO()
    bar = progress(range(4), desc="x", file=out, leave=False, dynamic_ncols=True, disable=False)
    for _ in bar:
        bar.set_postfix(a=1)
        assert "rate" in bar.format_dict
    off = progress(total=2, file=out, disable=True)
    off.update(2)
    off.close()
    assert out.getvalue().count("\n") == 1


# --------------------------------------------------------------------------- make demo: a run a person can follow


# unit costs as demo.py would time them (fixed here, so that the plan's arithmetic is checked)
COSTS = UnitCosts(
    diffusion_iteration=1.0,
    denoise_image_step=0.001,
    victim_train_image=0.001,
    victim_eval_image=0.0005,
    surrogate_image_pass=0.002,
    device="cpu",
    threads=2,
)


def _demo(monkeypatch, capsys, argv: list[str]) -> tuple[str, list[list[str]]]:
    import demo

    monkeypatch.setattr(demo, "measure_unit_costs", lambda *a, **k: COSTS)
    ran: list[list[str]] = []
    monkeypatch.setattr(demo, "run", lambda cmd, log: ran.append(cmd) or 0.0)
    monkeypatch.setattr("sys.argv", ["demo.py", *argv])
    demo.main()
    return capsys.readouterr().out, ran


def test_demo_prints_its_plan_then_step_k_of_n(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIFAR10_ROOT", str(tmp_path / "no_data"))
    work = tmp_path / "demo"
    done = work / "diff_ckpt" / "cifar10" / "test2000ps8000" / "ema_0.999_3000.pt"
    done.parent.mkdir(parents=True)
    done.write_bytes(b"")
    out, ran = _demo(monkeypatch, capsys, ["--baselines", "--work_dir", str(work)])
    plan, _, rest = out.partition("an interrupted demo resumes")
    assert "sparse diffusion model (3000 iterations): done earlier, skipped" in plan
    # a victim: 20 epochs x 5000 images x 1 ms + 4 evaluations x 10,000 test images x 0.5 ms = 2.0 min;
    # EM: 8 rounds (at most) x (10 x 512 + 5000 x 10 + 5000 / 3) surrogate passes x 2 ms = 15 min;
    # purification: 5000 images x 20 steps x 1 ms = 1.7 min
    assert "1. victim on the clean subset: ~2.0 min" in plan and "2. craft EM on 5000 images: ~15 min" in plan
    assert "3. purify EM (ECLIPSE stage 1): ~1.7 min" in plan
    assert "7 step(s) to run, ~27 min" in plan and "timed just now on this machine: cpu, 2 thread(s)" in plan
    assert f"CIFAR-10 is not at {tmp_path / 'no_data'}: the first step downloads" in plan
    assert [ln for ln in rest.splitlines() if ln.startswith("== step")][0].startswith("== step 1 of 7: victim on")
    assert "== step 7 of 7: victim on EM, ECLIPSE" in rest and len(ran) == 7
    assert "| poison | clean subset |" in rest and "EM purified:" in rest and rest.rstrip().endswith("EM-pure.png")
    summary = json.loads((work / "summary.json").read_text())
    assert summary["status"] == "complete"


def test_demo_rewrites_its_partial_table_after_each_step(tmp_path, monkeypatch, capsys):
    import demo

    seen: list[str] = []

    def fake_run(cmd, log):
        f = tmp_path / "summary.json"
        seen.append(json.loads(f.read_text())["status"] if f.is_file() else "none")
        return 0.0

    monkeypatch.setattr(demo, "run", fake_run)
    monkeypatch.setattr(demo, "measure_unit_costs", lambda *a, **k: COSTS)
    monkeypatch.setattr("sys.argv", ["demo.py", "--poisons", "LSP", "--skip_clean", "--work_dir", str(tmp_path)])
    demo.main()
    assert seen[:3] == ["none", "partial: 1 of 5 steps done", "partial: 2 of 5 steps done"]
    assert "partial" not in (tmp_path / "summary.md").read_text().splitlines()[0]


def test_demo_plan_only_runs_nothing(tmp_path, monkeypatch, capsys):
    out, ran = _demo(monkeypatch, capsys, ["--plan", "--poisons", "LSP,ADP", "--work_dir", str(tmp_path)])
    assert ran == [] and "craft LSP on 5000 images: ~0.1 min" in out  # model-free: seconds
    assert "craft ADP on 5000 images (rough estimate): time not estimated" in out and "1 step(s) not estimated" in out


def test_makefile_uses_shared_data_only_when_present_and_one_quiet_flag(tmp_path):
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    env = {k: v for k, v in __import__("os").environ.items() if k != "CIFAR10_ROOT"}

    def make_vars(shared) -> str:
        res = subprocess.run(
            ["make", "-pn", "demo", f"SHARED={shared}"], cwd=repo, env=env, capture_output=True, text=True
        )
        return res.stdout

    assert "CIFAR10_ROOT" not in make_vars(tmp_path / "absent")
    (tmp_path / "datasets" / "cifar10").mkdir(parents=True)
    assert "CIFAR10_ROOT = " in make_vars(tmp_path)
    dry = subprocess.run(["make", "-n", "test"], cwd=repo, env=env, capture_output=True, text=True).stdout
    pytest_line = next(ln for ln in dry.splitlines() if "pytest" in ln)
    addopts = (repo / "pyproject.toml").read_text().split("addopts", 1)[1].splitlines()[0]
    assert ("-q" in pytest_line.split()) + ("-q" in addopts) == 1  # -qq would hide pytest's summary line


def test_a_slow_unit_is_never_silent_and_the_first_line_has_a_rate(monkeypatch):
    """A log hears from a loop inside a unit that outlasts PROGRESS_SECONDS, and the first
    unit finished after FIRST_LINE_S prints at once, with its rate."""
    import time

    monkeypatch.setenv("PROGRESS_SECONDS", "0.2")
    monkeypatch.setattr(pm, "FIRST_LINE_S", 0.3)
    out = io.StringIO()
    bar = progress(total=3, desc="purify", unit="batch", file=out, mininterval=0)
    time.sleep(0.7)  # one long unit: heartbeat lines while it runs
    beats = out.getvalue().splitlines()
    assert len(beats) >= 2 and all(ln.endswith("batch 1 in progress") for ln in beats)
    assert beats[0].startswith("purify: 0/3 batch (0%)")
    bar.update(1)  # the first finished unit: a line at once, with a rate and an ETA
    first = out.getvalue().splitlines()[len(beats)]
    assert first.startswith("purify: 1/3 batch (33%)") and "batch/s" in first and "ETA" in first
    bar.close()
    n = len(out.getvalue().splitlines())
    time.sleep(0.5)
    assert len(out.getvalue().splitlines()) == n  # a closed bar is silent


def test_a_dropped_bar_is_collected_despite_its_heartbeat(monkeypatch):
    import gc
    import weakref

    monkeypatch.setenv("PROGRESS_SECONDS", "0.05")
    bar = progress(total=3, desc="dropped", file=io.StringIO())
    ref = weakref.ref(bar)
    del bar
    gc.collect()
    assert ref() is None  # the heartbeat thread does not keep it alive
