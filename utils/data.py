"""CIFAR-10 in memory as uint8 tensors, from either on-disk layout, plus the ECLIPSE
dataset format (a pickled list of ``(3072 HWC bytes, label)`` pairs; ``S*S*3`` bytes for
another dataset's ``S x S`` images). The other datasets (``utils/datasets/``) are read with
the image-tree reader and the cache here.

Images are kept as ``uint8 [N, 3, S, S]`` tensors end to end (32 x 32 for CIFAR-10);
conversion to float happens per batch (``psnr_db`` compares two such batches). The first
read of a dataset decodes it once and caches the arrays as ``.npy`` files (loaded with
``allow_pickle=False``), so later runs start at once.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from utils.download import download_cifar10, enabled
from utils.fileio import UserError, atomic_write_bytes
from utils.paths import REPO_ROOT
from utils.safe_pickle import safe_load

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
NUM_CLASSES = 10
# the per-channel mean and std classifiers normalise with (BackdoorBench's values)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)
IMAGE_BYTES = 32 * 32 * 3
# the pixels an ECLIPSE .pkl may declare beyond its own size (entries sharing one image's
# bytes): all of CIFAR-10's, so a small file cannot ask for gigabytes
MAX_SHARED_PIXEL_BYTES = 60_000 * IMAGE_BYTES
IMAGE_EXTS = (".png", ".jpg", ".jpeg")  # the suffixes an image folder's files may have
_SOURCES_HELP = (
    "provide CIFAR-10 with --data_root, or $CIFAR10_ROOT, or at data/cifar10, as either "
    "the standard 'cifar-10-batches-py' folder or an image tree train|test/<class>/*.png|jpg, "
    "or let the official archive be downloaded there (--download true / CIFAR10_DOWNLOAD=1, the default)"
)


@dataclass
class ImageSet:
    """Images as ``uint8 [N, 3, S, S]`` (S = 32 for CIFAR-10) and labels as ``int64 [N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        shape = tuple(self.images.shape)
        if self.images.dtype != torch.uint8 or len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
            raise ValueError(f"images must be uint8 [N,3,S,S], got {self.images.dtype} {shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be [N] for N images")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index].contiguous(), self.labels[index].clone())


# --------------------------------------------------------------------------- roots


def psnr_db(a: torch.Tensor, b: torch.Tensor, per_image: bool = True) -> float:
    """PSNR in dB of images ``a`` against ``b`` (``[B, C, H, W]``, both on the 0..255 scale).

    ``per_image``: the mean of each image's PSNR (how purification and the respacing bench report
    it); otherwise the PSNR of the whole batch's mean squared error (how StegaStamp reports its
    encoder).  An exact match counts as an MSE of 1e-10 (148 dB), not infinity, so it fits in JSON.
    """
    mse = (a.float() - b.float()).pow(2)
    mse = mse.mean(dim=(1, 2, 3)) if per_image else mse.mean()
    return (10 * torch.log10(255.0**2 / mse.clamp(min=1e-10))).mean().item()


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """``--data_root`` if given, else ``$CIFAR10_ROOT``, else ``data/cifar10``."""
    if data_root:
        return Path(data_root).expanduser()
    env = os.environ.get("CIFAR10_ROOT")
    if env:
        return Path(env).expanduser()
    return REPO_ROOT / "data" / "cifar10"


def cache_dir() -> Path:
    """Where decoded datasets are cached: ``$CIFAR10_CACHE`` (every dataset's), else ``data/cache``."""
    return Path(os.environ.get("CIFAR10_CACHE", REPO_ROOT / "data" / "cache"))


def _detect_layout(root: Path) -> tuple[str, Path]:
    if (root / "cifar-10-batches-py").is_dir():
        return "batches", root / "cifar-10-batches-py"
    if (root / "data_batch_1").is_file() or (root / "test_batch").is_file():
        return "batches", root
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "folders", root
    return "", root


def cifar10_present(data_root: str | Path | None = None) -> bool:
    """Whether CIFAR-10 (either layout) is at the resolved root, i.e. nothing would be downloaded."""
    root = resolve_data_root(data_root)
    return root.is_dir() and bool(_detect_layout(root)[0])


