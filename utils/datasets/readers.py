"""Readers of the datasets' official on-disk formats, each returning a :class:`Listing`: a
cheap key of the files it would read (for the cache) and the read itself, giving uint8
``[N, 3, S, S]`` images and int64 labels.

- CIFAR-100: the Python pickles ``cifar-100-python/train|test``, the ``fine_labels``;
- SVHN: ``train_32x32.mat`` / ``test_32x32.mat`` (scipy), ``X`` [32, 32, 3, N], label 10 = digit 0;
- GTSRB: ``GTSRB/Final_Training/Images/<class>/*.ppm`` listed by each class's ``GT-<class>.csv``, and
  ``GTSRB/Final_Test/Images/*.ppm`` labelled by ``GT-final_test.csv``; every image resized
  to 32x32 as BackdoorBench's ``Resize((32, 32))`` does (PIL bilinear, the whole image);
- Tiny-ImageNet: ``tiny-imagenet-200/train/<wnid>/images/*.JPEG`` and ``val/`` (with
  ``val_annotations.txt``) as the test split, classes in ``wnids.txt`` order, 64x64;
- an image folder of one's own: ``train|test/<class>/*.png|jpg``, classes sorted by name.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import scipy.io

from utils.data import IMAGE_EXTS, fingerprint, folder_files, read_images, read_pickle_batch
from utils.datasets.spec import DatasetSpec, Listing
from utils.fileio import UserError

IMAGE_SIZES = range(8, 257)  # an image folder's side: a classifier's input, and 256 at most


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} missing: {path} (the official archive extracts it there; delete the root to refetch)")
    return path


def _checked_labels(labels: np.ndarray, num_classes: int, source: Path) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{source}: labels span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}")
    return labels.astype(np.int64)


# --------------------------------------------------------------------------- CIFAR-100


def cifar100(root: Path, split: str, spec: DatasetSpec) -> Listing:
    path = _need(root / "cifar-100-python" / split, f"CIFAR-100 {split} file")
    return Listing(fingerprint([path]), lambda: read_pickle_batch(path, "fine_labels", spec.num_classes))


# --------------------------------------------------------------------------- SVHN


def svhn(root: Path, split: str, spec: DatasetSpec) -> Listing:
    path = _need(root / f"{split}_32x32.mat", f"SVHN {split} file")

    def read() -> tuple[np.ndarray, np.ndarray]:
        try:
            mat = scipy.io.loadmat(path, variable_names=["X", "y"])
        except (ValueError, OSError, TypeError, NotImplementedError) as e:
            raise UserError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from None
        x, y = mat.get("X"), mat.get("y")
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise UserError(f"{path}: 'X' must be a uint8 array [32, 32, 3, N]")
        if not isinstance(y, np.ndarray) or y.size != x.shape[3] or not np.issubdtype(y.dtype, np.number):
            raise UserError(f"{path}: 'y' must hold one label per image")
        labels = y.reshape(-1).astype(np.int64)
        if labels.size and (labels.min() < 1 or labels.max() > 10):
            raise UserError(f"{path}: 'y' spans {labels.min()}..{labels.max()}, expected 1..10 (10 = digit 0)")
        return x.transpose(3, 2, 0, 1), labels % 10  # torchvision's [N, 3, H, W] and 10 -> 0

    return Listing(fingerprint([path]), read)


# --------------------------------------------------------------------------- GTSRB


def _gtsrb_rows(path: Path, folder: Path) -> list[tuple[str, int]]:
    """``(image path, ClassId)`` of every row of a GTSRB annotation CSV (``;``-separated)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
        return [(str(folder / row["Filename"]), int(row["ClassId"])) for row in rows]
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a GTSRB annotation file with Filename and ClassId columns ({e})") from None


def gtsrb(root: Path, split: str, spec: DatasetSpec) -> Listing:
    rows: list[tuple[str, int]] = []
    if split == "train":
        base = _need(root / "GTSRB" / "Final_Training" / "Images", "GTSRB training folder")
        for d in sorted(p for p in base.iterdir() if p.is_dir()):  # BackdoorBench reads each class's CSV
            rows += _gtsrb_rows(_need(d / f"GT-{d.name}.csv", f"GTSRB annotations of class {d.name}"), d)
        sources = [Path(f) for f, _ in rows] + sorted(base.glob("*/GT-*.csv"))
    else:
        annotations = _need(root / "GT-final_test.csv", "GTSRB test labels")
        rows = _gtsrb_rows(annotations, _need(root / "GTSRB" / "Final_Test" / "Images", "GTSRB test images"))
        sources = [annotations] + [Path(f) for f, _ in rows]
    if not rows:
        raise UserError(f"no GTSRB {split} images under {root / 'GTSRB'}")
    files = [f for f, _ in rows]
    labels = _checked_labels(np.asarray([c for _, c in rows]), spec.num_classes, root / "GTSRB")
    missing = next((f for f in files if not os.path.isfile(f)), None)
    if missing:
        raise UserError(f"GTSRB {split} image listed but missing: {missing}")
    return Listing(fingerprint(sources), lambda: (read_images(files, spec.image_size, resize=True), labels))


