"""What a dataset entry of the registry is (``DatasetSpec``), its published files
(``DataFile``) and what a reader returns (``Listing``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.download import Remote


@dataclass(frozen=True)
class Listing:
    """What a split consists of: ``key`` changes when a file it reads changes; ``read()`` decodes it."""

    key: str
    read: Callable[[], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DataFile:
    """One published file of a dataset: where it is, what it holds once in place (``produces``,
    relative to the root: the folder or file an archive holds, or the file itself), whether it
    is an archive, and the splits that need it."""

    remote: Remote
    produces: str
    splits: tuple[str, ...] = ("train", "test")
    extract: bool = True


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: ``num_classes`` and ``image_size`` are 0 for the image-folder entry until
    :func:`describe` reads them off the folder."""

    name: str  # the key scripts take, and the folder name under poisoned_data/, diff_ckpt/, ...
    title: str
    num_classes: int
    image_size: int
    # classifiers' input normalisation (DataElixir's models): BackdoorBench's values where it has them
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    env: str  # $<env>_ROOT: where it is; $<env>_DOWNLOAD: whether it may be fetched
    files: tuple[DataFile, ...]
    reader: Callable[[Path, str, DatasetSpec], Listing] | None  # None: CIFAR-10's own path in utils.data
    classes: tuple[str, ...] = ()  # class names where they are fixed (others are named by their index)
    source: str = ""  # where the files and constants come from

    def files_for(self, split: str | None) -> tuple[DataFile, ...]:
        return tuple(f for f in self.files if split is None or split in f.splits)

    def class_names(self) -> list[str]:
        return list(self.classes) if self.classes else [str(i) for i in range(self.num_classes)]
