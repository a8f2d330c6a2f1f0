"""demo.py's pipeline: steps from the recipe, the parallel runner, and the mean ± std table."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from utils.demo.pipeline import (
    CommandFailed,
    DemoCommand,
    build_commands,
    compare,
    plot_summary,
    run_commands,
    summarise,
    table_markdown,
    victim_name,
)
from utils.demo.recipe import demo_recipe, load_recipe, poison_flags
from utils.demo.stored import check_stored_settings
from utils.fileio import UserError
from utils.paths import purified_file
from utils.poisons import POISONS


def _args(work: Path, **kw) -> Namespace:
    return Namespace(**{**demo_recipe(), "work_dir": str(work), "seeds": 1, "skip_clean": False, **kw})


def test_recipe_is_one_declaration_read_by_poisons_and_demo():
    recipe = load_recipe()
    assert set(recipe["poison_flags"]) <= set(POISONS)
    for name, spec in POISONS.items():
        assert spec.cpu_flags == poison_flags(name) == recipe["poison_flags"].get(name, "")
    import demo

    args = demo.parse_args([])
    assert {k: getattr(args, k) for k in recipe["demo"]} == recipe["demo"]


def test_damaged_recipe_is_a_one_line_error(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("demo: {}\npoison_flags: {EM: 3}\n")
    with pytest.raises(UserError, match=r"poison_flags\.EM: expected a string"):
        load_recipe.__wrapped__(bad)
    # step times are measured where the demo runs, never read from a file written on another CPU
    bad.write_text("demo: {}\npoison_flags: {}\nminutes: {victim: 2.7}\n")
    with pytest.raises(UserError, match=r"unknown section\(s\) minutes"):
        load_recipe.__wrapped__(bad)
    bad.write_text("demo: {}\n")
    with pytest.raises(UserError, match="expected a mapping under 'poison_flags'"):
        load_recipe.__wrapped__(bad)


def test_steps_per_seed_and_their_dependencies(tmp_path):
    steps = {s.key: s for s in build_commands(_args(tmp_path, seeds=2), ["EM", "ADP"], ["none", "eclipse"], py="py")}
    assert victim_name("EM", "none", 0) == "demo-EM-none" and victim_name("", None, 1) == "demo-clean-s1"
    assert {"demo-clean", "demo-clean-s1", "demo-EM-eclipse", "demo-EM-eclipse-s1"} <= set(steps)
    seeded = steps["demo-EM-none-s1"].cmd
    assert seeded[seeded.index("--seed") + 1] == "1" and "--seed" not in steps["demo-EM-none"].cmd
    assert steps["demo-EM-none"].after == ("EM poison",)
    assert steps["demo-EM-eclipse-s1"].after == ("EM purification",)
    assert set(steps["EM purification"].after) == {"diffusion", "EM poison"}
    assert steps["EM poison"].after == () and steps["EM poison"].cmd[-8:] == poison_flags("EM").split()
    adp = steps["ADP poison"]  # crafts through the demo's own diffusion model
    assert adp.after == ("diffusion",) and adp.cmd[-2:] == ["--sparse_diff_model", "ema_0.999_003000.pt"]


def test_adversarial_training_column_takes_the_recipes_flags_and_skips_stage_one(tmp_path):
    """--defenses none,at: the AT victims get the recipe's defense_flags, and no step waits for
    ECLIPSE's purification or diffusion model, so neither is in the plan (ADP still needs the model)."""
    import demo

    variants = demo.parse_defenses("none,at")
    assert variants == ["none", "at"] and demo.parse_defenses("eclipse", baselines=True) == ["issg", "issj", "eclipse"]
    steps = {s.key: s for s in build_commands(_args(tmp_path), ["EM"], variants, py="py")}
    assert set(steps) == {"demo-clean", "demo-clean-at", "EM poison", "demo-EM-none", "demo-EM-at"}
    assert steps["demo-clean-at"].cmd[steps["demo-clean-at"].cmd.index("--at_steps") + 1] == "5"
    at = steps["demo-EM-at"]
    flags = at.cmd[at.cmd.index("--defense") : at.cmd.index("--defense") + 8]
    assert flags == ["--defense", "at", *load_recipe()["defense_flags"]["at"].split()]
    assert at.stored.values["at_steps"] == "5" and at.after == ("EM poison",)
    adp = {s.key for s in build_commands(_args(tmp_path), ["ADP"], variants, py="py")}
    assert "diffusion" in adp and "ADP purification" not in adp
    op = {s.key: s for s in build_commands(_args(tmp_path), ["LSP"], demo.parse_defenses("op,cutmix"), py="py")}
    assert op["demo-LSP-op"].cmd[op["demo-LSP-op"].cmd.index("--defense") :][:4] == [
        "--defense",
        "op",
        "--op_batch_size",
        "100",
    ]
    assert {"demo-clean-op", "demo-clean-cutmix"} <= set(op)
    with pytest.raises(SystemExit, match="unknown defence"):
        demo.parse_defenses("none,pgd")


