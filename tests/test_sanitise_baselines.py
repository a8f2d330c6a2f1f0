"""DataElixir's sanitisation baselines (``utils/baselines/sanitise.py``,
``bench/sanitise_baselines.py``): Spectral Signatures and Activation Clustering on synthetic
features whose poisoned rows are known, their parts against formulas written here, and the
script end to end on a tiny attack record."""

from __future__ import annotations

import csv
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ATTACK, attack_argv

from utils.baselines.sanitise import (
    activation_clustering,
    pca_reduce,
    removal_rates,
    spectral_scores,
    spectral_signatures,
    two_means,
)
from utils.dataelixir.flow import run_attack_then_defence

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def _features(
    seed: int = 0,
    clean: int = 200,
    poisoned: int = 20,
    shift: float = 6.0,
    dims: int = 32,
    classes: int = 10,
    target: int = 0,
):
    """``classes`` classes of N(0, I) features; class ``target`` also holds ``poisoned`` rows
    shifted by ``shift`` along one unit direction (rows 0 .. poisoned-1)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(classes * clean + poisoned, dims, generator=g, dtype=torch.float64)
    u = torch.randn(dims, generator=g, dtype=torch.float64)
    feats[:poisoned] += shift * u / u.norm()
    labels = torch.cat([torch.full((poisoned,), target), torch.arange(classes).repeat_interleave(clean)])
    poison = torch.zeros(len(labels), dtype=torch.bool)
    poison[:poisoned] = True
    return feats, labels, poison


def test_spectral_scores_are_tran_formula():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = x.numpy() - x.numpy().mean(0)
    v = np.linalg.svd(c, full_matrices=False)[2][0]
    np.testing.assert_allclose(spectral_scores(x).numpy(), (c @ v) ** 2, rtol=1e-10)


def test_spectral_signatures_remove_the_shifted_rows_and_1_5_eps_per_class():
    feats, labels, poison = _features()
    flagged = spectral_signatures(feats, labels, 10, eps=0.1, multiplier=1.5)
    assert flagged[poison].all()  # every poisoned row among the removed
    per_class = torch.bincount(labels[flagged], minlength=10)
    assert per_class.tolist() == [int(1.5 * 0.1 * 220)] + [int(1.5 * 0.1 * 200)] * 9
    rates = removal_rates(flagged, poison)
    assert (rates.tpr, rates.removed_poisoned, rates.removed) == (1.0, 20, int(flagged.sum()))
    assert rates.fpr == pytest.approx((rates.removed - 20) / 2000)


def test_pca_reduce_is_the_leading_principal_coordinates():
    x = torch.randn(60, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * torch.arange(1, 13)
    c = x.numpy() - x.numpy().mean(0)
    vt = np.linalg.svd(c, full_matrices=False)[2][:4]
    ours = pca_reduce(x, 4).numpy()
    np.testing.assert_allclose(np.abs(ours), np.abs(c @ vt.T), rtol=1e-9, atol=1e-9)
    assert (np.abs(ours).max(0) > 0).all() and ours.shape == (60, 4)


def test_two_means_finds_the_best_split_of_a_line():
    """In one dimension the optimal 2-means partition is a threshold: the best of all thresholds."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(40, generator=g) * 0.5, torch.randn(15, generator=g) * 0.5 + 4])
    assign, inertia = two_means(x[:, None].double(), torch.Generator().manual_seed(0))
    xs = np.sort(x.double().numpy())
    best = min(((xs[:k] - xs[:k].mean()) ** 2).sum() + ((xs[k:] - xs[k:].mean()) ** 2).sum() for k in range(1, len(xs)))
    assert inertia == pytest.approx(best, rel=1e-9)
    assert len(set(assign[:40].tolist())) == 1 and len(set(assign[40:].tolist())) == 1 and assign[0] != assign[-1]


def test_activation_clustering_flags_the_small_separated_cluster_only():
    feats, labels, poison = _features(shift=12.0)
    flagged = activation_clustering(feats, labels, 10, dims=10, analysis="relative_size", seed=0)
    assert torch.equal(flagged, poison)  # the clean classes split about evenly: nothing flagged there
    smaller = activation_clustering(feats, labels, 10, dims=10, analysis="smaller", seed=0)
    assert torch.equal(smaller[labels == 0], poison[labels == 0])
    per_class = torch.bincount(labels[smaller], minlength=10)[1:]
    assert ((per_class > 0) & (per_class <= 100)).all()  # BackdoorBench's rule: every class loses its smaller half
    assert torch.equal(flagged, activation_clustering(feats, labels, 10, seed=0))  # seeded
    with pytest.raises(ValueError, match="analysis must be"):
        activation_clustering(feats, labels, 10, analysis="silhouette")


def test_both_methods_look_at_classes_past_the_tenth():
    """A dataset of 12 classes poisoned into class 11: both rules must loop over its 12 classes
    (the count ``sanitise_record`` reads from the record's dataset), not CIFAR-10's 10."""
    feats, labels, poison = _features(shift=12.0, classes=12, target=11)
    ss = spectral_signatures(feats, labels, 12, eps=0.1, multiplier=1.5)
    assert ss[poison].all()
    assert torch.bincount(labels[ss], minlength=12).tolist() == [int(1.5 * 0.1 * 200)] * 11 + [int(1.5 * 0.1 * 220)]
    assert torch.equal(activation_clustering(feats, labels, 12, seed=0), poison)
    assert not spectral_signatures(feats, labels, 10)[labels >= 10].any()  # what CIFAR-10's count missed


