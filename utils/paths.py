"""Where every script reads and writes, mirroring the reference repositories' layout.

All folders live under one work directory: the repository root by default, or
``--work_dir`` (tests use a temporary folder; users can keep data on another disk).
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET = "cifar10"


def work_dir(arg: str | Path | None = None) -> Path:
    return Path(arg).expanduser() if arg else REPO_ROOT


def poisoned_file(work: Path, poison: str) -> Path:
    """``poisoned_data/cifar10/<POISON>.pkl`` (ECLIPSE format)."""
    return work / "poisoned_data" / DATASET / f"{poison}.pkl"


def purified_dir(work: Path, sparse_set: str, t: int, iteration: int | str) -> Path:
    return work / "purified_data" / DATASET / sparse_set / str(t) / str(iteration)


def purified_file(work: Path, sparse_set: str, t: int, iteration: int | str, poison: str) -> Path:
    """``purified_data/cifar10/<sparse_set>/<t>/<iter>/<POISON>-pure.pkl``."""
    return purified_dir(work, sparse_set, t, iteration) / f"{poison}-pure.pkl"


def diff_ckpt_dir(work: Path, sparse_set: str) -> Path:
    """``diff_ckpt/cifar10/<sparse_set>/`` (ECLIPSE's sparse model; DataElixir's DDPM too)."""
    return work / "diff_ckpt" / DATASET / sparse_set


def record_dir(work: Path, name: str) -> Path:
    """``record/<save_folder_name>/`` (BackdoorBench's convention)."""
    return work / "record" / name


def resource_dir(work: Path) -> Path:
    """Cached auxiliary models of attacks and poisons (surrogates, generators, ...)."""
    return work / "resource"


def load_poisoned(
    work: Path,
    poison: str,
    data_root: str | Path | None = None,
    subset: int | None = None,
    subset_seed: int = 0,
    download: bool | None = None,
):
    """The training set named ``poison``: ``poisoned_data/cifar10/<poison>.pkl``, or for
    ``clean`` (when no ``clean.pkl`` exists) the CIFAR-10 training set itself.

    ``subset`` keeps a class-balanced subset (the CPU-scale recipe); poison.py's
    ``--subset N`` draws the same images with the same seed.
    """
    from utils.data import class_balanced_subset, load_cifar10, read_eclipse_pkl
    from utils.download import eclipse_manual
    from utils.fileio import UserError

    path = poisoned_file(work, poison)
    if path.is_file():
        data = read_eclipse_pkl(path)
        if subset is not None and subset < len(data):
            raise UserError(
                f"{path} holds {len(data)} images; --subset {subset} applies only to the clean set "
                "(craft the poison with poison.py --subset instead)"
            )
        return data, str(path)
    if poison != "clean":
        raise UserError(
            f"poisoned dataset not found: {path}; craft it with `python poison.py --poison {poison}`, "
            + eclipse_manual("poisoned")
        )
    data = load_cifar10("train", data_root, download=download)
    if subset is not None:
        data = data.subset(class_balanced_subset(data.labels, subset, subset_seed))
    return data, f"CIFAR-10 train ({len(data)} images)"
