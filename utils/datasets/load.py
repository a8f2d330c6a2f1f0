"""Any registered dataset in memory, the way CIFAR-10 is: found at its root, fetched there
when missing (verified, extracted), decoded once and cached as ``.npy``; and a training
set by name (clean or ``poisoned_data/<dataset>/<POISON>.pkl``).

CIFAR-10 goes through ``utils.data`` unchanged (the same files, cache and messages)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from utils.data import (
    ImageSet,
    cached_read,
    cifar10_present,
    class_balanced_subset,
    load_cifar10,
    locate_cifar10,
    read_eclipse_pkl,
    resolve_data_root,
)
from utils.datasets.readers import FOLDER_HELP
from utils.datasets.registry import describe, get_dataset
from utils.datasets.spec import DatasetSpec
from utils.download import download_dataset_file, eclipse_manual, enabled, work_dir_flag
from utils.fileio import UserError, read_state_json
from utils.paths import DATASET, REPO_ROOT, poisoned_file

SPLITS = ("train", "test")


def resolve_root(name: str, data_root: str | Path | None = None) -> Path:
    """``--data_root`` if given, else ``$<ENV>_ROOT`` (``$CIFAR10_ROOT``, ``$CIFAR100_ROOT``,
    ``$SVHN_ROOT``, ...), else ``data/<name>``."""
    spec = get_dataset(name)
    if spec.name == DATASET:
        return resolve_data_root(data_root)
    if data_root:
        return Path(data_root).expanduser()
    env = os.environ.get(f"{spec.env}_ROOT")
    return Path(env).expanduser() if env else REPO_ROOT / "data" / spec.name


def _missing(spec: DatasetSpec, root: Path, split: str | None) -> list[str]:
    if not spec.files:  # an image folder: its train/ folder (checked in full when read)
        return [] if (root / "train").is_dir() else ["train/"]
    return [f.produces for f in spec.files_for(split) if not (root / f.produces).exists()]


def dataset_present(name: str, data_root: str | Path | None = None) -> bool:
    """Whether the dataset is at its root, i.e. nothing would be downloaded."""
    if get_dataset(name).name == DATASET:
        return cifar10_present(data_root)
    return not _missing(get_dataset(name), resolve_root(name, data_root), None)


def locate_dataset(
    name: str, split: str | None = None, data_root: str | Path | None = None, download: bool | None = None
) -> Path:
    """The dataset's root, holding the files ``split`` needs (``None``: both splits); what is
    missing is fetched there unless ``download`` is False (``None``: ``$<ENV>_DOWNLOAD``,
    default on). A cheap existence check."""
    spec = get_dataset(name)
    if spec.name == DATASET:
        locate_cifar10(data_root, download)
        return resolve_data_root(data_root)
    root = resolve_root(name, data_root)
    missing = _missing(spec, root, split)
    if missing and spec.files and enabled(download, f"{spec.env}_DOWNLOAD"):
        for f in spec.files_for(split):
            download_dataset_file(f.remote, root, f.produces, f.extract)
        missing = _missing(spec, root, split)
    if missing:
        how = (
            FOLDER_HELP
            if not spec.files
            else f"let the official files be downloaded there (--download true / {spec.env}_DOWNLOAD=1, the default), "
            f"or point --data_root / ${spec.env}_ROOT at a copy"
        )
        raise UserError(f"{spec.title} not found at {root}: {', '.join(missing)} missing; {how}")
    return root


def dataset_spec(name: str, data_root: str | Path | None = None, download: bool | None = None) -> DatasetSpec:
    """The registry entry of ``name`` with its class count and image size known (an image
    folder's are read off the folder, which must be there)."""
    spec = get_dataset(name)
    return spec if spec.num_classes else describe(spec, locate_dataset(name, "train", data_root, download))


def data_source(name: str, data_root: str | Path | None = None, download: bool | None = None) -> dict[str, str]:
    """What a run's stored settings record of its data beyond the dataset's name: for an
    image folder (whose name says nothing of its files) its resolved root and a key of the
    listing of its splits (each file's name, size and modification time, the cache's key),
    so a resumed or finished run of another folder is told apart; ``{}`` for the named
    datasets, whose settings stay as they were."""
    spec = get_dataset(name)
    if spec.files:  # a named dataset: its official files
        return {}
    root = locate_dataset(name, "train", data_root, download)
    spec = describe(spec, root)
    keys = [f"{split}:{spec.reader(root, split, spec).key}" for split in SPLITS if (root / split).is_dir()]
    return {"data_root": str(root.resolve()), "data_listing": hashlib.sha1("|".join(keys).encode()).hexdigest()[:16]}


def check_poison_source(path: Path, source: dict[str, str]) -> None:
    """An image folder's poisoned set ``path`` was crafted from the folder ``source`` names
    (its summary ``<name>.json`` records the folder): poisoned_data/imagefolder/ is shared
    by every image folder, and another folder's poison must not train this one's victim."""
    summary = path.with_suffix(".json")
    crafted = (
        read_state_json(summary, "delete it with its .pkl and craft the poison again") if summary.is_file() else {}
    )
    root = crafted.get("data_root") if isinstance(crafted, dict) else None  # None: crafted before it was recorded
    if root is not None and root != source["data_root"]:
        raise UserError(
            f"{path} was crafted from the image folder {root}, not {source['data_root']}; craft this folder's "
            "poison under another name (poison.py --name) or pass that folder's --data_root"
        )


def load_dataset(
    name: str,
    split: str = "train",
    data_root: str | Path | None = None,
    cache: bool = True,
    download: bool | None = None,
) -> ImageSet:
    """The ``train`` or ``test`` split of dataset ``name`` as an :class:`ImageSet` (fetched
    when absent, see :func:`locate_dataset`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    spec = get_dataset(name)
    if spec.name == DATASET:
        return load_cifar10(split, data_root, cache, download)
    root = locate_dataset(name, split, data_root, download)
    spec = describe(spec, root)
    listing = spec.reader(root, split, spec)
    key = hashlib.sha1(f"{root.resolve()}|{split}|{spec.image_size}|{listing.key}".encode()).hexdigest()[:16]
    return cached_read(f"{spec.name}-{split}-{key}", spec.image_size, listing.read, cache)


def read_dataset_pkl(path: str | Path, spec: DatasetSpec) -> ImageSet:
    """An ECLIPSE-format ``.pkl`` of ``spec``'s images (its size and class count checked)."""
    return read_eclipse_pkl(path, spec.num_classes, spec.image_size)


def load_poisoned(
    work: Path,
    poison: str,
    data_root: str | Path | None = None,
    subset: int | None = None,
    subset_seed: int = 0,
    download: bool | None = None,
    dataset: str = DATASET,
) -> tuple[ImageSet, str]:
    """The training set named ``poison``: ``poisoned_data/<dataset>/<poison>.pkl``, or for
    ``clean`` (when no ``clean.pkl`` exists) the dataset's training set itself.

    ``subset`` keeps a class-balanced subset (the CPU-scale recipe); poison.py's
    ``--subset N`` draws the same images with the same seed.
    """
    spec = dataset_spec(dataset, data_root, download)
    path = poisoned_file(work, poison, spec.name)
    if path.is_file():
        source = data_source(spec.name, data_root, download)
        if source:
            check_poison_source(path, source)
        data = read_dataset_pkl(path, spec)
        if subset is not None and subset < len(data):
            raise UserError(
                f"{path} holds {len(data)} images; --subset {subset} applies only to the clean set "
                "(craft the poison with poison.py --subset instead)"
            )
        return data, str(path)
    if poison != "clean":
        flags = ("" if spec.name == DATASET else f" --dataset {spec.name}") + work_dir_flag(work)
        hint = f"craft it with `python poison.py --poison {poison}{flags}`"
        raise UserError(
            f"poisoned dataset not found: {path}; "
            + (f"{hint}, " + eclipse_manual("poisoned") if spec.name == DATASET else hint)
        )
    data = load_dataset(spec.name, "train", data_root, download=download)
    if subset is not None:
        data = data.subset(class_balanced_subset(data.labels, subset, subset_seed))
    return data, f"{spec.title} train ({len(data)} images)"
