"""Purification speed on this machine: the reference arithmetic beside our default, and
the share of the CPU's float32 FMA limit.

For the paper's UNet and the CPU-scale UNet, in one run:

* ``reference``: the float32 ancestral loop as ECLIPSE's ``purification.py`` runs it
  (``noise_and_denoise`` in float32, the arithmetic matched to improved-diffusion's
  fixtures), contiguous layout;
* ``default``: the same loop in the precision the policy resolves on this device
  (``--precision auto``: ``utils/precision.py``);
* ``fp32`` / ``bf16``: each precision forced.

Reported: image-steps/s, the UNet's FLOPs per image-step (counted by torch's
``FlopCounterMode``), the achieved FLOP/s and its share of this CPU's float32 FMA limit
(cores × clock × FLOPs per cycle: 2 FMA units × 16 float32 lanes × 2 on AVX-512, × 8 on
AVX2; the clock from /proc/cpuinfo, or ``--ghz``). bf16 can exceed the float32 limit (AMX).

    python bench/bench_precision.py [--steps 3] [--threads 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from common import machine

from utils.data import NUM_CLASSES
from utils.diffusion.factory import create_diffusion, load_diffusion_spec
from utils.diffusion.purify import noise_and_denoise
from utils.precision import cpu_capability, native_bf16, resolve_precision

MODELS = [
    ("paper UNet", "config/eclipse/cifar10.yml", 16),
    ("CPU-scale UNet", "config/eclipse/cpu.yml", 128),
]


def cpu_ghz() -> float | None:
    """The clock /proc/cpuinfo reports (MHz, else the model name's GHz, else BogoMIPS / 2)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    for pattern, scale in (
        (r"cpu MHz\s*:\s*([\d.]+)", 1e-3),
        (r"@ ([\d.]+)GHz", 1.0),
        (r"bogomips\s*:\s*([\d.]+)", 5e-4),
    ):
        m = re.search(pattern, text)
        if m:
            return float(m.group(1)) * scale
    return None


def fp32_flops_per_cycle() -> int:
    """Per core: 2 FMA units × lanes × 2 FLOPs (16 float32 lanes on AVX-512, 8 on AVX2)."""
    lanes = 16 if cpu_capability().startswith("AVX512") else 8
    return 2 * lanes * 2


