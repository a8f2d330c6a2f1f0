"""bench/gpu_check.py's dry run (``--device cpu --tiny``): every part runs and is recorded,
so the one GPU run it is written for finds no bug of its own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ["tests", "e2e", "speed", "projection"]


def test_dry_run_passes_every_part(tmp_path: Path, cifar_root: Path, fixtures_dir: Path) -> None:
    out = tmp_path / "out"
    # the environment conftest set up (CIFAR10_ROOT, no downloads); one thread on a shared CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (out / "gpu_check.md").is_file() and (out / "gpu_check.json").is_file()
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] is True
    assert [p["name"] for p in report["parts"]] == PARTS
    for p in report["parts"]:
        assert p["status"] == "ok", p
        assert f"] {p['name']}: ok in " in res.stdout  # one progress line per part, with seconds
    # every script ran and its output says it ran on the CPU
    steps = report["parts"][1]["details"]
    assert len(steps) == 6 and all(s["status"] == "ok" and s["device"].startswith("cpu") for s in steps)
    assert report["device"]["name"] and report["device"]["torch"] and report["device"]["date"]
    # speed: the reference, the policy's choice, both precisions where measured; no GPU memory on a CPU
    rows = report["measurements"]
    assert {m["workload"] for m in rows} == {
        "purification",
        "dataelixir_candidates",
        "diffusion_training",
        "victim_training",
    }
    assert all(m["peak_mib"] is None for m in rows)
    for workload in {m["workload"] for m in rows}:
        mine = [m for m in rows if m["workload"] == workload]
        assert sum(m["reference"] for m in mine) == 1 and sum(m["policy"] for m in mine) == 1
        assert all(m["value"] is None or m["value"] > 0 for m in mine)
    assert {m["attention"] for m in rows if m["workload"] == "purification"} == {"einsum", "sdpa"}
    # projection: one positive wall time per paper-scale job
    jobs = report["projections"]
    assert [j["key"] for j in jobs] == ["purification", "dataelixir", "diffusion_training", "victim"]
    for j in jobs:
        for k in ("policy", "reference", "fastest"):
            sec = j[k]["seconds"]
            assert isinstance(sec, float) and math.isfinite(sec) and sec > 0, (j["key"], k, sec)
    md = (out / "gpu_check.md").read_text()
    for word in (*PARTS, "image-steps/s", "images/s", "iterations/s", report["device"]["torch"]):
        assert word in md
    assert wall < 180, f"the dry run took {wall:.0f} s"
