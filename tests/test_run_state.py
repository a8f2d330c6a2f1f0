"""RunFolder: the one run-folder protocol of train.py, train_diffusion.py, purification.py,
poison.py and the attack records — lock, compare the stored settings, then resume, refuse
or (--overwrite) discard."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from utils.compat import legacy_precision
from utils.fileio import UserError
from utils.run_state import RunFolder, lock_path

REPO = Path(__file__).resolve().parents[1]


def _run(folder: Path, settings: dict, **kw) -> tuple[RunFolder, bool]:
    """Open ``folder`` for a run of ``settings`` as a script does; returns it and whether it resumed."""
    with RunFolder(folder, settings, **kw) as run:
        resumes = run.check()
        run.open()
    return run, resumes


def test_resume_with_the_same_settings(tmp_path):
    out = tmp_path / "run"
    run, resumes = _run(out, {"lr": 0.1, "epochs": 2})
    assert not resumes and json.loads((out / "settings.json").read_text()) == {"lr": 0.1, "epochs": 2}
    (out / "checkpoint.pt").write_bytes(b"work")
    run, resumes = _run(out, {"lr": 0.1, "epochs": 2})
    assert resumes and run.stored == {"lr": 0.1, "epochs": 2}
    assert (out / "checkpoint.pt").read_bytes() == b"work"  # the earlier run's work is kept
    assert not lock_path(out).exists()  # the lock goes with the run


def test_refusal_names_each_differing_key_and_leaves_the_folder(tmp_path):
    out = tmp_path / "run"
    _run(out, {"lr": 0.1, "opt": {"momentum": 0.9}, "seed": 0})
    (out / "checkpoint.pt").write_bytes(b"work")
    with pytest.raises(UserError) as e:
        _run(out, {"lr": 0.5, "opt": {"momentum": 0.0}, "seed": 0}, hint="pass --overwrite or --run_name NAME")
    msg = str(e.value)
    assert msg.startswith(f"{out} holds work done with other settings (")
    assert "lr: 0.1 -> 0.5" in msg and "opt.momentum: 0.9 -> 0.0" in msg and "seed" not in msg
    assert msg.endswith("; pass --overwrite or --run_name NAME")
    assert (out / "checkpoint.pt").is_file() and json.loads((out / "settings.json").read_text())["lr"] == 0.1
    assert not lock_path(out).exists()
    # a key that does not change results is not compared
    assert _run(out, {"lr": 0.1, "opt": {"momentum": 0.9}, "seed": 5}, ignore=("seed",))[1]


def test_overwrite_discards_the_other_run(tmp_path):
    out = tmp_path / "run"
    _run(out, {"lr": 0.1})
    (out / "checkpoint.pt").write_bytes(b"work")
    run, resumes = _run(out, {"lr": 0.5}, overwrite=True)
    assert not resumes and run.stale
    assert not (out / "checkpoint.pt").exists() and json.loads((out / "settings.json").read_text()) == {"lr": 0.5}
    # the same settings with --overwrite resume (a script decides whether to redo a finished run)
    (out / "checkpoint.pt").write_bytes(b"work")
    assert _run(out, {"lr": 0.5}, overwrite=True)[1] and (out / "checkpoint.pt").is_file()
    # discard_only: those files go, the rest (a log) stays
    (out / "train.log").write_text("earlier run\n")
    _run(out, {"lr": 0.7}, overwrite=True, discard_only=("*.pt",))
    assert not (out / "checkpoint.pt").exists() and (out / "train.log").read_text() == "earlier run\n"


def test_damaged_settings_refused_or_discarded(tmp_path):
    out = tmp_path / "run"
    _run(out, {"lr": 0.1})
    (out / "settings.json").write_text('{"lr": ')
    with pytest.raises(UserError, match=r"settings\.json is damaged \(.*\); start afresh"):
        _run(out, {"lr": 0.1}, damaged="start afresh")
    run, resumes = _run(out, {"lr": 0.1}, overwrite=True)
    assert not resumes and json.loads((out / "settings.json").read_text()) == {"lr": 0.1}


def test_older_settings_upgraded_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # written before precision: bf16 true; this machine would choose fp32
    (out / "settings.json").write_text(json.dumps({"lr": 0.1, "training": {"bf16": True}}))
    settings = {"lr": 0.1, "training": {"precision": "fp32"}}

    def upgrade(old: dict) -> dict:
        return {**old, "training": legacy_precision(old["training"])}

    run, resumes = _run(out, settings, upgrade=upgrade, keep=("training.precision",))
    assert resumes and settings["training"]["precision"] == "bf16"
    assert "precision: 'bf16' kept from the run being resumed in" in capsys.readouterr().out
    # YAML settings files (the attack records' config.yaml) read and written alike
    rec = tmp_path / "record"
    with RunFolder(rec, {"attack": "badnet"}, settings_file="config.yaml") as r:
        r.check()
        r.open(content=yaml.safe_dump({"attack": "badnet"}))
    with pytest.raises(UserError, match="attack: 'badnet' -> 'blended'"):
        _run(rec, {"attack": "blended"}, settings_file="config.yaml")


_HOLD = (
    "import sys,time; sys.path.insert(0, sys.argv[1]); from utils.run_state import RunFolder; "
    "r = RunFolder(sys.argv[2], {}); r.__enter__(); print('held', flush=True); time.sleep(60)"
)


def test_lock_refused_while_another_live_process_holds_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(REPO), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as e:
            _run(out, {"lr": 0.1})
        msg = str(e.value)
        assert f"{out} is in use by another run (PID {holder.pid} on {socket.gethostname()}" in msg
        assert str(lock_path(out)) in msg and "\n" not in msg
        assert not out.exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock is taken over; another output (a state folder's result) can be locked
    run, _ = _run(out, {"lr": 0.1}, lock=tmp_path / "result.pkl")
    assert run.lock == tmp_path / "result.pkl" and not lock_path(tmp_path / "result.pkl").exists()
    assert json.loads(lock_path(out).read_text())["pid"] == holder.pid  # untouched: not this run's lock
    _run(out, {"lr": 0.1})
    assert not lock_path(out).exists()
