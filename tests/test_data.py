"""CIFAR-10 readers (both layouts), the cache, the ECLIPSE format and the safe unpickler."""

from __future__ import annotations

import io
import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import (
    CIFAR10_CLASSES,
    ImageSet,
    class_balanced_subset,
    load_cifar10,
    psnr_db,
    read_eclipse_pkl,
    write_eclipse_pkl,
)
from utils.fileio import UserError
from utils.safe_pickle import safe_loads


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/should_not_exist",))


def _batches_dir(tmp_path, n=20):
    """A tiny dataset in the standard cifar-10-batches-py layout (protocol 2, bytes keys)."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    return tmp_path


def test_reads_the_standard_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    root = _batches_dir(tmp_path)
    train = load_cifar10("train", root)
    assert len(train) == 100 and train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    raw = pickle.loads((root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert torch.equal(train.images[:20].reshape(20, -1), torch.from_numpy(raw[b"data"]))  # CHW order kept
    assert load_cifar10("test", root / "cifar-10-batches-py").labels.shape == (20,)


def test_refuses_a_tampered_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    root = _batches_dir(tmp_path)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit()}, protocol=2))
    with pytest.raises(UserError, match="refused to unpickle global 'posix.system'"):
        load_cifar10("test", root)
    assert not os.path.exists("/tmp/should_not_exist")


def test_reads_an_image_folder_tree_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    arrays = []
    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES:
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(a).save(tmp_path / split / cls / f"{i:04d}.png")
                if split == "train":
                    arrays.append(a)
    data = load_cifar10("train", tmp_path)
    assert data.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert torch.equal(data.images, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    again = load_cifar10("train", tmp_path)  # from the cache
    assert torch.equal(again.images, data.images)


def test_image_tree_cache_sees_a_replaced_image(tmp_path, monkeypatch):
    """The cache of an image tree is keyed by every file's size and mtime: an image replaced
    in a middle class folder (neither the first nor the last folder changes) is read anew."""
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(2)
    for cls in CIFAR10_CLASSES:
        (tmp_path / "test" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "test" / cls / f"{i}.png"
            )
    first = load_cifar10("test", tmp_path)
    replaced = tmp_path / "test" / "cat" / "1.png"
    folders = {d: os.stat(d).st_mtime_ns for d in (tmp_path / "test").iterdir()}
    new = np.full((32, 32, 3), 7, dtype=np.uint8)
    with open(replaced, "r+b") as f:  # rewritten in place: the folders' mtimes stay as they were
        buf = io.BytesIO()
        Image.fromarray(new).save(buf, format="PNG")
        f.write(buf.getvalue())
        f.truncate()
    st = os.stat(replaced)
    os.utime(replaced, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert {d: os.stat(d).st_mtime_ns for d in (tmp_path / "test").iterdir()} == folders
    again = load_cifar10("test", tmp_path)
    k = CIFAR10_CLASSES.index("cat") * 2 + 1
    assert torch.equal(again.images[k], torch.from_numpy(new).permute(2, 0, 1))
    assert torch.equal(again.images[:k], first.images[:k]) and not torch.equal(again.images[k], first.images[k])


def test_missing_or_malformed_roots(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="CIFAR-10 not found at .*nowhere.*--data_root"):
        load_cifar10("train", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither 'cifar-10-batches-py' nor train/"):
        load_cifar10("train", tmp_path / "empty")
    (tmp_path / "partial" / "train" / "airplane").mkdir(parents=True)
    with pytest.raises(UserError, match="no .png/.jpg images"):
        load_cifar10("train", tmp_path / "partial")
    monkeypatch.setenv("CIFAR10_ROOT", str(tmp_path / "env_root"))
    with pytest.raises(UserError, match="env_root"):
        load_cifar10("test")


def test_shared_cifar10_is_complete(cifar_root, cifar_train, cifar_test):
    assert len(cifar_train) == 50_000 and len(cifar_test) == 10_000
    assert torch.bincount(cifar_train.labels).tolist() == [5000] * 10
    t0 = time.time()
    load_cifar10("test", cifar_root)  # cached
    assert time.time() - t0 < 5


def test_class_balanced_subset_is_deterministic(cifar_train):
    a = class_balanced_subset(cifar_train.labels, 1000, seed=0)
    assert torch.equal(a, class_balanced_subset(cifar_train.labels, 1000, seed=0))
    assert torch.bincount(cifar_train.labels[a]).tolist() == [100] * 10
    assert bool((a[1:] > a[:-1]).all())


@pytest.mark.parametrize("n", [7, 30, 45, 61, 69])
def test_class_balanced_subset_fills_small_classes_share(n):
    # uneven classes (as SVHN's and GTSRB's): class 1 has 3 images, class 3 has 8
    labels = torch.tensor([0] * 20 + [1] * 3 + [2] * 30 + [3] * 8 + [4] * 9)
    a = class_balanced_subset(labels, n, seed=3)
    assert len(a) == n and len(set(a.tolist())) == n
    assert torch.equal(a, class_balanced_subset(labels, n, seed=3))
    counts = torch.bincount(labels[a], minlength=5).tolist()
    sizes = torch.bincount(labels).tolist()
    # as balanced as the sizes allow: a class below the largest count gave all it has
    assert all(c == s or c >= max(counts) - 1 for c, s in zip(counts, sizes))
    if n == 30:
        assert counts == [7, 3, 7, 7, 6]  # class 1's shortfall of 3 goes to the others, first classes first


def test_psnr_db_per_image_and_pooled(small_train):
    clean = small_train.images[:4].float()
    noisy = (clean + torch.tensor([1.0, 2.0, 4.0, 8.0]).view(4, 1, 1, 1)).clamp(0, 255)
    mse = (noisy - clean).pow(2).mean(dim=(1, 2, 3))
    per_image = (10 * torch.log10(255.0**2 / mse)).mean().item()
    pooled = 10 * np.log10(255.0**2 / mse.mean().item())
    assert psnr_db(noisy, clean) == pytest.approx(per_image, rel=1e-6)
    assert psnr_db(noisy, clean, per_image=False) == pytest.approx(pooled, rel=1e-6)
    # the mean of the images' logs exceeds the log of their mean
    assert psnr_db(noisy, clean) > psnr_db(noisy, clean, per_image=False)
    assert psnr_db(clean, clean) == pytest.approx(10 * np.log10(255.0**2 / 1e-10), rel=1e-6)  # finite, fits in JSON


def test_eclipse_pkl_roundtrip(tmp_path, small_train):
    path = tmp_path / "EM.pkl"
    write_eclipse_pkl(path, small_train)
    raw = pickle.loads(path.read_bytes())
    assert isinstance(raw, list) and len(raw) == len(small_train)
    img, label = raw[3]
    assert isinstance(img, bytes) and len(img) == 3072 and isinstance(label, int)
    hwc = np.frombuffer(img, np.uint8).reshape(32, 32, 3)  # PIL tobytes() layout
    assert np.array_equal(hwc, small_train.images[3].permute(1, 2, 0).numpy())
    back = read_eclipse_pkl(path)
    assert torch.equal(back.images, small_train.images) and torch.equal(back.labels, small_train.labels)


def test_eclipse_pkl_from_protocol2_with_numpy_labels(tmp_path):
    # older writers: protocol 2 (bytes via _codecs.encode) and numpy integer labels
    pairs = [(bytes(range(256)) * 12, np.int64(3)), (bytes(3072), np.int64(9))]
    (tmp_path / "old.pkl").write_bytes(pickle.dumps(pairs, protocol=2))
    data = read_eclipse_pkl(tmp_path / "old.pkl")
    assert data.labels.tolist() == [3, 9]


@pytest.mark.parametrize("protocol", [2, 4])
def test_eclipse_pkl_with_torch_and_numpy_integer_labels(tmp_path, protocol):
    """The official loader wraps each label in ``torch.tensor(label)``, so writers may have
    stored 0-d integer tensors or numpy integer scalars: both are read (the tensors through
    torch's weights-only loader)."""
    img = bytes(range(256)) * 12
    labels = [torch.tensor(3), torch.tensor(7, dtype=torch.uint8), torch.tensor(2, dtype=torch.int32)]
    labels += [np.int64(9), np.uint8(1), np.int32(0)]
    (tmp_path / "t.pkl").write_bytes(pickle.dumps([(img, y) for y in labels], protocol=protocol))
    data = read_eclipse_pkl(tmp_path / "t.pkl")
    assert data.labels.tolist() == [3, 7, 2, 9, 1, 0] and data.labels.dtype == torch.int64
    assert data.images[0].permute(1, 2, 0).flatten().tolist() == list(img)


class _StoragePayload:
    """What a tensor's storage pickles as, with a code payload in place of torch.save bytes."""

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (pickle.dumps(_Exploit()),))


