"""Finished runs and file writes: the last file written marks a run finished, a kill at any
write leaves a run that the same command finishes, results rows are keyed by run, names
fit the file system before any work starts, and written files follow the umask."""

from __future__ import annotations

import json
import os

import pytest
import torch

import poison
import purification
import train
import utils.diffusion.purify as purify_mod
import utils.poisons.run as poison_run
from utils.data import ImageSet, read_eclipse_pkl, write_eclipse_pkl
from utils.diffusion.factory import load_diffusion_spec
from utils.fileio import UserError, atomic_torch_save, atomic_write_text
from utils.run_state import check_name

TINY_CFG = "config/eclipse/cpu.yml"
OUT = "purified_data/cifar10/tiny/2/5/URP-pure"


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def _exit_code(fn, argv) -> int:
    try:
        fn(argv)
    except SystemExit as e:
        return e.code
    return 0


def _dies_once(monkeypatch, module, name: str, when=lambda *a, **k: True) -> list:
    """``module.name`` raises KeyboardInterrupt (a kill) on its first call for which ``when``
    holds, and works as before afterwards; returns the list of kills."""
    real, kills = getattr(module, name), []

    def dying(*a, **k):
        if not kills and when(*a, **k):
            kills.append(1)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, dying)
    return kills


# --------------------------------------------------------------------------- train.py


def _train_argv(work, *extra):
    return [
        *("--poison", "clean", "--subset", "20", "--arch", "resnet18", "--width", "8", "--epochs", "1"),
        *("--batch_size", "10", "--test_subset", "20", "--precision", "fp32", "--work_dir", str(work), *extra),
    ]


def _rows(work) -> tuple[list[str], list[str]]:
    return (work / "results.csv").read_text().splitlines(), (work / "results_extra.csv").read_text().splitlines()


def test_train_killed_before_result_json_appends_its_rows_once(tmp_path, capsys):
    """Item 3: a kill after the rows and before result.json; the re-run finds its rows."""
    with pytest.MonkeyPatch.context() as mp:
        kills = _dies_once(mp, train, "atomic_write_json", lambda path, obj: str(path).endswith("result.json"))
        assert _exit_code(train.main, _train_argv(tmp_path, "--run_name", "a")) == 130 and kills
    rows, extra = _rows(tmp_path)
    assert len(rows) == 1 and len(extra) == 2 and not (tmp_path / "runs/train/a/result.json").exists()
    train.main(_train_argv(tmp_path, "--run_name", "a"))
    res = json.loads((tmp_path / "runs/train/a/result.json").read_text())
    assert _rows(tmp_path) == (rows, extra)
    assert rows[0].endswith(f",{res['final_test_acc']!r}") and extra[1].endswith(",a")
    capsys.readouterr()
    train.main(_train_argv(tmp_path, "--run_name", "a"))
    assert "is finished" in capsys.readouterr().out and _rows(tmp_path) == (rows, extra)


def test_train_rows_are_keyed_by_run(tmp_path, monkeypatch):
    """Item 3: a kill between the two files' rows, another run's rows between, and --overwrite."""
    real = train._append_line
    kills = _dies_once(monkeypatch, train, "_append_line", lambda file, line: line.endswith(",a\r\n"))
    assert _exit_code(train.main, _train_argv(tmp_path, "--run_name", "a")) == 130 and kills
    monkeypatch.setattr(train, "_append_line", real)
    assert len(_rows(tmp_path)[0]) == 1 and len(_rows(tmp_path)[1]) == 1  # results.csv's row, extra's header
    train.main(_train_argv(tmp_path, "--run_name", "b", "--seed", "1"))
    train.main(_train_argv(tmp_path, "--run_name", "a"))
    rows, extra = _rows(tmp_path)
    assert len(rows) == 2 and [r.rsplit(",", 1)[1] for r in extra[1:]] == ["b", "a"]
    # the run redone with other settings replaces its rows where they stand, the other run's stay
    (tmp_path / "results.csv").write_bytes((tmp_path / "results.csv").read_bytes().replace(b"\r\n", b"\n"))
    train.main(_train_argv(tmp_path, "--run_name", "a", "--epochs", "2", "--overwrite"))
    res = json.loads((tmp_path / "runs/train/a/result.json").read_text())
    rows2, extra2 = _rows(tmp_path)
    assert len(rows2) == 2 and rows2[1] == rows[1] and rows2[0].endswith(f",{res['final_test_acc']!r}")
    assert len(extra2) == 3 and extra2[:2] == extra[:2] and extra2[2].endswith(",none,8,2,20,0,a")
    assert (tmp_path / "results.csv").read_bytes().count(b"\r") == 0  # the file's own line ends kept


