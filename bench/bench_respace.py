"""How faithful is purification with fewer reverse steps? For K in a list, purify clean
CIFAR-10 training images (not in the sparse set) at t* and report PSNR to the originals,
the agreement with the full t*-step result, and the time per image.

    python bench/bench_respace.py --ckpt diff_ckpt/cifar10/test2000ps8000/ema_0.9999_N.pt [--config config/eclipse/cpu.yml]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import record

from utils.augment import to_uint8
from utils.data import load_cifar10, psnr_db
from utils.diffusion.factory import load_purifier
from utils.diffusion.purify import from_model_range, noise_and_denoise, noise_std_at, to_model_range
from utils.runtime import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--config", default="config/eclipse/cpu.yml")
    ap.add_argument("--t", type=int, default=100)
    ap.add_argument("--steps", default="100,50,20,10")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--bf16", type=int, default=1)
    args = ap.parse_args()
    device = resolve_device("auto")
    model, base, _ = load_purifier(args.config, args.ckpt, device)
    clean = load_cifar10("train").images[: args.images].to(device)
    x0 = to_model_range(clean)
    g = torch.Generator(device=device).manual_seed(0)
    noisy = to_uint8(
        from_model_range(x0 + noise_std_at(base, args.t) * torch.randn(x0.shape, generator=g, device=device))
    )
    rows = [{"method": "noised only (no denoising)", "psnr_db": psnr_db(noisy, clean)}]
    print(f"t*={args.t}: noise std {noise_std_at(base, args.t):.4f}; noised input PSNR {rows[0]['psnr_db']:.2f} dB")
    full = None
    for k in [int(s) for s in args.steps.split(",")]:
        g = torch.Generator(device=device).manual_seed(1)
        t0 = time.time()
        out, _ = noise_and_denoise(model, base, x0, args.t, respace=k, generator=g, bf16=bool(args.bf16))
        sec = time.time() - t0
        out = to_uint8(from_model_range(out))
        full = out if full is None else full
        row = {
            "reverse_steps": k,
            "psnr_db": psnr_db(out, clean),
            "psnr_to_first_db": psnr_db(out, full),
            "ms_per_image": 1000 * sec / len(clean),
        }
        rows.append(row)
        print(
            f"K={k:4d}: PSNR to clean {row['psnr_db']:.2f} dB, to K={args.steps.split(',')[0]} result {row['psnr_to_first_db']:.2f} dB, "
            f"{row['ms_per_image']:.1f} ms/image"
        )
    record("respace", rows)


if __name__ == "__main__":
    main()