def unet_flops(model: torch.nn.Module, timesteps: torch.Tensor) -> float:
    """FLOPs of one image-step (one forward on one image)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, 32, 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, timesteps[:1])
    return float(counter.get_total_flops())


def time_purification(model, base, x: torch.Tensor, steps: int, bf16: bool, repeats: int) -> float:
    """Median image-steps/s of ``steps`` reverse steps on the batch ``x``."""
    g = torch.Generator().manual_seed(0)
    noise_and_denoise(model, base, x, 1, generator=g, bf16=bf16)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        noise_and_denoise(model, base, x, steps, generator=g, bf16=bf16)
        rates.append(len(x) * steps / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2]


def layout_rates(width: int, precisions: tuple[bool, ...], seconds: float) -> list[dict]:
    """ResNet18 training img/s (batch 128, SGD) in the default layout and in channels_last."""
    from models import build_classifier

    rows = []
    for bf16 in precisions:
        for channels_last in (False, True):
            torch.manual_seed(0)
            model = build_classifier("resnet18", NUM_CLASSES, width)
            x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
            if channels_last:
                model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)

            def step(model=model, x=x, y=y, opt=opt, bf16=bf16) -> None:
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    loss = torch.nn.functional.cross_entropy(model(x).float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

            step()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                step()
                n += 1
            rate = 128 * n / (time.perf_counter() - t0)
            rows.append(
                {
                    "model": f"ResNet18 w{width}",
                    "precision": "bf16" if bf16 else "fp32",
                    "channels_last": channels_last,
                    "img_per_s": rate,
                }
            )
            print(
                f"ResNet18 w{width} training {'bf16' if bf16 else 'fp32'} channels_last={channels_last!s:5s} {rate:7.1f} img/s",
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="reverse steps timed per repeat (t* of the loop)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--ghz", type=float, default=None, help="core clock for the FMA limit (default: /proc/cpuinfo)")
    ap.add_argument("--tiny", action="store_true", help="CPU-scale UNet only, batch 4, one repeat (a dry run)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    ghz = args.ghz or cpu_ghz()
    limit = threads * ghz * 1e9 * fp32_flops_per_cycle() if ghz else None
    default = resolve_precision("auto", device, "purification")
    info = machine() | {
        "capability": cpu_capability(),
        "native_bf16": native_bf16(device)[1],
        "threads": threads,
        "ghz": ghz,
        "fp32_flops_per_cycle_per_core": fp32_flops_per_cycle(),
        "fp32_limit_gflops": limit / 1e9 if limit else None,
        "default_precision": default.line(),
    }
    print(f"{info['cpu']} | capability {info['capability']} | {info['native_bf16']} | {threads} thread(s)")
    if limit:
        print(
            f"float32 FMA limit: {threads} cores x {ghz:.2f} GHz x {fp32_flops_per_cycle()} FLOP/cycle = {limit / 1e9:.0f} GFLOP/s"
        )
    print(default.line())
    models = MODELS[1:] if args.tiny else MODELS
    rows = []
    for name, config, batch in models:
        batch = 4 if args.tiny else batch
        spec = load_diffusion_spec(config)
        torch.manual_seed(0)
        model = spec.build_model().eval()
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        base = create_diffusion(spec)
        flops = unet_flops(model, base.model_timesteps(torch.zeros(1, dtype=torch.long)))
        x = torch.rand(batch, 3, 32, 32) * 2 - 1
        variants = {"reference (fp32 loop)": False, f"default ({default.name})": default.bf16}
        if not args.tiny:
            # forced bf16 only where it is native: emulated, one paper-UNet call takes minutes
            variants.update({"fp32": False, **({"bf16": True} if native_bf16(device)[0] else {})})
        seen: dict[bool, float] = {}
        for label, bf16 in variants.items():
            if bf16 not in seen:  # the reference and the fp32 default are one computation: timed once
                seen[bf16] = time_purification(model, base, x, args.steps, bf16, 1 if args.tiny else args.repeats)
            rate = seen[bf16]
            achieved = rate * flops
            row = {
                "model": name,
                "config": config,
                "batch": batch,
                "variant": label,
                "precision": "bf16" if bf16 else "fp32",
                "image_steps_per_s": rate,
                "gflop_per_image_step": flops / 1e9,
                "achieved_gflops": achieved / 1e9,
                "share_of_fp32_limit": achieved / limit if limit else None,
            }
            rows.append(row)
            share = f"{100 * row['share_of_fp32_limit']:.0f} % of the fp32 limit" if limit else "limit unknown"
            print(
                f"{name:15s} batch {batch:3d} {label:22s} {rate:8.1f} img-steps/s  "
                f"{achieved / 1e9:7.1f} GFLOP/s  ({share})",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = [
        "| model | batch | variant | image-steps/s | GFLOP/s | share of fp32 FMA limit |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{100 * r['share_of_fp32_limit']:.0f} %" if r["share_of_fp32_limit"] is not None else "—"
        md.append(
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r['image_steps_per_s']:.1f} | "
            f"{r['achieved_gflops']:.1f} | {share} |"
        )
    layout = layout_rates(16, (False, True) if native_bf16(device)[0] else (False,), 0.5 if args.tiny else 4.0)
    md += ["", "| model | precision | channels_last | training img/s |", "|---|---|---|---|"]
    md += [f"| {r['model']} | {r['precision']} | {r['channels_last']} | {r['img_per_s']:.1f} |" for r in layout]
    (out / "precision.json").write_text(json.dumps({"machine": info, "rows": rows, "layout": layout}, indent=2) + "\n")
    (out / "precision.md").write_text("\n".join(md) + "\n")
    print(f"-> {out / 'precision.json'}, {out / 'precision.md'}")


if __name__ == "__main__":
    main()