def test_clean_costs_train_every_chosen_defence_on_the_clean_subset(tmp_path):
    """--clean_costs: a clean-subset victim per chosen defence; ECLIPSE's purifies the clean
    subset first (purification.py --poison clean --subset N) and trains on it with --pure."""
    variants = ["none", "issg", "issj", "eclipse"]
    plain = {s.key for s in build_commands(_args(tmp_path), ["EM"], variants, py="py")}
    assert not {"demo-clean-issg", "demo-clean-eclipse", "clean purification"} & plain
    steps = {s.key: s for s in build_commands(_args(tmp_path, clean_costs=True), ["EM"], variants, py="py")}
    assert {"demo-clean-issg", "demo-clean-issj", "demo-clean-eclipse", "clean purification"} <= set(steps)
    assert "demo-clean-none" not in steps
    purify = steps["clean purification"]
    assert purify.cmd[purify.cmd.index("--poison") :][:4] == [
        "--poison",
        "clean",
        "--subset",
        str(demo_recipe()["subset"]),
    ]
    assert purify.after == ("diffusion",) and purify.stored.values["subset"] == demo_recipe()["subset"]
    victim = steps["demo-clean-eclipse"]
    assert victim.after == ("clean purification",) and "--pure" in victim.cmd and "--subset" not in victim.cmd
    assert purify.cmd[purify.cmd.index("--t") + 1] == victim.cmd[victim.cmd.index("--t") + 1]
    assert steps["demo-clean-issg"].cmd[steps["demo-clean-issg"].cmd.index("--defense") + 1] == "grayscale"
    for v, acc in [("", 60.0), ("eclipse", 58.5)]:
        _result(tmp_path, victim_name("", v or None, 0), acc)
    _result(tmp_path, victim_name("EM", "none", 0), 20)
    assert "Clean subset with ECLIPSE: 58.50 (no defence: 60.00)" in table_markdown(summarise(tmp_path, ["EM"], 1), "t")
    import demo

    assert demo.parse_poisons("none") == []  # the clean-subset victims alone
    alone = {s.key for s in build_commands(_args(tmp_path, clean_costs=True), [], variants, py="py")}
    assert alone == {"diffusion", "clean purification", "demo-clean", "demo-clean-issg", "demo-clean-issj"} | {
        "demo-clean-eclipse"
    }


def test_at_column_shows_only_where_measured(tmp_path):
    for v, acc in [("none", 20), ("issj", 40), ("issg", 50), ("eclipse", 55)]:
        _result(tmp_path, victim_name("EM", v, 0), acc)
    assert "AT" not in table_markdown(summarise(tmp_path, ["EM"], 1), "t")
    _result(tmp_path, victim_name("EM", "at", 0), 45.5)
    _result(tmp_path, victim_name("", "at", 0), 50.25)
    table = table_markdown(summarise(tmp_path, ["EM"], 1), "t")
    assert "Clean subset with AT: 50.25" in table
    assert "| ISS-J | AT | ECLIPSE |" in table and "| 45.50 | 55.00 |" in table and "ECLIPSE > AT" in table
    plot_summary(summarise(tmp_path, ["EM"], 1), tmp_path / "s.png")


def _py_step(key: str, code: str, after: tuple[str, ...] = ()) -> DemoCommand:
    return DemoCommand(key, key, [sys.executable, "-c", code], 0.1, False, after)


