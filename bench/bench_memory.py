"""Peak memory of purifying all 50,000 training images (CPU-scale UNet, one reverse step:
memory does not depend on t*), measured as the process's peak resident set size.

    python bench/bench_memory.py [--images 50000] [--batch_size 256]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import record

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--config", default="config/eclipse/cpu.yml")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from utils.data import load_cifar10, write_eclipse_pkl
    from utils.diffusion.factory import load_diffusion_spec

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = load_cifar10("train")
        write_eclipse_pkl(work / "poisoned_data/cifar10/BENCH.pkl", data.subset(torch.arange(args.images)))
        ckpt = work / "diff_ckpt/cifar10/bench/ema_0.9999_1.pt"
        ckpt.parent.mkdir(parents=True)
        torch.save(load_diffusion_spec(REPO / args.config).build_model().state_dict(), ckpt)
        cmd = [
            sys.executable,
            str(REPO / "purification.py"),
            "--poison",
            "BENCH",
            "--config",
            args.config,
            "--sparse_set",
            "bench",
            "--sparse_diff_model",
            ckpt.name,
            "--t",
            "1",
            "--batch_size",
            str(args.batch_size),
            "--work_dir",
            str(work),
        ]
        subprocess.run(cmd, check=True, cwd=REPO)
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"purifying {args.images} images (batch {args.batch_size}): peak RSS {peak_mib:.0f} MiB")
    record("memory", [{"images": args.images, "batch_size": args.batch_size, "peak_rss_mib": peak_mib}])


if __name__ == "__main__":
    main()
