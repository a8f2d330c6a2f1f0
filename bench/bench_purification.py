"""Purification throughput (image-steps/s) of the paper's and the CPU-scale UNet, float32
vs bf16, and how much bf16 changes the purified uint8 images.

    python bench/bench_purification.py [--ckpt diff_ckpt/.../ema_0.9999_N.pt --config config/eclipse/cpu.yml]
"""

from __future__ import annotations

import argparse

import torch
from common import record, timed

from utils.augment import to_uint8
from utils.diffusion.factory import create_diffusion, load_diffusion_spec, load_purifier
from utils.diffusion.purify import from_model_range, noise_and_denoise, to_model_range
from utils.runtime import resolve_device


def random_model(spec):
    torch.manual_seed(0)
    model = spec.build_model()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ckpt", default=None, help="trained CPU-scale checkpoint for the bf16 fidelity check")
    ap.add_argument("--config", default="config/eclipse/cpu.yml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=256, help="training images for the bf16 fidelity check")
    args = ap.parse_args()
    device = resolve_device(args.device)
    rows = []
    for name, cfg, batch in [
        ("paper UNet (52.5M)", "config/eclipse/cifar10.yml", 16),
        ("CPU UNet (1.6M)", "config/eclipse/cpu.yml", 128),
        ("DDPM paper (35.7M)", "config/ddpm/cifar10.yml", 16),
        ("DDPM CPU (1.5M)", "config/ddpm/cpu.yml", 128),
    ]:
        spec = load_diffusion_spec(cfg)
        model = random_model(spec).to(device)
        x = torch.randn(batch, 3, 32, 32, device=device)
        t = torch.full((batch,), 10, device=device)
        ts = create_diffusion(spec, None).model_timesteps(t)
        for bf16 in (False, True):

            def step(model=model, x=x, ts=ts, bf16=bf16):
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    model(x, ts)

            s = timed(step, args.repeats)
            rows.append({"model": name, "batch": batch, "bf16": bf16, "image_steps_per_s": batch / s})
            print(f"{name:22s} batch {batch:4d} bf16={bf16!s:5s} {batch / s:8.1f} image-steps/s")

    # fidelity: the same purification (same noise) in float32 and in bf16
    spec = load_diffusion_spec(args.config)
    if args.ckpt:
        model, base, _ = load_purifier(spec, args.ckpt, device)
    else:
        model, base = random_model(spec).to(device), create_diffusion(spec)
    from utils.data import load_cifar10

    images = load_cifar10("train").images[: args.images].to(device)
    outs = {}
    for bf16 in (False, True):
        g = torch.Generator(device=device).manual_seed(0)
        x, _ = noise_and_denoise(model, base, to_model_range(images), 100, generator=g, bf16=bf16)
        outs[bf16] = to_uint8(from_model_range(x)).int()
    d = (outs[True] - outs[False]).abs()
    fid = {
        "checkpoint": args.ckpt or "random weights",
        "pixels_differing_pct": 100 * (d > 0).float().mean().item(),
        "mean_abs_diff_grey_levels": d.float().mean().item(),
        "max_abs_diff_grey_levels": d.max().item(),
        "mean_abs_change_by_purification": (outs[False] - images.int()).abs().float().mean().item(),
    }
    print("bf16 vs float32 purification (t*=100, same noise):", fid)
    rows.append({"fidelity": fid})
    record("purification", rows)


if __name__ == "__main__":
    main()