def test_two_jobs_run_at_once_and_wait_for_their_dependencies(tmp_path):
    # a and b each wait for the other's start file: they finish only if both run at once
    meet = "import pathlib,sys,time\nd=pathlib.Path({d!r})\n(d/'{me}').touch()\n"
    meet += "for _ in range(600):\n    if (d/'{other}').exists(): sys.exit(0)\n    time.sleep(0.05)\nsys.exit(1)"
    a = _py_step("a", meet.format(d=str(tmp_path), me="a", other="b"))
    b = _py_step("b", meet.format(d=str(tmp_path), me="b", other="a"))
    # c needs a: it fails unless a's start file is there when it starts
    c = _py_step(
        "c", f"import pathlib,sys; sys.exit(0 if (pathlib.Path({str(tmp_path)!r})/'a').exists() else 1)", ("a",)
    )
    lines: list[str] = []
    done: list[tuple[int, int]] = []
    took = run_commands(
        [c, a, b], tmp_path, jobs=2, say=lines.append, poll_s=0.05, on_step_done=lambda *d: done.append(d)
    )
    assert set(took) == {"a", "b", "c"} and done == [(1, 3), (2, 3), (3, 3)]  # the demo's partial tables
    assert [ln for ln in lines if ln.startswith("\n== step")][-1].startswith("\n== step 3 of 3: c")
    assert set(json.loads((tmp_path / "step_seconds.json").read_text())) == {"a", "b", "c"}
    assert (tmp_path / "logs" / "a.log").is_file()


def test_after_a_failure_no_new_step_starts(tmp_path):
    steps = [_py_step("bad", "import sys; sys.exit(4)"), _py_step("later", "pass", ("bad",)), _py_step("x", "pass")]
    with pytest.raises(CommandFailed, match=r"exit 4: .* \(log: .*bad\.log\)"):
        run_commands(steps, tmp_path, jobs=2, say=lambda _: None, poll_s=0.05)
    assert set(json.loads((tmp_path / "step_seconds.json").read_text())) == {"x"}
    with pytest.raises(CommandFailed, match="exit 4"):  # one job: the runner's failure ends the run
        run_commands(steps[:1], tmp_path, jobs=1, say=lambda _: None)


def _result(work: Path, name: str, acc: float) -> None:
    f = work / "runs" / "train" / name / "result.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"final_test_acc": acc}))


