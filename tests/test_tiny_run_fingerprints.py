"""bench/tiny_run_fingerprints.py's hashing: wall times and paths do not count, content does."""

from __future__ import annotations

import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tiny_run_fingerprints", REPO / "bench" / "tiny_run_fingerprints.py")
fp = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fp  # dataclasses look their module up
_spec.loader.exec_module(fp)


def test_timing_fields_and_work_dir_are_ignored(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"acc": 10.0, "seconds": 1.5, "history": [{"loss": 2.0, "seconds": 0.1}], "p": "/w1/x"}))
    b.write_text(json.dumps({"history": [{"seconds": 9.0, "loss": 2.0}], "p": "/w2/x", "acc": 10.0, "seconds": 7}))
    assert fp.hash_file(a, {"/w1": "<WORK>"}) == fp.hash_file(b, {"/w2": "<WORK>"})
    b.write_text(json.dumps({"acc": 10.5, "seconds": 1.5, "history": [{"loss": 2.0}], "p": "/w2/x"}))
    assert fp.hash_file(a, {"/w1": "<WORK>"}) != fp.hash_file(b, {"/w2": "<WORK>"})


def test_csv_drops_timing_columns(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("epoch,seconds,acc\n1,0.5,10\n")
    b.write_text("epoch,seconds,acc\n1,0.9,10\n")
    assert fp.hash_file(a) == fp.hash_file(b)
    b.write_text("epoch,seconds,acc\n1,0.9,11\n")
    assert fp.hash_file(a) != fp.hash_file(b)


def test_tensor_files_hash_by_content_not_container(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"w": t, "b": torch.zeros(2)}, tmp_path / "a.pt")
    torch.save({"b": torch.zeros(2), "w": t.clone()}, tmp_path / "b.pt", _use_new_zipfile_serialization=False)
    assert fp.hash_file(tmp_path / "a.pt") == fp.hash_file(tmp_path / "b.pt")
    t2 = t.clone()
    t2[1, 1] += 1
    torch.save({"w": t2, "b": torch.zeros(2)}, tmp_path / "c.pt")
    assert fp.hash_file(tmp_path / "a.pt") != fp.hash_file(tmp_path / "c.pt")
    torch.save({"w": t.double(), "b": torch.zeros(2)}, tmp_path / "d.pt")  # same values, other dtype
    assert fp.hash_file(tmp_path / "a.pt") != fp.hash_file(tmp_path / "d.pt")


def test_pkl_hashes_by_content_across_protocols(tmp_path):
    data = [(bytes(range(3)) * 1024, 3), (bytes(3072), np.int64(7))]
    for proto, name in ((2, "a.pkl"), (5, "b.pkl")):
        (tmp_path / name).write_bytes(pickle.dumps(data, protocol=proto))
    assert fp.hash_file(tmp_path / "a.pkl") == fp.hash_file(tmp_path / "b.pkl")
    (tmp_path / "c.pkl").write_bytes(pickle.dumps([data[0], (bytes(3072), 8)]))
    assert fp.hash_file(tmp_path / "a.pkl") != fp.hash_file(tmp_path / "c.pkl")


def test_logs_are_not_hashed(tmp_path):
    (tmp_path / "run.log").write_text("2026-01-01 started\n")
    assert fp.hash_file(tmp_path / "run.log") is None


def test_torch_file_metadata_is_normalised(tmp_path):
    """Training histories and JSON strings inside torch files carry wall times and paths."""
    w = torch.ones(3)
    for name, work, secs in (("a.pt", "/w1", 1.0), ("b.pt", "/w2", 2.0)):
        info = json.dumps({"path": f"{work}/model.pt", "train_seconds": secs, "acc": 50.0})
        torch.save({"w": w, "history": [{"loss": 1.0, "seconds": secs}], "info_json": info}, tmp_path / name)
    assert fp.hash_file(tmp_path / "a.pt", {"/w1": "<WORK>"}) == fp.hash_file(tmp_path / "b.pt", {"/w2": "<WORK>"})
    torch.save({"w": w, "history": [{"loss": 1.5, "seconds": 1.0}], "info_json": "{}"}, tmp_path / "c.pt")
    assert fp.hash_file(tmp_path / "a.pt", {"/w1": "<WORK>"}) != fp.hash_file(tmp_path / "c.pt", {"/w1": "<WORK>"})