# --------------------------------------------------------------------------- Tiny-ImageNet


def _image_number(path: Path) -> tuple[int, str]:
    """BackdoorBench's order of a class's training images: ``<wnid>_0.JPEG``, ``<wnid>_1.JPEG``, ..."""
    m = re.search(r"_(\d+)$", path.stem)
    return (int(m.group(1)) if m else -1, path.name)


def tinyimagenet(root: Path, split: str, spec: DatasetSpec) -> Listing:
    base = _need(root / "tiny-imagenet-200", "Tiny-ImageNet folder")
    lines = _need(base / "wnids.txt", "Tiny-ImageNet wnids.txt").read_text().splitlines()
    wnids = [line.split()[0] for line in lines if line.strip()]  # blank lines (a trailing one) are no class
    if len(wnids) != spec.num_classes or len(set(wnids)) != len(wnids):
        raise UserError(f"{base / 'wnids.txt'}: expected {spec.num_classes} distinct class ids, got {len(wnids)}")
    index = {w: i for i, w in enumerate(wnids)}
    files, labels = [], []
    if split == "train":
        for w in wnids:
            found = sorted(
                _need(base / "train" / w / "images", f"class folder of {w}").glob("*.JPEG"), key=_image_number
            )
            files += [str(p) for p in found]
            labels += [index[w]] * len(found)
        sources = [base / "wnids.txt"] + [Path(f) for f in files]
    else:
        annotations = _need(base / "val" / "val_annotations.txt", "Tiny-ImageNet val annotations")
        for n, line in enumerate(annotations.read_text().splitlines()):
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise UserError(f"{annotations}: line {n + 1} names no image and known class id")
            files.append(str(base / "val" / "images" / parts[0]))
            labels.append(index[parts[1]])
        sources = [base / "wnids.txt", annotations] + [Path(f) for f in files]
    missing = next((f for f in files if not os.path.isfile(f)), None)
    if missing or not files:
        raise UserError(f"Tiny-ImageNet {split} image missing: {missing or base / split}")
    y = np.asarray(labels, dtype=np.int64)
    return Listing(fingerprint(sources), lambda: (read_images(files, spec.image_size), y))


# --------------------------------------------------------------------------- an image folder

FOLDER_HELP = (
    "an image-folder dataset is <data_root>/train/<class>/*.png|jpg and <data_root>/test/<class>/*.png|jpg "
    "(the same class folders), square images of one size; give --data_root or $IMAGEFOLDER_ROOT"
)


def imagefolder_layout(root: Path) -> tuple[list[str], int]:
    """The class folders of ``root/train`` (sorted by name) and the side of the first image."""
    from PIL import Image

    train = root / "train"
    if not train.is_dir():
        raise UserError(f"image-folder dataset not found: {train} is not a folder; {FOLDER_HELP}")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise UserError(f"{train} holds {len(classes)} class folder(s), expected at least 2; {FOLDER_HELP}")
    first = next((p for p in sorted((train / classes[0]).iterdir()) if p.suffix.lower() in IMAGE_EXTS), None)
    if first is None:
        raise UserError(f"no .png/.jpg images in {train / classes[0]}; {FOLDER_HELP}")
    try:
        with Image.open(first) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:  # not an OSError: PIL's refusal of a huge image
        raise UserError(f"{first}: refused as a decompression bomb ({e}); replace or remove the file") from None
    except OSError as e:
        raise UserError(f"{first}: cannot decode the image ({e}); replace or remove the file") from None
    if w != h or h not in IMAGE_SIZES:
        raise UserError(f"{first}: image is {w}x{h}, expected square images of 8..256 pixels; {FOLDER_HELP}")
    return classes, h


def imagefolder(root: Path, split: str, spec: DatasetSpec) -> Listing:
    files, labels, key = folder_files(root, split, spec.classes, "image-folder", FOLDER_HELP)
    return Listing(key, lambda: (read_images(files, spec.image_size), labels))
