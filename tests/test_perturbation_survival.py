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
from utils.demo_pipeline import SPARSE_SET  # noqa: E402
from utils.paths import poisoned_file, purified_file  # noqa: E402


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
        json.dumps({"poison": "EM", "subset": {"n": n, "seed": 0, "indices": idx.tolist()}})
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
    assert (out / "survival.csv").read_text().splitlines()[1].startswith("EM,1.0000,")
    assert (out / "survival.png").stat().st_size > 0
    with pytest.raises(SystemExit) as e:
        ps.main(argv)
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    ps.main([*argv, "--overwrite"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("poisons", "unknown poison(s) XYZ"),
        ("not_purified", "TAP-pure.pkl"),
        ("other_t", "no poison has both"),
        ("labels", "differ from the clean subset"),
        ("json", "subset.indices must list the 200"),
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
    elif change == "json":
        poisoned_file(tmp_path, "EM").with_suffix(".json").write_text(json.dumps({"subset": {"indices": [1, 2]}}))
    with pytest.raises(SystemExit) as e:
        ps.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
