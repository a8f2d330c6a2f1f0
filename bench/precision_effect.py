"""What bf16 autocast changes in results, against float32 (the evidence behind
``utils/precision.py``'s ``auto``). Three measurements, each to JSON (+ PNG):

    victims     train.py runs made with --precision fp32 and bf16 (same seeds): test accuracy
                python bench/precision_effect.py victims --runs runs/precision/runs/train
    diffusion   two train_diffusion.py runs, fp32 and bf16 (same seed): the loss curves
                python bench/precision_effect.py diffusion --fp32 DIR --bf16 DIR
    dataelixir  DataElixir's decisions on N training samples of an attack record (after
                --stop_after backdoor_training): the candidates (DDPM rounds) and their labels
                made in fp32 and in bf16, then label transition, target detection, sorting and
                the chosen image of relabelled samples, compared
                python bench/precision_effect.py dataelixir --record DIR --ckpt CKPT [--samples 1000]

bf16 computes the same values slowly on a CPU without native bf16, so these can be
measured anywhere; they are fast on AMX / AVX-512-bf16 CPUs and GPUs.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from common import machine

from utils.compat import legacy_flow_config
from utils.data import NUM_CLASSES, class_balanced_subset
from utils.dataelixir import defence as de
from utils.dataelixir.keys import FlowConfig
from utils.dataelixir.models import load_model, purification_rounds
from utils.dataelixir.outputs import load_attack_data
from utils.diffusion.factory import load_purifier
from utils.diffusion.purify import chunk_seed
from utils.fileio import atomic_write_json, read_text_file
from utils.plots import pyplot, save_figure
from utils.trainer import predict


def _stats(values: list[float]) -> dict:
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def victims(args: argparse.Namespace) -> dict:
    """Test accuracy of the runs named ``*-fp32-s<seed>`` / ``*-bf16-s<seed>`` under ``--runs``."""
    acc: dict[str, dict[int, float]] = {"fp32": {}, "bf16": {}}
    secs: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for res in sorted(Path(args.runs).glob("*/result.json")):
        r = json.loads(res.read_text())
        p = r["settings"].get("precision")
        if p in acc:
            acc[p][int(r["settings"]["seed"])] = r["final_test_acc"]
            secs[p].append(r["seconds"])
    seeds = sorted(set(acc["fp32"]) & set(acc["bf16"]))
    diffs = [acc["bf16"][s] - acc["fp32"][s] for s in seeds]
    out = {
        "seeds": seeds,
        "fp32": _stats([acc["fp32"][s] for s in seeds]),
        "bf16": _stats([acc["bf16"][s] for s in seeds]),
        "bf16_minus_fp32": _stats(diffs),
        "seconds": {p: statistics.fmean(v) for p, v in secs.items() if v},
        "command": "train.py --poison clean --subset 5000 --arch resnet18 --width 16 --epochs 20 --schedule onecycle "
        "--weight_decay 0.0005 --seed S --precision P",
    }
    out["within_spread"] = abs(out["bf16_minus_fp32"]["mean"]) <= max(out["fp32"]["std"], out["bf16"]["std"])
    return out


def _curve(folder: Path) -> tuple[list[int], list[float]]:
    with open(folder / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def diffusion(args: argparse.Namespace) -> dict:
    """The two runs' logged loss (windows of log_interval iterations) side by side."""
    s32, l32 = _curve(Path(args.fp32))
    s16, l16 = _curve(Path(args.bf16))
    n = min(len(l32), len(l16))
    rel = [(b - a) / a for a, b in zip(l32[:n], l16[:n])]
    tail = max(1, n // 3)  # the last third of the run
    out = {
        "steps": s32[:n],
        "loss_fp32": l32[:n],
        "loss_bf16": l16[:n],
        "relative_difference": rel,
        "last_third_mean_loss": {
            "fp32": statistics.fmean(l32[n - tail : n]),
            "bf16": statistics.fmean(l16[n - tail : n]),
        },
        "mean_abs_relative_difference": statistics.fmean(abs(r) for r in rel),
    }
    if args.out:
        fig, ax = pyplot().subplots(figsize=(5, 3.2))
        ax.plot(s32[:n], l32[:n], label="fp32")
        ax.plot(s16[:n], l16[:n], label="bf16 autocast", ls="--")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"training loss (mean of {s32[0]} its)")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, Path(args.out) / "precision_diffusion_loss.png", dpi=120)
    return out