def test_relative_size_is_strict_as_art():
    """A cluster of exactly ``size_threshold`` of its class is not flagged (ART's ``<``)."""
    feats, labels, poison = _features(clean=0, poisoned=20, shift=0.0, classes=1)
    feats[:7] += 50.0  # 7 of 20 = 0.35: two clusters of 7 and 13
    assert not activation_clustering(feats, labels, 1, size_threshold=0.35).any()
    assert activation_clustering(feats, labels, 1, size_threshold=0.36)[:7].all()


@pytest.fixture(scope="module")
def record(tmp_path_factory, cifar_root) -> Path:
    work = tmp_path_factory.mktemp("sanitise")
    argv = attack_argv(work, "tiny", TINY_ATTACK)
    argv += ["--diffusion_ckpt", "diff_ckpt/none.pt", "--stop_after", "backdoor_training"]
    assert run_attack_then_defence("badnet", argv) == {}
    return work / "record" / "tiny"


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(REPO / "bench"))
    return importlib.import_module("sanitise_baselines")


@pytest.mark.parametrize("method", ["ss", "ac"])
def test_script_on_a_tiny_record(record: Path, script, tmp_path, method: str, capsys):
    out = tmp_path / method
    script.main(["--record", str(record), "--method", method, "--out", str(out), "--device", "cpu"])
    res = json.loads((out / "sanitise.json").read_text())
    poison = torch.load(record / "attack_data.pt", weights_only=True)["poison_indicator"].bool()
    flagged = torch.zeros(len(poison), dtype=torch.bool)
    flagged[res["flagged"]] = True
    r = res["removal"]
    assert r["removed"] == len(res["flagged"]) == res["n_train"] - res["n_train_after"] and res["n_train"] == 200
    assert r["poisoned"] == int(poison.sum()) == 40 and r["removed_poisoned"] == int((flagged & poison).sum())
    assert r["tpr"] == r["removed_poisoned"] / 40 and r["fpr"] == pytest.approx(
        (r["removed"] - r["removed_poisoned"]) / 160
    )
    assert set(res["after"]) == {"BA", "ASR", "RA"} and all(v is not None for v in res["after"].values())
    assert res["before"] == {
        k: v
        for k, v in json.loads((record / "backdoored_history.json").read_text())[-1].items()
        if k in ("BA", "ASR", "RA")
    }
    assert (
        len(res["history"]) == TINY_ATTACK["epochs"]
        and (out / "model.pt").is_file()
        and not (out / "retrain.ckpt").exists()
    )
    rows = list(csv.reader((out / "sanitise.csv").open()))
    assert rows[0] == script.CSV_COLUMNS and len(rows) == 2 and rows[1][1] == method
    if method == "ss":
        assert r["removed"] == sum(
            int(1.5 * 0.1 * n)
            for n in torch.bincount(torch.load(record / "attack_data.pt", weights_only=True)["train_labels"]).tolist()
        )
        script.main(["--record", str(record), "--method", method, "--out", str(out), "--device", "cpu"])
        assert "is finished" in capsys.readouterr().out  # reported, not redone
        with pytest.raises(SystemExit):
            script.main(["--record", str(record), "--method", "ss", "--ss_eps", "0.2", "--out", str(out)])
        assert "other settings (options.eps: 0.1 -> 0.2)" in capsys.readouterr().err


def test_script_refuses_a_folder_without_a_record(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--record", str(tmp_path), "--method", "ac"])
    assert "config.yaml not found: run the attack with --stop_after backdoor_training" in capsys.readouterr().err


def test_backdoored_curves_tables_a_real_record_and_refuses_bad_ones(record: Path, tmp_path, capsys):
    """bench/backdoored_curves.py on the tiny record: its last epoch's BA/ASR/RA, its time, the
    configuration it ran with; a record without a finished backdoor_training is one line."""
    sys.path.insert(0, str(REPO / "bench"))
    curves = importlib.import_module("backdoored_curves")
    out = tmp_path / "curves"
    curves.main(["--records", str(record), "--out", str(out), "--target", "0"])
    history = json.loads((record / "backdoored_history.json").read_text())
    (res,) = json.loads((out / "backdoored_curves.json").read_text())["records"]
    row = res["row"]
    assert {k: row[k] for k in ("BA", "ASR", "RA")} == {k: history[-1][k] for k in ("BA", "ASR", "RA")}
    assert row["minutes"] == pytest.approx(sum(h["seconds"] for h in history) / 60)
    assert (row["model"], row["subset"], row["model_width"], row["target_epoch"]) == ("preactresnet18", 200, 4, 1)
    assert (out / "backdoored_curves.png").stat().st_size > 0
    assert list(csv.reader((out / "backdoored_curves.csv").open()))[0] == list(curves.COLUMNS)
    for argv, message in (
        (["--records", str(tmp_path)], "backdoored_history.json is missing"),
        (["--records", str(record), "--out", str(out)], "already exists"),
    ):
        with pytest.raises(SystemExit) as e:
            curves.main(argv if "--out" in argv else [*argv, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
