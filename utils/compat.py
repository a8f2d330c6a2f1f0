"""Files and settings written by earlier versions of this project, read as today's.

Everything that reads an older format lives here, so each reader says what it reads:

- ``legacy_precision``: settings with ``bf16: true|false`` (before ``--precision``), in
  ``train.py``'s ``settings.json``, ``train_diffusion.py``'s ``run.json`` and a
  purification parts folder's ``settings.json``;
- ``legacy_flow_config``: an attack record's ``config.yaml`` with the ``bf16`` / ``amp``
  booleans (before per-computation ``precisions``);
- ``legacy_candidate_header``: a DataElixir candidate folder's ``meta.json`` without the
  settings added since (``dense_tail``, ``original_round_trip``), at the values it was built with;
  one without the DDPM's fingerprint (``ddpm``) is read with a value no DDPM has, so resuming it
  is refused (its chunks cannot be checked against the checkpoint);
- ``legacy_diffusion_training``: a ``train_diffusion.py`` ``run.json`` whose ``training``
  section predates the recipe keys (``optimizer``, ``warmup_steps``, ``grad_clip``): those
  runs trained with improved-diffusion's AdamW, no warm-up and no clipping;
- ``legacy_training_config``: a classifier-training checkpoint's ``config`` without
  ``drop_last`` (those runs dropped the last batch) or with the ``normalize`` / ``extra``
  fields (they never changed training);
- ``adopt_part_markers``: a purification parts folder whose batches were marked
  ``part_<i>.ok`` (``<key of the settings> <checksum>``) rather than ``done/chunk_<i>``.

Diffusion checkpoint names in the earlier spelling (``model_<step>.pt``, unpadded steps) are
part of the name grammar in ``utils.diffusion.checkpoints``, which reads both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from utils.fileio import checksum


def legacy_precision(stored: Mapping[str, Any]) -> dict[str, Any]:
    """Stored settings with the older ``bf16: true|false`` read as ``precision: bf16|fp32``."""
    out = dict(stored)
    if "bf16" in out and "precision" not in out and isinstance(out["bf16"], bool):
        out["precision"] = "bf16" if out.pop("bf16") else "fp32"
    return out


def legacy_flow_config(stored: Mapping[str, Any]) -> dict[str, Any]:
    """An attack record's stored configuration with the older ``bf16`` / ``amp`` booleans
    (written before ``precision``) read as the ``precisions`` they ran with: ``amp`` for
    the classifier trainings, ``bf16`` for the DDPM rounds and the candidates' labels, and
    bf16 for the triggers' auxiliary models (they always ran under bf16 autocast then)."""
    out = dict(stored)
    if "precisions" in out or "bf16" not in out:
        return out
    name = {True: "bf16", False: "fp32"}
    rounds = name.get(out.pop("bf16"), "bf16")
    out["precisions"] = {
        "trigger": "bf16",
        "backdoor_training": name.get(out.pop("amp", False), "fp32"),
        "ddpm_rounds": rounds,
        "candidate_labels": rounds,
    }
    out.update(precision="auto", bf16=None, amp=None)
    return out


# candidate-header settings added after the first folders were written, at the values those used
_CANDIDATE_HEADER_ADDED = {
    "dense_tail": False,
    "original_round_trip": False,
    # not a value: the DDPM these chunks came from is unknown, so the header never matches
    "ddpm": "not recorded: this store predates the DDPM fingerprint, so its chunks cannot be verified",
}


def legacy_candidate_header(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A candidate folder's ``meta.json`` with the settings it predates at the values it used
    (and an unknown DDPM, which no run's header matches)."""
    return {**_CANDIDATE_HEADER_ADDED, **stored}


def adopt_part_markers(
    root: Path, n_chunks: int, part_path: Callable[[int], Path], mark: Callable[[int], None], header: Mapping[str, Any]
) -> None:
    """``mark`` each batch whose ``part_<i>.ok`` in ``root`` still matches its settings key and
    checksum, and delete every ``part_*.ok`` (a batch that does not match is redone)."""
    key = checksum(json.dumps(header, sort_keys=True, default=str).encode())
    for old in sorted(root.glob("part_*.ok")):
        i = old.stem.removeprefix("part_")
        try:
            batch = part_path(int(i)).read_bytes() if i.isdigit() and int(i) < n_chunks else None
            if batch is not None and old.read_text().split() == [key, checksum(batch)]:
                mark(int(i))
        except OSError:
            pass  # a batch without its bytes is redone
        old.unlink()


def legacy_training_config(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A training checkpoint's stored ``TrainConfig`` as today's fields read it."""
    out = {"drop_last": True, **stored}
    for gone in ("normalize", "extra"):
        out.pop(gone, None)
    return out


def legacy_diffusion_training(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusion run's stored ``training`` settings with the recipe keys it predates."""
    return {"optimizer": "adamw", "warmup_steps": 0, "grad_clip": 0.0, **stored}