def test_table_is_mean_and_std_over_seeds_with_recovery_and_comparisons(tmp_path):
    for s, (clean, none, issj, issg, ecl) in enumerate(
        [(60, 20, 40, 50, 55), (62, 22, 42, 56, 57), (61, 21, 41, 53, 56)]
    ):
        _result(tmp_path, victim_name("", None, s), clean)
        for v, acc in [("none", none), ("issj", issj), ("issg", issg), ("eclipse", ecl)]:
            _result(tmp_path, victim_name("EM", v, s), acc)
    summary = summarise(tmp_path, list(POISONS), seeds=3)
    em = summary["poisons"]["EM"]
    assert list(summary["poisons"]) == ["EM"] and summary["clean"]["mean"] == 61.0
    assert em["eclipse"]["values"] == [55, 57, 56] and em["eclipse"]["std"] == pytest.approx(1.0)
    assert em["recovery"] == pytest.approx(56 / 61)
    assert em["beats_issj"] == "yes" and em["beats_issg"] == "within spread"
    table = table_markdown(summary, "t")
    assert (
        "| EM | 61.00 ± 1.00 | 21.00 ± 1.00 | 53.00 ± 3.00 | 41.00 ± 1.00 | 56.00 ± 1.00 | 92 % | yes | within spread |"
        in table
    )
    assert summarise(tmp_path, ["EM"], seeds=1)["poisons"]["EM"]["beats_issj"] == "n/a"  # one seed: no spread
    plot_summary(summary, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_needs_a_gap_beyond_the_spread():
    st = lambda m, s: {"n": 3, "mean": m, "std": s}  # noqa: E731
    assert compare(st(50, 1), st(47, 1)) == "yes"
    assert compare(st(50, 1), st(49, 1)) == "within spread"
    assert compare(st(45, 1), st(50, 1)) == "no (worse)"


def test_unit_costs_are_timed_here_and_counted_from_the_recipe(tmp_path):
    """The plan's costs come from timing the real models on this machine (briefly), and a
    step's minutes are its unit count times the measured cost."""
    from utils.demo.step_costs import measure_unit_costs, step_minutes, surrogate_passes

    args = _args(tmp_path)
    costs = measure_unit_costs(args, torch.device("cpu"), threads=1, budget_s=0.05)
    for name in ("diffusion_iteration", "denoise_image_step", "victim_train_image", "surrogate_image_pass"):
        assert 0 < getattr(costs, name) < 60, name
    assert step_minutes("diffusion", args, costs) == pytest.approx(3000 * costs.diffusion_iteration / 60)
    assert step_minutes("purification", args, costs) == pytest.approx(5000 * 20 * costs.denoise_image_step / 60)
    passes, rough = surrogate_passes("EM", poison_flags("EM"), 5000)
    assert passes == pytest.approx(8 * (10 * 512 + 5000 * 10 + 5000 / 3)) and not rough
    assert surrogate_passes("TAP", poison_flags("TAP"), 5000) == (12 * 5000 + 1 * 5000 * 20, True)
    assert surrogate_passes("ADP", poison_flags("ADP"), 5000) is None
    assert surrogate_passes("LSP", "", 5000) == (0.0, False)


# --------------------------------------------------------------------------- settings of earlier outputs


def _made_by(steps: list[DemoCommand], work: Path, iterations: int = 3000) -> None:
    """Each step's output and settings as its script writes them (train.py's settings from
    its own parser)."""
    import train

    runtime = ("device", "overwrite", "work_dir", "data_root", "download", "bf16")
    for s in steps:
        flags = {w[2:]: v for w, v in zip(s.cmd, s.cmd[1:]) if w.startswith("--")}
        if s.key == "diffusion":
            out = work / "diff_ckpt" / "cifar10" / "test2000ps8000"
            out.mkdir(parents=True)
            training = {"batch_size": int(flags["batch_size"]), "max_timestep": int(flags["max_timestep"])}
            training |= {"ema_rate": float(flags["ema_rate"]), "lr": 1e-4, "precision": "bf16"}
            (out / "run.json").write_text(json.dumps({"diffusion": {}, "training": training, "command": ""}))
            (out / f"ema_{flags['ema_rate']}_{int(flags['iterations']):06d}.pt").write_bytes(b"")
        elif s.cmd[1] == "poison.py":
            out = work / "poisoned_data" / "cifar10" / "EM.pkl"
            out.parent.mkdir(parents=True)
            out.write_bytes(b"")
            n = int(flags["subset"])
            summary = {"poison": "EM", "n_images": n, "subset": {"n": n, "seed": 0, "indices": []}}
            summary |= {"surrogate_arch": flags["arch"], "surrogate_width": int(flags["width"])}
            out.with_suffix(".json").write_text(json.dumps(summary))
        elif s.cmd[1] == "purification.py":
            out = purified_file(work, "test2000ps8000", int(flags["t"]), iterations, "EM")
            out.parent.mkdir(parents=True)
            out.write_bytes(b"")
            out.with_suffix(".json").write_text(json.dumps({"t": int(flags["t"]), "respace": int(flags["respace"])}))
        else:
            args = train.parse_args(s.cmd[2:])
            settings = {k: v for k, v in vars(args).items() if k not in runtime}
            _result(work, s.key, 50.0)
            result = work / "runs" / "train" / s.key / "result.json"
            result.write_text(json.dumps({"settings": settings, "final_test_acc": 50.0}))


def test_outputs_made_with_other_settings_are_refused_or_redone(tmp_path):
    """A re-run with --subset 40 --width 16 --epochs 3 in a work dir made with 20 / 8 / 1 is
    refused in one line naming the step, its output and each differing setting; with
    --overwrite those steps and every step after them run again, each with --overwrite."""
    before = _args(tmp_path, subset=20, width=8, epochs=1)
    _made_by(build_commands(before, ["EM"], ["none", "eclipse"], py="py"), tmp_path)
    same = build_commands(before, ["EM"], ["none", "eclipse"], py="py")
    assert all(s.done for s in same) and check_stored_settings(same, overwrite=False) == []

    after = _args(tmp_path, subset=40, width=16, epochs=3)
    steps = build_commands(after, ["EM"], ["none", "eclipse"], py="py")
    assert all(s.done for s in steps)  # every output exists: the old code skipped them all
    with pytest.raises(UserError) as e:
        check_stored_settings(steps, overwrite=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("step 'demo-clean': ")
    assert str(tmp_path / "runs" / "train" / "demo-clean" / "result.json") in msg
    assert "subset: 20 -> 40; width: 8 -> 16; epochs: 1 -> 3" in msg and "--work_dir" in msg and "--overwrite" in msg
    assert all(s.done for s in steps)

    redone = check_stored_settings(steps, overwrite=True)
    by_key = {s.key: s for s in steps}
    assert by_key["diffusion"].done and "--overwrite" not in by_key["diffusion"].cmd  # same settings: kept
    rerun = ["demo-clean", "EM poison", "EM purification", "demo-EM-none", "demo-EM-eclipse"]
    assert all(not by_key[k].done and by_key[k].cmd[-1] == "--overwrite" for k in rerun)
    assert "  redone with --overwrite: EM poison (n_images: 20 -> 40)" in redone
    assert "  redone with --overwrite: EM purification (a step before it is redone)" in redone


def test_a_changed_defence_flag_in_the_recipe_is_refused(tmp_path, monkeypatch):
    """Every defence's options are compared (train.py's DEFENSE_KEYS, not only AT's): a recipe
    that changes Cutout's length, or drops OP's batch size (back to train.py's default), no
    longer counts the victims made with the old flags as done; the other victims still are."""
    import train
    from utils.demo import pipeline

    variants = ["none", "at", "cutout", "op"]
    recipe = {"at": "--at_eps 8 --at_steps 5 --at_step_size 2", "cutout": "", "op": "--op_batch_size 100"}
    monkeypatch.setattr(pipeline, "defense_flags", lambda d: recipe.get(d, "").split())
    _made_by(build_commands(_args(tmp_path), ["EM"], variants, py="py"), tmp_path)
    same = build_commands(_args(tmp_path), ["EM"], variants, py="py")
    assert all(s.done for s in same) and check_stored_settings(same, overwrite=False) == []
    cutout = {s.key: s for s in same}["demo-EM-cutout"].stored.values
    assert cutout["cutout_length"] == train.KEYS["cutout_length"].default  # not on the command: the default
    assert not set(cutout) & {"at_eps", "op_epochs", "mixup_alpha"}  # another defence's options: not compared

    recipe |= {"cutout": "--cutout_length 8", "op": ""}
    steps = build_commands(_args(tmp_path), ["EM"], variants, py="py")
    redone = check_stored_settings(steps, overwrite=True)
    assert "  redone with --overwrite: demo-EM-cutout (cutout_length: 16 -> 8)" in redone
    assert "  redone with --overwrite: demo-clean-op (op_batch_size: 100 -> 1024)" in redone
    kept = {s.key for s in steps if s.done}
    assert {"demo-clean", "demo-EM-none", "demo-clean-at", "demo-EM-at", "EM poison"} <= kept
    assert not kept & {"demo-clean-cutout", "demo-EM-cutout", "demo-clean-op", "demo-EM-op"}


def test_a_changed_diffusion_recipe_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    import demo

    _made_by(build_commands(_args(tmp_path), ["EM"], ["none", "eclipse"], py="py"), tmp_path)
    ran: list[list[str]] = []
    monkeypatch.setattr(demo, "run", lambda cmd, log: ran.append(cmd) or 0.0)
    monkeypatch.setattr(demo, "measure_unit_costs", lambda *a, **k: pytest.fail("timed before refusing"))
    monkeypatch.setattr("sys.argv", ["demo.py", "--work_dir", str(tmp_path), "--diffusion_batch", "32"])
    with pytest.raises(UserError, match=r"step 'diffusion': .*run\.json .*training\.batch_size: 64 -> 32"):
        demo.main()
    assert ran == []


# --------------------------------------------------------------------------- interrupted


_DRIVER = """
import pathlib, sys
from utils.demo import pipeline as p
work, jobs, modes = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
p.STOP_GRACE_S = 1.0
step = ("import os, pathlib, signal, sys, time\\n"
        "if sys.argv[3] == 'stubborn': signal.signal(signal.SIGINT, signal.SIG_IGN)\\n"
        "(pathlib.Path(sys.argv[1]) / (sys.argv[2] + '.pid')).write_text(str(os.getpid()))\\n"
        "try:\\n    time.sleep(600)\\n"
        "except KeyboardInterrupt:\\n    (pathlib.Path(sys.argv[1]) / (sys.argv[2] + '.saved')).write_text('1')")
steps = [p.DemoCommand(f"s{i}", f"s{i}", [sys.executable, "-c", step, str(work), f"s{i}", m], None, False)
         for i, m in enumerate(modes)]
with p.interrupt_on_sigterm():
    try:
        p.run_commands(steps, work, jobs=jobs, say=lambda _: None, poll_s=0.05)
    except KeyboardInterrupt:
        print("interrupted")
        sys.exit(130)
"""


@pytest.mark.parametrize(
    "jobs, modes, started_in_background", [(2, "polite,stubborn", False), (1, "polite", False), (1, "polite", True)]
)
def test_sigterm_stops_the_running_steps_and_waits_for_them(tmp_path, jobs, modes, started_in_background):
    """SIGTERM to the demo interrupts each running step's process group (SIGINT, which a polite
    step handles, here by saving; one that ignores it is killed after the grace time) and waits
    for them before it exits. Started as a shell's background job (SIGINT ignored, inherited by
    its steps), its steps still hear the SIGINT."""
    import os
    import signal
    import subprocess
    import time

    repo = Path(__file__).resolve().parents[1]

    def as_background_job() -> None:
        if started_in_background:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(tmp_path), str(jobs), modes],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=as_background_job,
    )
    pid_files = [tmp_path / f"s{i}.pid" for i in range(len(modes.split(",")))]
    pids: list[int] = []
    try:
        for _ in range(1200):  # until every step has started
            if all(f.is_file() and f.read_text() for f in pid_files) or driver.poll() is not None:
                break
            time.sleep(0.05)
        pids = [int(f.read_text()) for f in pid_files]
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=120)
        assert driver.returncode == 130 and "interrupted" in out
        for pid in pids:  # stopped and reaped before the demo exited
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        saved = [(tmp_path / f"s{i}.saved").is_file() for i in range(len(pid_files))]
        assert saved == [m == "polite" for m in modes.split(",")]
    finally:
        driver.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------- the smoke run


