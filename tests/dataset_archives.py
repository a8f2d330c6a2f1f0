"""Tiny archives in each dataset's official format (the files torchvision and BackdoorBench
read), written by the tests, and a local HTTP server on 127.0.0.1 that serves them under
their official names, as ``$DATASETS_MIRROR`` expects."""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

# the overrides of each file's MD5 (its Remote's env + "_MD5") and the file's official name
MD5_ENVS = {
    "cifar100": {"CIFAR100": "cifar-100-python.tar.gz"},
    "svhn": {"SVHN_TRAIN": "train_32x32.mat", "SVHN_TEST": "test_32x32.mat"},
    "gtsrb": {
        "GTSRB_TRAIN": "GTSRB_Final_Training_Images.zip",
        "GTSRB_TEST": "GTSRB_Final_Test_Images.zip",
        "GTSRB_TEST_GT": "GTSRB_Final_Test_GT.zip",
    },
    "tinyimagenet": {"TINYIMAGENET": "tiny-imagenet-200.zip"},
}
# images per class in the tiny archives: (train, test)
PER_CLASS = {"cifar100": (2, 1), "svhn": (20, 5), "gtsrb": (5, 1), "tinyimagenet": (1, 1)}
CLASSES = {"cifar100": 100, "svhn": 10, "gtsrb": 43, "tinyimagenet": 200}


def _labels(n_classes: int, per: int) -> np.ndarray:
    return np.repeat(np.arange(n_classes), per)


def _images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """uint8 [n, size, size, 3]: each image a class-free random field, smooth enough to JPEG."""
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _encoded(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in files.items():
            zf.writestr(name, body)
    return buf.getvalue()


def cifar100(rng: np.random.Generator) -> dict[str, bytes]:
    files = {}
    for split, per in zip(("train", "test"), PER_CLASS["cifar100"]):
        fine = _labels(100, per)
        batch = {
            "data": _images(rng, len(fine), 32).transpose(0, 3, 1, 2).reshape(len(fine), 3072),
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "filenames": [f"img_{i}.png" for i in range(len(fine))],
        }
        files[f"cifar-100-python/{split}"] = pickle.dumps(batch, protocol=2)  # as the official (Python 2) pickles
    meta = {
        "fine_label_names": [f"class{i}" for i in range(100)],
        "coarse_label_names": [f"super{i}" for i in range(20)],
    }
    files["cifar-100-python/meta"] = pickle.dumps(meta, protocol=2)
    return {"cifar-100-python.tar.gz": _tar_gz(files)}


def svhn(rng: np.random.Generator) -> dict[str, bytes]:
    out = {}
    for split, per in zip(("train", "test"), PER_CLASS["svhn"]):
        digits = _labels(10, per)
        buf = io.BytesIO()
        x = _images(rng, len(digits), 32).transpose(1, 2, 3, 0)  # [32, 32, 3, N]
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]  # digit 0 is label 10
        scipy.io.savemat(buf, {"X": x, "y": y})
        out[f"{split}_32x32.mat"] = buf.getvalue()
    return out


def gtsrb(rng: np.random.Generator) -> dict[str, bytes]:
    """Images of assorted sizes (as the real ones, 15x15 to 250x250), in .ppm."""
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    train: dict[str, bytes] = {}
    per_train, per_test = PER_CLASS["gtsrb"]
    for c in range(43):
        rows = header
        for i in range(per_train):
            side = int(rng.integers(28, 48))
            name = f"00000_{i:05d}.ppm"
            train[f"GTSRB/Final_Training/Images/{c:05d}/{name}"] = _encoded(_images(rng, 1, side)[0], "PPM")
            rows += f"{name};{side};{side};5;5;{side - 5};{side - 5};{c}\n"
        train[f"GTSRB/Final_Training/Images/{c:05d}/GT-{c:05d}.csv"] = rows.encode()
    test: dict[str, bytes] = {}
    gt = header
    for k, c in enumerate(_labels(43, per_test)):
        side = int(rng.integers(28, 48))
        name = f"{k:05d}.ppm"
        test[f"GTSRB/Final_Test/Images/{name}"] = _encoded(_images(rng, 1, side)[0], "PPM")
        gt += f"{name};{side};{side};5;5;{side - 5};{side - 5};{c}\n"
    unlabelled = "".join(line.rsplit(";", 1)[0] + "\n" for line in gt.splitlines())  # the archive's own copy
    test["GTSRB/Final_Test/Images/GT-final_test.test.csv"] = unlabelled.encode()
    return {
        "GTSRB_Final_Training_Images.zip": _zip(train),
        "GTSRB_Final_Test_Images.zip": _zip(test),
        "GTSRB_Final_Test_GT.zip": _zip({"GT-final_test.csv": gt.encode()}),
    }


def tinyimagenet(rng: np.random.Generator) -> dict[str, bytes]:
    wnids = [f"n{1440000 + 7 * i:08d}" for i in range(200)]
    files = {"tiny-imagenet-200/wnids.txt": ("\n".join(wnids) + "\n").encode()}
    files["tiny-imagenet-200/words.txt"] = "".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)).encode()
    per_train, per_test = PER_CLASS["tinyimagenet"]
    for w in wnids:
        boxes = ""
        for i in range(per_train):
            name = f"{w}_{i}.JPEG"
            img = _images(rng, 1, 64)[0]
            if i == 0 and w == wnids[1]:
                img = np.repeat(img[:, :, :1], 3, axis=2)  # some real images are grayscale JPEGs
                files[f"tiny-imagenet-200/train/{w}/images/{name}"] = _encoded(img[:, :, 0], "JPEG")
            else:
                files[f"tiny-imagenet-200/train/{w}/images/{name}"] = _encoded(img, "JPEG")
            boxes += f"{name}\t0\t0\t63\t63\n"
        files[f"tiny-imagenet-200/train/{w}/{w}_boxes.txt"] = boxes.encode()
    notes = ""
    for k, c in enumerate(_labels(200, per_test)):
        files[f"tiny-imagenet-200/val/images/val_{k}.JPEG"] = _encoded(_images(rng, 1, 64)[0], "JPEG")
        notes += f"val_{k}.JPEG\t{wnids[c]}\t0\t0\t63\t63\n"
    files["tiny-imagenet-200/val/val_annotations.txt"] = notes.encode()
    files["tiny-imagenet-200/test/images/test_0.JPEG"] = _encoded(_images(rng, 1, 64)[0], "JPEG")
    return {"tiny-imagenet-200.zip": _zip(files)}


BUILDERS = {"cifar100": cifar100, "svhn": svhn, "gtsrb": gtsrb, "tinyimagenet": tinyimagenet}


def write_archives(folder: Path, seed: int = 0) -> dict[str, str]:
    """Every dataset's files into ``folder`` under their official names; returns the
    environment that points the registry at them: each file's MD5 override."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {}
    for name, build in BUILDERS.items():
        bodies = build(np.random.default_rng(seed))
        for var, file in MD5_ENVS[name].items():
            (folder / file).write_bytes(bodies[file])
            env[f"{var}_MD5"] = hashlib.md5(bodies[file]).hexdigest()
    return env


class MirrorServer:
    """``folder`` over HTTP on 127.0.0.1 (a free port), counting the requests per path."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
