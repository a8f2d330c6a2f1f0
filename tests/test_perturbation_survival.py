"""bench/perturbation_survival.py: the share of a perturbation left after purification, on
real images, and the CLI on a work dir laid out as the demo's."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import perturbation_survival as ps  # noqa: E402

from utils.data import ImageSet, class_balanced_subset, write_eclipse_pkl  # noqa: E402
from utils.demo.pipeline import SPARSE_SET  # noqa: E402
from utils.paths import poisoned_file, purified_file  # noqa: E402
from utils.poisons.common import measure_norms  # noqa: E402


def _signs(shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 2, shape, generator=g).to(torch.int16) * 2 - 1


def _poison(clean: torch.Tensor, eps: int = 8) -> torch.Tensor:
    return (clean.to(torch.int16) + eps * _signs(tuple(clean.shape))).clamp(0, 255).to(torch.uint8)


def test_share_is_one_zero_and_a_half_on_real_images(small_train):
    clean = small_train.images
    poisoned = _poison(clean)
    assert ps.survival(clean, poisoned, poisoned)["surviving_share"] == pytest.approx(1.0)
    assert ps.survival(clean, poisoned, poisoned)["other_change_l2"] == pytest.approx(0.0, abs=1e-9)
    none_left = ps.survival(clean, poisoned, clean)
    assert none_left["surviving_share"] == 0.0 and none_left["change_l2"] == 0.0
    half = (clean.to(torch.int16) + (poisoned.to(torch.int16) - clean.to(torch.int16)) // 2).to(torch.uint8)
    m = ps.survival(clean, poisoned, half)
    # pixels clamped at 0/255 move by an odd amount, whose floored half is a little under 0.5
    assert 0.45 < m["surviving_share"] <= 0.5 and m["cosine"] > 0.99
    # an image change orthogonal to delta (another sign pattern) leaves the share, raises the rest
    other = (half.to(torch.int16) + 3 * _signs((1, *clean.shape[1:])).roll(1, -1)).clamp(0, 255).to(torch.uint8)
    m2 = ps.survival(clean, poisoned, other)
    assert (
        abs(m2["surviving_share"] - m["surviving_share"]) < 0.02 and m2["other_change_l2"] > m["other_change_l2"] + 0.3
    )
    untouched = ps.survival(clean, clean, poisoned)  # a poison that changed nothing has no share
    assert untouched["perturbed_images"] == 0 and untouched["surviving_share"] != untouched["surviving_share"]


def _work_dir(tmp_path, cifar_train, n: int = 200):
    idx = class_balanced_subset(cifar_train.labels, n, seed=0)
    clean = cifar_train.subset(idx)
    poisoned = ImageSet(_poison(clean.images), clean.labels)
    write_eclipse_pkl(poisoned_file(tmp_path, "EM"), poisoned)
    poisoned_file(tmp_path, "EM").with_suffix(".json").write_text(
        json.dumps(
            {
                "poison": "EM",
                "subset": {"n": n, "seed": 0, "indices": idx.tolist()},
                "norms": measure_norms(clean.images, poisoned.images),
            }
        )
    )
    write_eclipse_pkl(purified_file(tmp_path, SPARSE_SET, 100, 3000, "EM"), poisoned)
    write_eclipse_pkl(poisoned_file(tmp_path, "TAP"), poisoned)  # not purified yet: left out of 'all'
    return clean


def test_cli_writes_every_output_and_refuses_to_overwrite(tmp_path, cifar_train, capsys):
    _work_dir(tmp_path, cifar_train)
    out = tmp_path / "out"
    argv = ["--work_dir", str(tmp_path), "--out", str(out), "--t", "100", "--diffusion_iterations", "3000"]
    ps.main(argv)
    result = json.loads((out / "survival.json").read_text())
    assert [r["poison"] for r in result["rows"]] == ["EM"]
    assert result["rows"][0]["surviving_share"] == pytest.approx(1.0)
    assert (out / "survival.csv").read_text().splitlines()[1].startswith("EM,purified set (3000 iterations),1.0000,")
    assert (out / "survival.png").stat().st_size > 0
    with pytest.raises(SystemExit) as e:
        ps.main(argv)
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    ps.main([*argv, "--overwrite"])


def test_purified_dir_reads_another_defences_purified_sets(tmp_path, cifar_train, capsys):
    """--purified_dir: <P>-pure.pkl from another folder (the cross-threat table's DataElixir rounds)."""
    clean = _work_dir(tmp_path, cifar_train)
    other = tmp_path / "elixir"
    write_eclipse_pkl(other / "EM-pure.pkl", clean)  # a purifier that removed the whole perturbation
    out = tmp_path / "out"
    ps.main(["--work_dir", str(tmp_path), "--out", str(out), "--purified_dir", str(other)])
    (row,) = json.loads((out / "survival.json").read_text())["rows"]
    assert row["poison"] == "EM" and row["surviving_share"] == pytest.approx(0.0) and str(other) in row["setting"]
    with pytest.raises(SystemExit):
        ps.main(["--work_dir", str(tmp_path), "--out", str(out), "--purified_dir", str(other), "--ckpts", "x.pt"])
    assert "choose one" in capsys.readouterr().err


def _random_checkpoint(work, name: str = "ema_0.9999_5.pt"):
    from utils.diffusion.factory import load_diffusion_spec
    from utils.paths import diff_ckpt_dir

    torch.manual_seed(0)
    model = load_diffusion_spec(REPO / "config" / "eclipse" / "cpu.yml").build_model()
    for q in model.parameters():  # the zero-initialised output layers would make denoising the identity
        q.data.normal_(0, 0.02)
    path = diff_ckpt_dir(work, SPARSE_SET) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


def test_purify_mode_matches_purification_py(tmp_path, cifar_train):
    """--ckpts purifies as purification.py does: on the whole set, the same bytes, so the same row."""
    import purification

    _work_dir(tmp_path, cifar_train, n=20)
    _random_checkpoint(tmp_path)
    common = ["--work_dir", str(tmp_path), "--poisons", "EM", "--t", "4"]
    purification.main(
        [*common[:2], "--poison", "EM", "--config", "cpu.yml", "--sparse_diff_model", "ema_0.9999_5.pt", "--t", "4"]
    )
    ps.main([*common, "--diffusion_iterations", "5", "--out", str(tmp_path / "a")])
    ps.main(
        [*common, "--ckpts", "ema_0.9999_5.pt", "--respace", "all,2", "--images", "20", "--out", str(tmp_path / "b")]
    )
    (demo_row,) = json.loads((tmp_path / "a" / "survival.json").read_text())["rows"]
    full, two = json.loads((tmp_path / "b" / "survival.json").read_text())["rows"]
    assert full["setting"] == "5 iterations, 4 steps" and two["setting"] == "5 iterations, 2 steps"
    metrics = ("surviving_share", "cosine", "delta_l2", "change_l2", "other_change_l2", "images")
    assert {k: full[k] for k in metrics} == {k: demo_row[k] for k in metrics}
    assert two["surviving_share"] != full["surviving_share"]
    ps.main([*common, "--ckpts", "ema_0.9999_5.pt", "--images", "10", "--out", str(tmp_path / "c")])
    assert json.loads((tmp_path / "c" / "survival.json").read_text())["rows"][0]["images"] == 10


def test_ckpts_cells_resume_refuse_other_settings_and_draw_the_curve(tmp_path, cifar_train, capsys):
    """Each (poison, checkpoint, steps) cell is kept as it finishes: a re-run computes nothing,
    a run with other settings into the same --out is refused, and two checkpoints give the curve."""
    _work_dir(tmp_path, cifar_train, n=20)
    _random_checkpoint(tmp_path, "ema_0.9999_5.pt")
    _random_checkpoint(tmp_path, "ema_0.9999_10.pt")
    out = tmp_path / "curve"
    argv = ["--work_dir", str(tmp_path), "--poisons", "EM", "--t", "3", "--images", "10", "--out", str(out)]
    ps.main([*argv, "--ckpts", "ema_0.9999_5.pt"])
    first = json.loads((out / "survival.json").read_text())["rows"]
    assert [(r["iterations"], r["steps"]) for r in first] == [(5, 3)]
    assert not (out / "survival_curve.png").exists()
    capsys.readouterr()
    ps.main([*argv, "--ckpts", "ema_0.9999_5.pt,ema_0.9999_10.pt"])  # only the new checkpoint is purified
    assert capsys.readouterr().out.count("measured before") == 1
    rows = json.loads((out / "survival.json").read_text())["rows"]
    assert rows[0] == first[0] and [r["iterations"] for r in rows] == [5, 10]
    assert (out / "survival_curve.png").stat().st_size > 0
    assert (out / "survival.csv").read_text().splitlines()[2].endswith(",10,10,3")
    with pytest.raises(SystemExit) as e:
        ps.main([*argv, "--ckpts", "ema_0.9999_5.pt", "--seed", "7"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "EM__ema_0.9999_5__3.json was measured with seed=1234, this run has 7" in err
    assert len(err.strip().splitlines()) == 1
    ps.main([*argv, "--ckpts", "ema_0.9999_5.pt", "--seed", "7", "--overwrite"])
    assert json.loads((out / "survival.json").read_text())["rows"][0] != first[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("poisons", "unknown poison(s) XYZ"),
        ("not_purified", "TAP-pure.pkl"),
        ("other_t", "no poison has both"),
        ("labels", "EM-pure.pkl: its labels differ from the poisoned set"),
        ("json", "subset.indices must list the 200"),
        ("indices", "EM.json: against the clean images it names, the perturbation's mean L2 is"),
        ("ckpt", "diffusion checkpoint not found"),
        ("respace", "'0' is not a positive step count"),
    ],
)
def test_cli_bad_inputs_are_one_line_errors(tmp_path, cifar_train, capsys, change, message):
    _work_dir(tmp_path, cifar_train)
    argv = ["--work_dir", str(tmp_path), "--out", str(tmp_path / "out"), "--t", "100", "--diffusion_iterations", "3000"]
    if change == "poisons":
        argv += ["--poisons", "EM,XYZ"]
    elif change == "not_purified":
        argv += ["--poisons", "EM,TAP"]
    elif change == "other_t":
        argv[argv.index("--t") + 1] = "50"
    elif change == "labels":
        pure = purified_file(tmp_path, SPARSE_SET, 100, 3000, "EM")
        from utils.data import read_eclipse_pkl

        data = read_eclipse_pkl(pure)
        write_eclipse_pkl(pure, ImageSet(data.images, (data.labels + 1) % 10))
    elif change == "indices":  # the JSON names other training images than the ones poisoned
        meta = poisoned_file(tmp_path, "EM").with_suffix(".json")
        info = json.loads(meta.read_text())
        info["subset"]["indices"] = [i + 1 for i in info["subset"]["indices"]]
        meta.write_text(json.dumps(info))
    elif change == "ckpt":
        argv += ["--ckpts", "ema_0.999_000042.pt"]
    elif change == "respace":
        _random_checkpoint(tmp_path)
        argv += ["--ckpts", "ema_0.9999_5.pt", "--respace", "20,0"]
    elif change == "json":
        poisoned_file(tmp_path, "EM").with_suffix(".json").write_text(json.dumps({"subset": {"indices": [1, 2]}}))
    with pytest.raises(SystemExit) as e:
        ps.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