def test_train_killed_before_model_pt_resumes_and_writes_it(tmp_path, capsys):
    """Item 12: model.pt before result.json; checkpoint.pt removed only after it."""
    run = tmp_path / "runs/train/a"
    with pytest.MonkeyPatch.context() as mp:
        kills = _dies_once(mp, train, "atomic_torch_save", lambda obj, path: str(path).endswith("model.pt"))
        assert _exit_code(train.main, _train_argv(tmp_path, "--run_name", "a")) == 130 and kills
    assert (run / "checkpoint.pt").is_file() and not (run / "result.json").exists()
    capsys.readouterr()
    train.main(_train_argv(tmp_path, "--run_name", "a"))
    assert "Finished Training" in capsys.readouterr().out
    assert (run / "result.json").is_file() and not (run / "checkpoint.pt").exists()
    assert "conv1.weight" in torch.load(run / "model.pt", weights_only=True)
    assert len(_rows(tmp_path)[0]) == 1


# --------------------------------------------------------------------------- poison.py


def _poison(work, *extra) -> int:
    argv = ["--poison", "URP", "--subset", "20", "--work_dir", str(work), "--no_progress", "--threads", "1", *extra]
    return _exit_code(poison.main, argv)


@pytest.mark.parametrize("kill_at", ["atomic_write_json", "write_eclipse_pkl"])
def test_poison_killed_between_its_outputs_is_finished_by_a_rerun(tmp_path, monkeypatch, kill_at):
    """Item 12: the .json before the .pkl, the .pkl marks the run finished."""
    out = tmp_path / "poisoned_data/cifar10/URP.pkl"
    real = getattr(poison_run, kill_at)
    kills = _dies_once(monkeypatch, poison_run, kill_at)
    assert _poison(tmp_path) == 130 and kills
    assert not out.exists()  # not finished: the demo and train.py see no poisoned set
    monkeypatch.setattr(poison_run, kill_at, real)
    assert _poison(tmp_path) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["n_images"] == len(read_eclipse_pkl(out)) == 20
    assert not out.with_suffix(".work").exists()


def test_poison_overwrite_removes_the_earlier_result_first(tmp_path, monkeypatch):
    out = tmp_path / "poisoned_data/cifar10/URP.pkl"
    assert _poison(tmp_path) == 0
    _dies_once(monkeypatch, poison_run, "write_eclipse_pkl")
    assert _poison(tmp_path, "--seed", "1", "--overwrite") == 130
    # the new summary never stands beside the earlier set: the run is unfinished, and resumes
    assert not out.exists() and json.loads(out.with_suffix(".json").read_text())["seed"] == 1


# --------------------------------------------------------------------------- purification.py


