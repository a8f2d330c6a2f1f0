"""bench/gpu_check.py's report: what the parts found (``Report``), written after every part
as ``gpu_check.json`` and ``gpu_check.md``; the device it describes; a check's own failure
(``CheckFailed``) and the one-line message of any failure. Shared by gpu_check.py and
gpu_speed.py."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import machine

# ------------------------------------------------------------------------------ report


@dataclass
class Report:
    args: dict[str, Any]
    device: dict[str, Any]
    started: str
    data: str = ""
    parts: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # per part, what its one line summarises
    measurements: list[dict[str, Any]] = field(default_factory=list)
    projections: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p["status"] == "ok" for p in self.parts)

    def as_json(self, wall_s: float) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "wall_s": round(wall_s, 1),
            "started": self.started,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": self.args,
            "device": self.device,
            "data": self.data,
            "parts": [p | {"details": self.details.get(p["name"])} for p in self.parts],
            "measurements": self.measurements,
            "projections": self.projections,
        }


class CheckFailed(Exception):
    """A check's own finding (its message is the whole story; no exception type is shown)."""


def one_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    text = text if isinstance(e, CheckFailed) else f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fmt_value(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}g}" if abs(v) < 10 ** (digits - 1) else f"{v:,.0f}"


def _cell(text: Any) -> str:
    """Text for a markdown table cell (an error message may hold a pipe)."""
    return str(text).replace("|", "\\|")


def fmt_hours(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def write_report(report: Report, out: Path, wall_s: float) -> None:
    """``gpu_check.json`` and ``gpu_check.md`` in ``out`` (rewritten after every part)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report.as_json(wall_s), indent=2) + "\n")
    d = report.device
    md = [
        f"# GPU check: {d['name']}",
        "",
        "| device | torch | CUDA | date | result | wall time |",
        "|---|---|---|---|---|---|",
        f"| {d['name']} | {d['torch']} | {d.get('cuda_version') or '—'} | {d['date']} | "
        f"{'all parts ok' if report.ok else 'FAILED'} | {wall_s:.0f} s |",
        "",
        f"`{report.as_json(wall_s)['command']}`"
        + (" (dry run: CPU-scale models, figures not paper-scale)" if report.args["tiny"] else ""),
        "",
        f"Data for the tests and e2e runs: {report.data}.",
        "",
        "| part | status | seconds | result |",
        "|---|---|---|---|",
    ]
    for p in report.parts:
        md.append(f"| {p['name']} | {p['status']} | {p['seconds']:.1f} | {_cell(p['error'] or p['summary'])} |")
    md += [
        "",
        "| workload | model | batch | variant | figure | unit | peak GPU memory (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in report.measurements:
        tags = [t for t, on in (("reference", m["reference"]), ("policy", m["policy"])) if on]
        variant = m["variant"] + (f" ({', '.join(tags)})" if tags else "")
        figure = fmt_value(m["value"])
        if m["value"] is None:
            figure = m["note"] if str(m["note"]).startswith("failed") else f"skipped: {m['note']}"
        md.append(
            f"| {m['workload']} | {m['model']} | {m['batch']} | {variant} | {_cell(figure)} | {m['unit']} | "
            f"{fmt_value(m['peak_mib'], 4) if m['peak_mib'] is not None else '—'} |"
        )
    if report.measurements:
        tf32 = d.get("cudnn_allow_tf32")
        md += [
            "",
            "Each workload runs as its script runs it: the precision policy's choice (`policy`) is "
            "`--precision auto` with the models' own attention (einsum); `sdpa` swaps in their fused "
            "`scaled_dot_product_attention` variants; cuDNN deterministic for the victim (train.py), "
            "autotuned for DataElixir, torch's default otherwise"
            + (f"; fp32 convolutions in TF32: {tf32}" if tf32 is not None else "")
            + ". Projections below take the rate per image-step, iteration or image; "
            "DataElixir's excludes labelling the candidates.",
        ]
    if report.projections:
        md += [
            "",
            "| paper-scale job | work | policy's choice | fp32 reference | fastest measured |",
            "|---|---|---|---|---|",
        ]
        for j in report.projections:
            cells = [
                f"{fmt_hours(j[k]['seconds'])} ({j[k]['variant']}, batch {j[k]['batch']})" if j.get(k) else "—"
                for k in ("policy", "reference", "fastest")
            ]
            md.append(f"| {j['job']} | {j['work']:,} {j['unit']} | " + " | ".join(cells) + " |")
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")


def device_info(dev: torch.device) -> dict[str, Any]:
    info = machine()
    info |= {"device": str(dev), "cuda_version": torch.version.cuda, "threads": torch.get_num_threads()}
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        info |= {
            "name": torch.cuda.get_device_name(dev),
            "capability": f"sm_{props.major}{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(),
            # fp32 convolutions run in TF32 unless this is off: the "fp32" figures are TF32 convs then
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    elif dev.type == "cuda":
        info["name"] = f"{dev} not available (CPU: {info['cpu'] or 'unknown'})"
    else:
        info["name"] = info["cpu"] or "CPU"
    return info


def need_device(dev: torch.device) -> None:
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckFailed(f"--device {dev}: torch {torch.__version__} sees no CUDA device")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise CheckFailed(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s)")
