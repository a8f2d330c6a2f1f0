"""DataElixir's candidate store: its construction sharded across torchrun processes (two gloo
ranks write the same bytes as one process, each chunk's noise coming from its index alone),
and its header keyed by the DDPM checkpoint the attack scripts build it with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from utils.dataelixir import candidate_store as cs
from utils.dataelixir.keys import FlowConfig
from utils.dataelixir.models import build_candidates, build_model
from utils.diffusion.factory import spec_from_dict
from utils.fileio import UserError

REPO = Path(__file__).resolve().parents[1]

# a tiny random DDPM (32 channels, one level, 10 steps) and a linear classifier
TINY_DDPM = {
    "model": {"architecture": "ddpm", "ch": 32, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": []},
    "diffusion": {"num_diffusion_timesteps": 10},
}

# the candidates of the inputs in argv[1] (5 images in chunks of 2: rank 0 of 2 builds chunks
# 0 and 2, rank 1 chunk 1) into argv[2]
_SCRIPT = """
import sys
import torch
sys.path.insert(0, {repo!r})
from utils.dataelixir import defence as de
from utils.diffusion.factory import spec_from_dict
from utils.runtime import cleanup_distributed, init_distributed

torch.set_num_threads(1)
rank, world = init_distributed(torch.device("cpu"))
inputs = torch.load(sys.argv[1], weights_only=False)
spec = spec_from_dict(inputs["spec"], "tiny")
ddpm = spec.build_model().eval()
ddpm.load_state_dict(inputs["ddpm"])
logs = []
de.construct_candidates(
    ddpm, spec.build_diffusion(), inputs["classifier"], inputs["images"], sys.argv[2], steps_T=2, rounds_n=2,
    last_steps_m=2, batch_size=2, seed=11, bf16=False, rank=rank, world=world, log=logs.append,
)
print(*logs, f"rank {{rank}} of {{world}} done", sep="\\n", flush=True)
cleanup_distributed()
"""


def _inputs(path: Path) -> Path:
    import torch
    import torch.nn as nn

    from utils.diffusion.factory import spec_from_dict

    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    inputs = {
        "spec": TINY_DDPM,
        "ddpm": spec_from_dict(TINY_DDPM, "tiny").build_model().state_dict(),
        "classifier": nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval(),
        "images": torch.randint(0, 256, (5, 3, 32, 32), generator=g, dtype=torch.uint8),
    }
    torch.save(inputs, path)
    return path


def _run(tmp_path: Path, out: Path, processes: int) -> subprocess.CompletedProcess:
    script = tmp_path / "build_candidates.py"
    script.write_text(_SCRIPT.format(repo=str(REPO)))
    inputs = tmp_path / "inputs.pt"
    if not inputs.is_file():
        _inputs(inputs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable]
    if processes > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_port=29541"]
    cmd += [str(script), str(inputs), str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_two_ranks_write_the_bytes_of_one_process(tmp_path):

    one, two = tmp_path / "one", tmp_path / "two"
    _run(tmp_path, one, 1)
    res = _run(tmp_path, two, 2)
    assert "rank 0 of 2 done" in res.stdout and "rank 1 of 2 done" in res.stdout
    assert "left undone" not in res.stdout  # rank 1 built its chunk; rank 0 repaired nothing
    for name in ("candidates.u8", "preds.i16", "meta.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert sorted(p.name for p in (two / "done").iterdir()) == ["chunk_00000", "chunk_00001", "chunk_00002"]
    assert cs.candidates_complete(two)
    cand, _, _ = cs.open_candidates(two)
    assert cand.shape == (5, 5, 3, 32, 32) and np.asarray(cand[:, 1:]).any()
    # a second sharded run finds every chunk built and changes nothing
    before = (two / "candidates.u8").read_bytes()
    res = _run(tmp_path, two, 2)
    assert "2 of 2 chunks already built" in res.stdout and "1 of 1 chunks already built" in res.stdout
    assert (two / "candidates.u8").read_bytes() == before


def _flow_inputs(tmp_path: Path) -> tuple[FlowConfig, Path, Path, torch.Tensor]:
    """A flow configuration building 5 images' candidates in 3 chunks with the tiny DDPM of
    ``ddpm.yml`` and the checkpoint at ``diff_ckpt/tiny/ema_0.999_1.pt``, and a record folder
    holding a backdoored model."""
    (tmp_path / "ddpm.yml").write_text(yaml.safe_dump(TINY_DDPM))
    ckpt = tmp_path / "diff_ckpt" / "tiny" / "ema_0.999_1.pt"
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(spec_from_dict(TINY_DDPM, "tiny").build_model().state_dict(), ckpt)
    settings = {
        "model_width": 4,
        "diffusion_config": str(tmp_path / "ddpm.yml"),
        "diffusion_ckpt": str(ckpt),
        "steps_T": 2,
        "rounds_n": 1,
        "last_steps_m": 2,
        "purify_batch_size": 2,
    }
    cfg = FlowConfig.from_dict(settings, "badnet")
    rec = tmp_path / "record"
    rec.mkdir()
    torch.save(build_model(cfg).state_dict(), rec / "backdoored_model.pt")
    images = torch.randint(0, 256, (5, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    return cfg, ckpt, rec, images


def test_a_store_begun_with_another_ddpm_checkpoint_is_refused(tmp_path):
    """A kill after the first chunk, then another checkpoint at the same path: the resumed run
    is refused with one line naming the DDPM (the old chunks are not mixed with new ones); the
    original checkpoint resumes it. An unfinished store written before the header named its
    DDPM cannot be checked, and is refused saying how to go on."""
    cfg, ckpt, rec, images = _flow_inputs(tmp_path)

    def build() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: a second thread only waits
        try:
            build_candidates(cfg, tmp_path, rec, images, torch.device("cpu"), 0, 1, lambda m: None)
        finally:
            torch.set_num_threads(threads)

    build()
    store = rec / "candidates"
    for marker in ("chunk_00001", "chunk_00002"):  # as if killed after chunk 0
        (store / "done" / marker).unlink()
    before = (store / "candidates.u8").read_bytes()
    original = ckpt.read_bytes()
    torch.manual_seed(1)
    torch.save(spec_from_dict(TINY_DDPM, "tiny").build_model().state_dict(), ckpt)
    with pytest.raises(UserError) as err:
        build()
    message = str(err.value)
    assert "\n" not in message and "other settings (ddpm: '" in message and "pass --overwrite" in message
    assert (store / "candidates.u8").read_bytes() == before and not cs.candidates_complete(store)
    ckpt.write_bytes(original)
    build()
    assert cs.candidates_complete(store) and (store / "candidates.u8").read_bytes() == before

    meta = json.loads((store / "meta.json").read_text())
    del meta["ddpm"]
    (store / "meta.json").write_text(json.dumps(meta))
    assert cs.candidates_complete(store)  # a finished older store is still read (the flow loads it)
    (store / "done" / "chunk_00002").unlink()
    with pytest.raises(UserError, match=r"\(ddpm: 'not recorded: .*' -> '\w+'\); delete that folder to rebuild"):
        build()