def _purif_work(work, images=24):
    g = torch.Generator().manual_seed(0)
    data = ImageSet(
        torch.randint(0, 256, (images, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(images) % 10
    )
    write_eclipse_pkl(work / "poisoned_data/cifar10/URP.pkl", data)
    spec = load_diffusion_spec(TINY_CFG)
    torch.manual_seed(0)
    model = spec.build_model()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    ckpt = work / "diff_ckpt/cifar10/tiny/ema_0.9999_5.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt)


def _purif_argv(work, *extra):
    return [
        *("--poison", "URP", "--config", TINY_CFG, "--sparse_set", "tiny", "--sparse_diff_model", "ema_0.9999_5.pt"),
        *("--t", "2", "--batch_size", "8", "--bf16", "false", "--work_dir", str(work), *extra),
    ]


@pytest.fixture
def reference(tmp_path):
    """A finished purification run, and a work folder with the same inputs."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    _purif_work(ref)
    _purif_work(run)
    purification.main(_purif_argv(ref))
    return ref, run


@pytest.mark.parametrize("kill_at", ["atomic_write_json", "write_eclipse_pkl"])
def test_purification_killed_between_its_outputs_is_finished_by_a_rerun(reference, monkeypatch, kill_at):
    """Item 12: the .json before the .pkl; the re-run resumes from the kept batches."""
    ref, run = reference
    real = getattr(purification, kill_at)
    kills = _dies_once(monkeypatch, purification, kill_at)
    assert _exit_code(purification.main, _purif_argv(run)) == 130 and kills
    assert not (run / f"{OUT}.pkl").exists() and (run / "purified_data/cifar10/tiny/2/5/.URP-pure.parts").is_dir()
    monkeypatch.setattr(purification, kill_at, real)
    purification.main(_purif_argv(run))
    assert (run / f"{OUT}.pkl").read_bytes() == (ref / f"{OUT}.pkl").read_bytes()
    assert json.loads((run / f"{OUT}.json").read_text())["images_resumed"] == 24


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "empty", "not a tensor"])
def test_purification_redoes_a_damaged_first_batch(reference, monkeypatch, damage):
    """Item 11: every batch alike, the first included: a damaged one is redone."""
    ref, run = reference
    calls = []
    kills = _dies_once(monkeypatch, purify_mod, "noise_and_denoise", lambda *a, **k: calls.append(1) or len(calls) == 3)
    assert _exit_code(purification.main, _purif_argv(run)) == 130 and kills  # batches 0 and 1 done
    part = run / "purified_data/cifar10/tiny/2/5/.URP-pure.parts/part_00000.pt"
    raw = part.read_bytes()
    if damage == "not a tensor":
        torch.save({"x": 1}, part)
    else:
        part.write_bytes({"truncated": raw[: len(raw) // 2], "zeroed": bytes(len(raw)), "empty": b""}[damage])
    purification.main(_purif_argv(run))
    assert (run / f"{OUT}.pkl").read_bytes() == (ref / f"{OUT}.pkl").read_bytes()
    assert json.loads((run / f"{OUT}.json").read_text())["images_resumed"] == 8  # batch 1 only


# --------------------------------------------------------------------------- names that fit


def test_check_name_fits_the_file_systems_limits(tmp_path, monkeypatch):
    """Item 10: the name, its lock file and the atomic write's temporary name of each made name."""
    assert check_name("a" * 241, "--x", ("{}",), tmp_path)  # .<name>.XXXXXXXX.tmp: 255
    with pytest.raises(UserError) as e:
        check_name("a" * 242, "--x", ("{}",), tmp_path)
    msg = str(e.value)
    assert msg.startswith("--x ") and "255 (NAME_MAX)" in msg and "at most 241" in msg and "\n" not in msg
    assert check_name("a" * 249, "--x", folder=tmp_path)  # a folder (the default): .<name>.lock
    with pytest.raises(UserError, match=r"\(\.<name>\.lock\).*at most 249 characters"):
        check_name("a" * 250, "--x")
    with pytest.raises(UserError, match="at most 236 characters"):
        check_name("a" * 240, "--name", ("{}.json",), tmp_path)
    assert check_name("a" * 255, "--model", (), tmp_path)  # only read: the name itself
    real = os.pathconf
    monkeypatch.setattr(os, "pathconf", lambda p, k: 100 if k == "PC_NAME_MAX" else real(p, k))
    with pytest.raises(UserError, match=r"--x .* over the file system's limit of 100 \(NAME_MAX\)"):
        check_name("a" * 95, "--x", folder=tmp_path / "not" / "made" / "yet")
    monkeypatch.setattr(os, "pathconf", lambda p, k: len(str(tmp_path)) + 20 if k == "PC_PATH_MAX" else 255)
    with pytest.raises(UserError, match=r"--x .* \(PATH_MAX\); use a shorter name or --work_dir"):
        check_name("a" * 20, "--x", folder=tmp_path)


def test_long_names_are_refused_before_any_work(tmp_path, capsys):
    """Item 10: purification.py, train.py and poison.py, each naming its flag."""
    long = "P" * 235  # P.pkl fits; .P-pure.json.XXXXXXXX.tmp does not
    _purif_work(tmp_path)
    os.rename(tmp_path / "poisoned_data/cifar10/URP.pkl", tmp_path / f"poisoned_data/cifar10/{long}.pkl")
    argv = _purif_argv(tmp_path)
    argv[1] = long
    assert _exit_code(purification.main, argv) == 2
    msg = _err(capsys)
    assert msg.startswith(f"error: --poison '{long[:12]}...") and "255 (NAME_MAX)" in msg and "at most 231" in msg
    assert not (tmp_path / "purified_data").exists()
    assert _exit_code(train.main, _train_argv(tmp_path, "--run_name", "r" * 250)) == 2
    assert _err(capsys).startswith("error: --run_name 'rrrrrrrrrrrr...") and not (tmp_path / "runs").exists()
    assert _poison(tmp_path, "--name", "n" * 240) == 2
    assert "--name 'nnnnnnnnnnnn...nnnnnnnn' is too long (240 characters)" in _err(capsys)
    assert not list((tmp_path / "poisoned_data/cifar10").glob("n*"))


# --------------------------------------------------------------------------- modes


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=oct)
def test_written_files_follow_the_umask(tmp_path, umask, mask):
    """Item 18: files written atomically get 0666 less the umask, as any other program's."""
    umask(mask)
    atomic_write_text(tmp_path / "a.json", "{}")
    atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "sub" / "b.pt")
    for f in (tmp_path / "a.json", tmp_path / "sub" / "b.pt"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "sub"]  # no temporary file left