class _TorchLoad:
    def __reduce__(self):
        return (torch.load, ("/nonexistent",))


@pytest.mark.parametrize(
    "label, message",
    [
        (lambda: torch.tensor(3.0), "is not an integer"),
        (lambda: torch.tensor(True), "is not an integer"),
        (lambda: torch.tensor([3]), "is not an integer"),
        (lambda: np.float64(3.0), "is not an integer"),
        (lambda: torch.tensor(12), "label 12 outside"),
        (lambda: _StoragePayload(), "refused a torch storage"),
        (lambda: _TorchLoad(), "refused to unpickle global 'torch.serialization.load'"),
    ],
)
def test_eclipse_pkl_refuses_other_tensors_and_torch_payloads(tmp_path, label, message):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps([(bytes(3072), 1), (bytes(3072), label())]))
    with pytest.raises(UserError, match=message):
        read_eclipse_pkl(path)
    assert not os.path.exists("/tmp/should_not_exist")


@pytest.mark.parametrize(
    "payload, message",
    [
        (lambda: pickle.dumps([(bytes(3072), 1), (_Exploit(), 2)]), "refused to unpickle global"),
        (lambda: pickle.dumps([(bytes(3072), 1)] * 4)[:-20], "not a valid pickle"),
        (lambda: pickle.dumps([(bytes(3000), 1)]), "entry 0: image has 3000 bytes, expected 3072"),
        (lambda: pickle.dumps([(bytes(3072), 1), (bytes(3072), 10)]), "entry 1: label 10 outside 0..9"),
        (lambda: pickle.dumps([(bytes(3072), -1)]), "label -1 outside"),
        (lambda: pickle.dumps([(bytes(3072), "cat")]), "is not an integer"),
        (lambda: pickle.dumps({"data": 1}), "expected a list"),
        (lambda: pickle.dumps([]), "empty"),
        (lambda: pickle.dumps([(bytes(3072),)]), "not an \\(image bytes, label\\) pair"),
    ],
)
def test_bad_eclipse_pkl(tmp_path, payload, message):
    path = tmp_path / "bad.pkl"
    path.write_bytes(payload())
    with pytest.raises(UserError, match=message):
        read_eclipse_pkl(path)
    assert not os.path.exists("/tmp/should_not_exist")


def test_safe_loads_blocks_builtins_eval():
    class EvalExploit:
        def __reduce__(self):
            return (eval, ("1+1",))

    with pytest.raises(UserError, match="builtins.eval"):
        safe_loads(pickle.dumps(EvalExploit()))


def test_imageset_validates():
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 3, 32, 32), torch.zeros(2))
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(3))


def test_decompression_bomb_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    from utils.data import read_images
    from utils.datasets.readers import imagefolder_layout

    path = tmp_path / "train" / "a" / "0.png"
    path.parent.mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images over twice this
    for read in (lambda: read_images([str(path)]), lambda: imagefolder_layout(tmp_path)):
        with pytest.raises(UserError, match="0.png: refused as a decompression bomb") as e:
            read()
        assert "\n" not in str(e.value)