def fingerprint(paths: list[Path]) -> str:
    """A key of files' names, sizes and modification times (a replaced file changes it)."""
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- readers


def _read_batches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise UserError(f"CIFAR-10 batch file missing: {path}; {_SOURCES_HELP}")
        x, y = read_pickle_batch(path, "labels", NUM_CLASSES)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def read_pickle_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch of the CIFAR datasets' Python version: ``data`` (uint8 [N, 3072]) and
    ``label_key`` (N integers below ``num_classes``), as ``uint8 [N, 3, 32, 32]`` and int64 labels."""
    d = safe_load(path, encoding="bytes")
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a dict with 'data' and '{label_key}', got {type(d).__name__}")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    data, labels = d.get("data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: 'data' must be a uint8 array [N, 3072]")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: '{label_key}' must be N integers in 0..{num_classes - 1}") from None
    if labels.shape != (data.shape[0],) or labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"{path}: '{label_key}' must be N integers in 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _decode_files(files: list[str], size: int = 32, resize: bool = False) -> np.ndarray:
    """The images ``files`` as uint8 ``[N, size, size, 3]``; each must be ``size x size``, or with
    ``resize`` is resized to it as torchvision's ``Resize`` does on a PIL image (bilinear)."""
    from PIL import Image

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                if not resize and im.size != (size, size):
                    raise UserError(f"{f}: image is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
                rgb = im.convert("RGB")
                out[i] = np.asarray(rgb.resize((size, size), Image.BILINEAR) if resize else rgb)
        except Image.DecompressionBombError as e:  # not an OSError: PIL's refusal of a huge image
            raise UserError(f"{f}: refused as a decompression bomb ({e}); replace or remove the file") from None
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a truncated or corrupt file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{f}: cannot decode the image ({first}); replace or remove the file") from None
    return out


def folder_files(
    root: Path, split: str, classes: Sequence[str] = CIFAR10_CLASSES, what: str = "CIFAR-10", hint: str = _SOURCES_HELP
) -> tuple[list[str], np.ndarray, str]:
    """The split's image files ``root/<split>/<class>/*.png|jpg`` in class order, their
    labels, and a key of the listing: every file's name, size and modification time (a
    replaced image changes the key)."""
    base = root / split
    if not base.is_dir():
        raise UserError(f"{what} {split} folder missing: {base}; {hint}")
    files, labels = [], []
    listing = hashlib.sha1()
    for label, cls in enumerate(classes):
        d = base / cls
        if not d.is_dir():
            raise UserError(f"class folder missing: {d} (expected the {len(classes)} {what} class folders)")
        with os.scandir(d) as it:
            entries = sorted((e for e in it if e.name.lower().endswith(IMAGE_EXTS)), key=lambda e: e.name)
        if not entries:
            raise UserError(f"no .png/.jpg images in {d}")
        for e in entries:
            st = e.stat()
            listing.update(f"{cls}/{e.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        files += [os.path.join(d, e.name) for e in entries]
        labels += [label] * len(entries)
    return files, np.asarray(labels, dtype=np.int64), listing.hexdigest()[:16]


def read_images(files: list[str], size: int = 32, resize: bool = False) -> np.ndarray:
    """Decode ``files`` (see ``_decode_files``) into uint8 ``[N, 3, size, size]``, in parallel when many."""
    workers = min(os.cpu_count() or 1, 8)
    decode = partial(_decode_files, size=size, resize=resize)
    if workers <= 1 or len(files) < 2000:
        hwc = decode(files)
    else:
        chunks = [files[i : i + 1000] for i in range(0, len(files), 1000)]
        with ProcessPoolExecutor(workers) as ex:
            hwc = np.concatenate(list(ex.map(decode, chunks)))
    return hwc.transpose(0, 3, 1, 2)


def locate_cifar10(data_root: str | Path | None = None, download: bool | None = None) -> tuple[str, Path]:
    """The layout (``batches`` or ``folders``) and folder of CIFAR-10; a cheap existence check.

    When the root holds no CIFAR-10, the official archive is downloaded and extracted
    there, unless ``download`` is False (``None``: ``$CIFAR10_DOWNLOAD``, default on)."""
    root = resolve_data_root(data_root)
    layout, folder = _detect_layout(root) if root.is_dir() else ("", root)
    if not layout and enabled(download, "CIFAR10_DOWNLOAD"):
        download_cifar10(root)
        layout, folder = _detect_layout(root)
    if not root.exists():
        raise UserError(f"CIFAR-10 not found at {root}; {_SOURCES_HELP}")
    if not layout:
        raise UserError(f"{root} holds neither 'cifar-10-batches-py' nor train/ and test/ folders; {_SOURCES_HELP}")
    return layout, folder


def load_cifar10(
    split: str = "train", data_root: str | Path | None = None, cache: bool = True, download: bool | None = None
) -> ImageSet:
    """Load the CIFAR-10 ``train`` or ``test`` split as an :class:`ImageSet` (downloading it
    when absent, see :func:`locate_cifar10`)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    layout, folder = locate_cifar10(data_root, download)

    if layout == "batches":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        files, listing = None, fingerprint([folder / n for n in names if (folder / n).exists()])
    else:
        files, labels, listing = folder_files(folder, split)
    key = hashlib.sha1(f"{folder.resolve()}|{split}|{listing}|{len(files or [])}".encode()).hexdigest()[:16]

    def read() -> tuple[np.ndarray, np.ndarray]:
        return _read_batches(folder, split) if layout == "batches" else (read_images(files), labels)

    return cached_read(f"cifar10-{split}-{key}", 32, read, cache)


def cached_read(stem: str, size: int, read: Callable[[], tuple[np.ndarray, np.ndarray]], cache: bool) -> ImageSet:
    """``read()``'s images and labels as an :class:`ImageSet`, through the cache's
    ``<stem>-x.npy`` / ``<stem>-y.npy`` (``stem`` names the dataset, split and a key of its
    files): loaded from there when present and sound, else read and written there."""
    cdir = cache_dir()
    xpath, ypath = cdir / f"{stem}-x.npy", cdir / f"{stem}-y.npy"
    if cache and xpath.is_file() and ypath.is_file():
        try:
            x = np.load(xpath, allow_pickle=False)
            y = np.load(ypath, allow_pickle=False)
            if x.dtype == np.uint8 and x.shape[1:] == (3, size, size) and y.shape == (x.shape[0],):
                return ImageSet(torch.from_numpy(x), torch.from_numpy(y))
        except (ValueError, OSError):
            pass  # a damaged cache is rebuilt below

    x, y = read()
    x = np.ascontiguousarray(x)
    if cache:
        for path, arr in ((xpath, x), (ypath, y)):
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            atomic_write_bytes(path, buf.getvalue())
    return ImageSet(torch.from_numpy(x), torch.from_numpy(np.asarray(y, dtype=np.int64)))


def _class_quotas(counts: list[int], n: int) -> list[int]:
    """How many of ``n`` images each class gives, as equal as its ``counts`` allow: an even
    share (the first ``n % C`` classes one more), and a class short of its share gives all it
    has, its shortfall shared the same way among the classes with spare images. With every
    class large enough this is the plain even split, so balanced datasets draw as before."""
    quota = [0] * len(counts)
    open_ = list(range(len(counts)))  # the classes not yet capped by their size
    left = n
    while open_ and left > 0:
        share = [left // len(open_) + (1 if j < left % len(open_) else 0) for j in range(len(open_))]
        short = [c for c, k in zip(open_, share) if counts[c] < k]
        if not short:
            for c, k in zip(open_, share):
                quota[c] = k
            break
        for c in short:  # capped classes give all they have; the rest is re-shared next round
            quota[c] = counts[c]
            left -= counts[c]
        open_ = [c for c in open_ if c not in short]
    return quota


def class_balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` indices drawn with ``seed``, as equal per class as possible, in ascending order
    (all indices when ``n`` is at least the dataset's size). With uneven classes, the
    share a small class cannot fill goes to the classes with spare images."""
    labels = torch.as_tensor(labels)
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    members = [torch.nonzero(labels == c).flatten() for c in classes.tolist()]
    per = _class_quotas([len(idx) for idx in members], n)
    # one randperm per class in class order, whatever its quota: balanced datasets keep their draws
    picks = [idx[torch.randperm(len(idx), generator=g)[:k]] for idx, k in zip(members, per)]
    return torch.sort(torch.cat(picks)).values


# --------------------------------------------------------------------------- ECLIPSE format


def read_eclipse_pkl(path: str | Path, num_classes: int = NUM_CLASSES, image_size: int = 32) -> ImageSet:
    """Read a list of ``(3072 raw HWC uint8 bytes, int label)`` pairs, validated (another
    dataset: ``image_size``² * 3 bytes and labels below its ``num_classes``)."""
    path = Path(path)
    obj = safe_load(path)
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a list of (image bytes, label) pairs, got {type(obj).__name__}")
    if not obj:
        raise UserError(f"{path}: the dataset is empty")
    size = path.stat().st_size
    nbytes = image_size * image_size * 3
    # the bound in images stays CIFAR-10's at any image size
    if len(obj) * nbytes > max(size, MAX_SHARED_PIXEL_BYTES // IMAGE_BYTES * nbytes):
        raise UserError(
            f"{path}: declares {len(obj)} images ({len(obj) * nbytes} bytes of pixels) in a file of "
            f"{size} bytes; its entries share image data beyond any dataset (a damaged or crafted file)"
        )
    labels = np.empty(len(obj), dtype=np.int64)
    chunks = []
    for i, entry in enumerate(obj):
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise UserError(f"{path}: entry {i} is not an (image bytes, label) pair")
        img, label = entry
        if isinstance(img, np.ndarray):
            img = _uint8_bytes(img, path, i)
        if not isinstance(img, (bytes, bytearray)):
            raise UserError(f"{path}: entry {i}: image is {type(img).__name__}, expected {nbytes} raw bytes")
        if len(img) != nbytes:
            raise UserError(
                f"{path}: entry {i}: image has {len(img)} bytes, expected {nbytes} ({image_size}x{image_size} RGB)"
            )
        label = _plain_label(label)
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            raise UserError(f"{path}: entry {i}: label {label!r} is not an integer")
        if not 0 <= int(label) < num_classes:
            raise UserError(f"{path}: entry {i}: label {int(label)} outside 0..{num_classes - 1}")
        labels[i] = int(label)
        chunks.append(img)
    hwc = np.frombuffer(b"".join(chunks), dtype=np.uint8).reshape(len(obj), image_size, image_size, 3)
    images = torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)))
    return ImageSet(images, torch.from_numpy(labels))