def test_tiny_demo_runs_every_step_then_refuses_other_settings(tmp_path):
    """``demo.py --tiny`` (here even smaller) runs the whole pipeline and says its numbers
    mean nothing; the same work dir re-run with other settings is refused in one line
    before any step runs."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    micro = ["--tiny", "--work_dir", str(tmp_path), "--subset", "20", "--diffusion_iterations", "2"]
    micro += ["--respace", "2", "--test_subset", "100", "--epochs", "1", "--skip_clean"]
    res = subprocess.run([sys.executable, "demo.py", *micro], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("SMOKE RUN (--tiny)") and "numbers mean nothing" in res.stdout.splitlines()[0]
    table = (tmp_path / "summary.md").read_text()
    assert table.startswith("SMOKE RUN") and "| EM | — |" in table and "on 100 test images" in table
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "complete"
    steps = json.loads((tmp_path / "step_seconds.json").read_text())
    assert set(steps) == {"diffusion", "EM poison", "EM purification", "demo-EM-none", "demo-EM-eclipse"}

    other = [*micro, "--subset", "40", "--width", "16", "--epochs", "3"]
    res = subprocess.run([sys.executable, "demo.py", *other], cwd=repo, capture_output=True, text=True)
    line = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and line.startswith("demo: step 'EM poison': ") and "n_images: 20 -> 40" in line
    assert "--work_dir" in line and "timing each kind of step" not in res.stdout
    assert json.loads((tmp_path / "step_seconds.json").read_text()) == steps  # nothing ran
