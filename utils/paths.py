"""Where every script reads and writes, mirroring the reference repositories' layout.

All folders live under one work directory: the repository root by default, or
``--work_dir`` (tests use a temporary folder; users can keep data on another disk).
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET = "cifar10"  # the default dataset; every folder below is per dataset (its registry name)


def work_dir(arg: str | Path | None = None) -> Path:
    return Path(arg).expanduser() if arg else REPO_ROOT


def poisoned_file(work: Path, poison: str, dataset: str = DATASET) -> Path:
    """``poisoned_data/<dataset>/<POISON>.pkl`` (ECLIPSE format)."""
    return work / "poisoned_data" / dataset / f"{poison}.pkl"


def purified_dir(work: Path, sparse_set: str, t: int, iteration: int | str, dataset: str = DATASET) -> Path:
    return work / "purified_data" / dataset / sparse_set / str(t) / str(iteration)


def purified_file(
    work: Path, sparse_set: str, t: int, iteration: int | str, poison: str, dataset: str = DATASET
) -> Path:
    """``purified_data/<dataset>/<sparse_set>/<t>/<iter>/<POISON>-pure.pkl``."""
    return purified_dir(work, sparse_set, t, iteration, dataset) / f"{poison}-pure.pkl"


def diff_ckpt_dir(work: Path, sparse_set: str, dataset: str = DATASET) -> Path:
    """``diff_ckpt/<dataset>/<sparse_set>/`` (ECLIPSE's sparse model; DataElixir's DDPM too)."""
    return work / "diff_ckpt" / dataset / sparse_set


def record_dir(work: Path, name: str) -> Path:
    """``record/<save_folder_name>/`` (BackdoorBench's convention)."""
    return work / "record" / name


def resource_dir(work: Path) -> Path:
    """Cached auxiliary models of attacks and poisons (surrogates, generators, ...)."""
    return work / "resource"