def _plain_label(label: object) -> object:
    """A 0-d integer torch tensor as its int (the official loader's ``torch.tensor(label)``
    accepts it); anything else is returned unchanged for the caller's check."""
    if (
        isinstance(label, torch.Tensor)
        and label.ndim == 0
        and not label.dtype.is_floating_point
        and not label.dtype.is_complex
        and label.dtype != torch.bool
    ):
        return int(label.item())
    return label


def _uint8_bytes(img: np.ndarray, path: Path, i: int) -> bytes:
    """A numpy image as raw bytes: uint8, or integers already in 0..255 (never wrapped modulo 256)."""
    if img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.integer):
            raise UserError(f"{path}: entry {i}: image array is {img.dtype}, expected uint8 (or integers in 0..255)")
        if img.size and (img.min() < 0 or img.max() > 255):
            raise UserError(
                f"{path}: entry {i}: image values span {img.min()}..{img.max()}, expected uint8 values in 0..255"
            )
        img = img.astype(np.uint8)
    return np.ascontiguousarray(img).tobytes()


def eclipse_pkl_bytes(data: ImageSet) -> bytes:
    hwc = np.ascontiguousarray(data.images.numpy().transpose(0, 2, 3, 1)).reshape(len(data), 3 * data.image_size**2)
    pairs = [(row.tobytes(), int(y)) for row, y in zip(hwc, data.labels.tolist())]
    return pickle.dumps(pairs, protocol=4)


def write_eclipse_pkl(path: str | Path, data: ImageSet) -> None:
    """Write ``data`` in the ECLIPSE format, atomically."""
    atomic_write_bytes(path, eclipse_pkl_bytes(data))
