"""PNG outputs a person looks at: image grids and training curves (written atomically)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from utils.fileio import atomic_write_bytes


def amplified_difference(a: torch.Tensor, b: torch.Tensor, gain: float | None = None) -> torch.Tensor:
    """``|a - b|`` of uint8 images scaled up to be visible (gain defaults to fill 0..255)."""
    d = (a.int() - b.int()).abs().float()
    if gain is None:
        gain = 255.0 / max(float(d.max()), 1.0)
    return (d * gain).clamp(0, 255).to(torch.uint8)


def signed_difference(a: torch.Tensor, b: torch.Tensor, gain: float = 10.0) -> torch.Tensor:
    """``a - b`` around mid-grey, scaled by ``gain``: how perturbation pictures are usually shown."""
    return (128 + gain * (a.float() - b.float())).clamp(0, 255).to(torch.uint8)


def save_image_grid(
    path: str | Path,
    rows: Sequence[torch.Tensor],
    row_labels: Sequence[str] | None = None,
    scale: int = 3,
    pad: int = 2,
) -> None:
    """One row per uint8 tensor ``[N, 3, H, W]``, labelled on the left, as a PNG."""
    from PIL import Image, ImageDraw

    rows = [r.detach().cpu() for r in rows]
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[2] * scale, rows[0].shape[3] * scale
    label_w = 0
    if row_labels:
        label_w = 8 + 7 * max(len(s) for s in row_labels)
    canvas = Image.new("RGB", (label_w + n * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(rows):
        y = pad + i * (h + pad)
        if row_labels:
            draw.text((4, y + h // 2 - 6), row_labels[i], fill="black")
        for j, img in enumerate(r):
            arr = img.permute(1, 2, 0).numpy().astype(np.uint8)
            tile = Image.fromarray(arr).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + j * (w + pad), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display is needed or used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: float | None = None) -> None:
    """Write ``fig`` as a PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **({} if dpi is None else {"dpi": dpi}))
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def save_curves(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "epoch",
    ylabel: str = "accuracy (%)",
) -> None:
    """Line plot of named ``(x, y)`` series as a PNG."""
    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=100)
    for name, (x, y) in series.items():
        if len(x):
            ax.plot(list(x), list(y), marker="o" if len(x) < 30 else None, markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def history_series(history: list[dict], keys: Sequence[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Pick per-epoch values of ``keys`` out of a trainer history for :func:`save_curves`."""
    out = {}
    for k in keys:
        pts = [(h["epoch"], h[k]) for h in history if k in h]
        out[k] = ([p[0] for p in pts], [p[1] for p in pts])
    return out