def _decisions(cfg: FlowConfig, cand: torch.Tensor, model: torch.nn.Module, labels: torch.Tensor, bf16: bool) -> dict:
    """DataElixir's steps 2-5 on candidates ``[N, K, 3, 32, 32]`` with labels in ``bf16`` or not."""
    n, k = cand.shape[:2]
    flat = cand.reshape(n * k, *cand.shape[2:])
    preds = predict(model, flat, torch.device("cpu"), batch_size=512, bf16=bf16).argmax(1).view(n, k)
    ident = de.label_transition(preds, cfg.threshold_tau, NUM_CLASSES)
    det = de.detect_target_labels(preds, ident.kept, ident.transition, labels, NUM_CLASSES)
    srt = de.sort_samples(ident, labels, det.targets)
    rows = torch.nonzero(srt.decision == de.RELABELLED).flatten().numpy()
    chosen = torch.full((n,), -1, dtype=torch.long)
    if len(rows):
        dist = de.candidate_distances(cand.numpy(), rows, model, torch.device("cpu"), bf16=bf16)
        chosen[torch.from_numpy(rows)] = de.select_index(dist, ident.kept[rows])
    return {
        "preds": preds,
        **vars(ident),
        "targets": det.targets,
        "scores": det.scores,
        **vars(srt),
        "chosen": chosen,
    }


def dataelixir(args: argparse.Namespace) -> dict:
    record = Path(args.record)
    import yaml

    cfg = FlowConfig.from_dict(
        legacy_flow_config(yaml.safe_load(read_text_file(record / "config.yaml", "record configuration")))
    )
    bd, _ = load_attack_data(record / "attack_data.pt")
    model = load_model(cfg, record / "backdoored_model.pt", torch.device("cpu"))
    ddpm, base, _ = load_purifier(args.config, args.ckpt, torch.device("cpu"))
    rows = class_balanced_subset(bd.train.labels, args.samples, seed=0)
    images, labels = bd.train.images[rows], bd.train.labels[rows]
    poisoned = bd.poison_indicator[rows].bool()
    rounds = purification_rounds(cfg)
    made = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        parts = []
        for c, s in enumerate(range(0, len(images), args.batch)):
            g = torch.Generator().manual_seed(chunk_seed(cfg.random_seed, c))
            parts.append(
                de.build_chunk(ddpm, base, images[s : s + args.batch], **{**rounds, "bf16": bf16}, generator=g)
            )
        cand = torch.cat(parts)
        made[name] = (cand, _decisions(cfg, cand, model, labels, bf16))
    (c32, d32), (c16, d16) = made["fp32"], made["bf16"]
    diff = (c32[:, 1:].int() - c16[:, 1:].int()).abs()
    both_relabelled = (d32["decision"] == de.RELABELLED) & (d16["decision"] == de.RELABELLED)

    def share(mask: torch.Tensor) -> float:
        return float(mask.float().mean())

    out = {
        "samples": len(rows),
        "poisoned_samples": int(poisoned.sum()),
        "candidates_per_sample": int(c32.shape[1]),
        "rounds": {k: v for k, v in rounds.items() if k != "bf16"},
        "candidate_values_differing": share(diff > 0),
        "candidate_mean_abs_diff_levels": float(diff.float().mean()),
        "candidate_max_abs_diff_levels": int(diff.max()),
        "candidate_labels_differing": share(d32["preds"][:, 1:] != d16["preds"][:, 1:]),
        "kept_mask_differing": share(d32["kept"] != d16["kept"]),
        "transition_differing": share(d32["transition"] != d16["transition"]),
        "transition_share": {"fp32": share(d32["transition"]), "bf16": share(d16["transition"])},
        "decision_differing": share(d32["decision"] != d16["decision"]),
        "decision_counts": {
            p: {de.DECISION_NAMES[c]: int((d["decision"] == c).sum()) for c in de.DECISION_NAMES}
            for p, d in (("fp32", d32), ("bf16", d16))
        },
        "targets": {"fp32": list(map(int, d32["targets"])), "bf16": list(map(int, d16["targets"]))},
        "target_scores": {"fp32": np.round(d32["scores"], 4).tolist(), "bf16": np.round(d16["scores"], 4).tolist()},
        "chosen_image_differing_among_relabelled_in_both": share(
            d32["chosen"][both_relabelled] != d16["chosen"][both_relabelled]
        )
        if both_relabelled.any()
        else None,
        "relabelled_in_both": int(both_relabelled.sum()),
        "true_attack_target": cfg.get("attack_target"),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    v = sub.add_parser("victims")
    v.add_argument("--runs", required=True)
    d = sub.add_parser("diffusion")
    d.add_argument("--fp32", required=True)
    d.add_argument("--bf16", required=True)
    e = sub.add_parser("dataelixir")
    e.add_argument("--record", required=True)
    e.add_argument("--ckpt", required=True)
    e.add_argument("--config", default="config/ddpm/cpu.yml")
    e.add_argument("--samples", type=int, default=1000)
    e.add_argument("--batch", type=int, default=250)
    for p in (v, d, e):
        p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    result = {"victims": victims, "diffusion": diffusion, "dataelixir": dataelixir}[args.what](args)
    result["machine"] = machine() | {"capability": torch.backends.cpu.get_cpu_capability()}
    path = Path(args.out) / f"precision_{args.what}.json"
    atomic_write_json(path, result)
    shown = {k: v for k, v in result.items() if not isinstance(v, list) or len(v) <= 12}
    print(json.dumps(shown, indent=1, default=str)[:4000])
    print(f"-> {path}")


if __name__ == "__main__":
    main()
