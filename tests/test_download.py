"""Downloads (utils/download.py) against a local HTTP server on 127.0.0.1 that the tests
start: a tiny CIFAR-format tarball and a tiny DDPM checkpoint in pytorch_diffusion's
layout. Happy path, cache hits (no second request), corrupt and truncated payloads, unsafe
archives, downloads switched off, pytorch_diffusion's cache, and the scripts end to end."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from utils import download as dl
from utils.data import load_cifar10
from utils.diffusion.factory import load_diffusion_spec
from utils.fileio import UserError

REPO = Path(__file__).resolve().parents[1]
PER_BATCH = 10  # one image per class in each of the 6 batches


class _Server:
    """Serves ``routes[path] = (body, declared length or None)`` and counts requests."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, int | None]] = {}
        self.hits: Counter[str] = Counter()
        self.ranges = False  # whether Range requests are answered (206) or ignored (200, the whole file)
        self.range_headers: list[str | None] = []
        self.stall_after: int | None = None  # send that many bytes, then wait for ``release``
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.hits[self.path] += 1
                server.range_headers.append(self.headers.get("Range"))
                if self.path not in server.routes:
                    self.send_error(404)
                    return
                body, length = server.routes[self.path]
                start = _range_start(self.headers.get("Range")) if server.ranges else None
                if start is not None and start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(200 if start is None else 206)
                if start is not None:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    body = body[start:]
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                try:
                    if server.stall_after is None:
                        self.wfile.write(body)
                        return
                    self.wfile.write(body[: server.stall_after])
                    self.wfile.flush()
                    server.release.wait()
                    self.wfile.write(body[server.stall_after :])
                except OSError:  # the client is gone
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _range_start(header: str | None) -> int | None:
    if not header or not header.startswith("bytes=") or not header.endswith("-"):
        return None
    return int(header[len("bytes=") : -1])


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _batch(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
    # protocol 2 and string keys, as the official (Python 2) pickles
    return pickle.dumps({"data": data, "labels": list(range(PER_BATCH))}, protocol=2)


def _tarball(extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for i, name in enumerate(names):
            body = _batch(i)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
        for info, body in extra:
            tf.addfile(info, io.BytesIO(body) if body is not None else None)
    return buf.getvalue()


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def _serve_cifar(server, monkeypatch, body: bytes, md5: str | None = None, length: int | None = None) -> str:
    server.routes["/cifar.tgz"] = (body, length)
    monkeypatch.setenv("CIFAR10_URL", server.url("/cifar.tgz"))
    monkeypatch.setenv("CIFAR10_MD5", md5 or _md5(body))
    monkeypatch.setenv("CIFAR10_DOWNLOAD", "1")
    return "/cifar.tgz"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No CIFAR10_ROOT, caches in tmp_path."""
    monkeypatch.delenv("CIFAR10_ROOT", raising=False)
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MODEL_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar10_download_verify_extract_then_cache_hit(server, isolated, monkeypatch):
    path = _serve_cifar(server, monkeypatch, _tarball())
    root = isolated / "data"
    train = load_cifar10("train", root)
    test = load_cifar10("test", root)
    assert len(train) == 5 * PER_BATCH and len(test) == PER_BATCH  # batches smaller than 10,000 images
    raw = pickle.loads(_batch(5))
    assert torch.equal(test.images, torch.from_numpy(raw["data"].reshape(-1, 3, 32, 32)))
    assert server.hits[path] == 1
    # only the extracted batches stay: no archive, no temporary files
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]
    assert load_cifar10("train", root, cache=False).images.equal(train.images)
    assert server.hits[path] == 1


def test_cifar10_goes_to_cifar10_root_when_set(server, isolated, monkeypatch):
    path = _serve_cifar(server, monkeypatch, _tarball())
    monkeypatch.setenv("CIFAR10_ROOT", str(isolated / "env_root"))
    assert len(load_cifar10("test")) == PER_BATCH
    assert (isolated / "env_root" / "cifar-10-batches-py" / "test_batch").is_file()
    assert server.hits[path] == 1


def test_corrupt_payload_is_one_line_error_and_leaves_nothing(server, isolated, monkeypatch):
    good = _tarball()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    path = _serve_cifar(server, monkeypatch, bytes(bad), md5=_md5(good))
    root = isolated / "data"
    with pytest.raises(dl.DownloadError) as e:
        load_cifar10("train", root)
    msg = str(e.value)
    assert "\n" not in msg and server.url(path) in msg
    assert f"expected MD5 {_md5(good)}, got {_md5(bytes(bad))}" in msg
    assert _leftovers(root) == []


@pytest.mark.parametrize("ranges", [True, False])
def test_truncated_transfer_is_kept_and_resumed(server, isolated, monkeypatch, ranges):
    """A cut-off transfer keeps its bytes in a partial file named with the PID (nothing that
    looks complete); the re-run resumes from them with a Range request, or, from a server
    that ignores Range, starts over."""
    body = _tarball()
    _serve_cifar(server, monkeypatch, body[:1000], md5=_md5(body), length=len(body))
    root = isolated / "data"
    with pytest.raises(dl.DownloadError, match="cut off.*kept in .*a re-run resumes from them"):
        load_cifar10("train", root)
    (part,) = _leftovers(root)
    assert part.startswith(f".cifar-10-python.tar.gz.{socket.gethostname()}.{os.getpid()}.") and part.endswith(".part")
    assert (root / part).stat().st_size == 1000
    server.routes["/cifar.tgz"] = (body, None)
    server.ranges = ranges
    assert len(load_cifar10("train", root)) == 5 * PER_BATCH
    assert server.range_headers == [None, "bytes=1000-"]
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]


def test_a_killed_download_is_resumed_and_dead_processes_partials_removed(server, isolated):
    """SIGKILL mid-transfer leaves the partial file of a dead PID: the next fetch resumes
    from it (Range) and removes the other partial files of dead processes; a live
    process's partial file is left alone."""
    body = os.urandom(3 << 20)
    server.routes["/blob"] = (body, None)
    server.ranges = True
    server.stall_after = 2 << 20
    remote = dl.Remote("blob", server.url("/blob"), _md5(body), "TEST_BLOB", "get it by hand")
    dest = isolated / "out" / "blob.bin"
    code = "import sys; from utils import download as dl; dl.fetch(dl.Remote('blob', sys.argv[1], sys.argv[2], 'X', ''), sys.argv[3])"
    child = subprocess.Popen([sys.executable, "-c", code, remote.url, remote.md5, str(dest)], cwd=REPO)
    try:
        for _ in range(1200):  # until the child has written its first chunk
            parts = dl.partial_files(dest)
            if parts and parts[0][0].stat().st_size >= dl.CHUNK or child.poll() is not None:
                break
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        server.release.set()
    ((killed, _, pid),) = dl.partial_files(dest)
    assert pid == child.pid and 0 < killed.stat().st_size < len(body)
    host = socket.gethostname()
    other_dead = dest.parent / f".blob.bin.{host}.{child.pid}.zzzz.part"
    other_dead.write_bytes(b"x" * 10)
    live = dest.parent / f".blob.bin.{host}.1.live.part"  # PID 1 is alive
    live.write_bytes(b"y" * 10)
    offset = killed.stat().st_size
    server.stall_after = None
    assert dl.fetch(remote, dest) == dest and dest.read_bytes() == body
    assert server.range_headers[-1] == f"bytes={offset}-"
    assert _leftovers(dest.parent) == sorted(["blob.bin", live.name])


@pytest.mark.parametrize(
    "name, kind",
    [("../escaped", tarfile.REGTYPE), ("/abs/escaped", tarfile.REGTYPE), ("cifar-10-batches-py/link", tarfile.SYMTYPE)],
)
def test_unsafe_archive_members_are_refused(server, isolated, monkeypatch, name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    body = None
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    else:
        body = b"owned"
        info.size = len(body)
    _serve_cifar(server, monkeypatch, _tarball([(info, body)]))
    root = isolated / "data" / "inner"
    with pytest.raises(UserError, match="refusing to extract"):
        load_cifar10("train", root)
    assert not (isolated / "data" / "escaped").exists()
    assert not (root / "cifar-10-batches-py").exists()
    assert [p for p in _leftovers(root) if not p.endswith(".tar.gz")] == []


def _zipball(extra: list[zipfile.ZipInfo]) -> bytes:
    """The tarball's batches as a zip archive, plus the ``extra`` members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
            zf.writestr(f"cifar-10-batches-py/{name}", _batch(i))
        for info in extra:
            zf.writestr(info, "/etc/passwd" if stat.S_ISLNK(info.external_attr >> 16) else b"owned")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, kind", [("../escaped", stat.S_IFREG), ("/abs/escaped", stat.S_IFREG), ("link", stat.S_IFLNK)]
)
def test_unsafe_zip_members_are_refused(server, isolated, monkeypatch, name, kind):
    info = zipfile.ZipInfo(name if kind == stat.S_IFREG else f"cifar-10-batches-py/{name}")
    info.external_attr = (kind | 0o644) << 16  # the Unix file type, as zip records it
    _serve_cifar(server, monkeypatch, _zipball([info]))
    root = isolated / "data" / "inner"
    with pytest.raises(UserError, match="refusing to extract") as e:
        load_cifar10("train", root)
    assert "\n" not in str(e.value)
    assert not (isolated / "data" / "escaped").exists()
    assert not (root / "cifar-10-batches-py").exists()
    assert [p for p in _leftovers(root) if not p.endswith(".tar.gz")] == []


def test_download_off_says_where_it_looked(server, isolated, monkeypatch):
    path = _serve_cifar(server, monkeypatch, _tarball())
    monkeypatch.setenv("CIFAR10_DOWNLOAD", "0")
    with pytest.raises(UserError, match=r"not found at .*nowhere.*--download true"):
        load_cifar10("train", isolated / "nowhere")
    monkeypatch.setenv("CIFAR10_DOWNLOAD", "1")
    with pytest.raises(UserError, match="nowhere"):
        load_cifar10("train", isolated / "nowhere", download=False)  # the flag wins over the variable
    assert server.hits[path] == 0


def test_no_network_is_one_line_with_the_manual_steps(isolated, monkeypatch):
    s = _Server()
    url = s.url("/cifar.tgz")
    s.close()  # nothing listens there any more
    monkeypatch.setenv("CIFAR10_URL", url)
    monkeypatch.setenv("CIFAR10_DOWNLOAD", "1")
    with pytest.raises(dl.DownloadError) as e:
        load_cifar10("train", isolated / "data")
    msg = str(e.value)
    assert "\n" not in msg and f"cannot download {url}" in msg and "by hand" in msg


def test_concurrent_fetches_of_one_file_do_not_collide(server, isolated):
    body = os.urandom(3 << 20)
    server.routes["/blob"] = (body, None)
    remote = dl.Remote("blob", server.url("/blob"), _md5(body), "TEST_BLOB", "get it by hand")
    dest = isolated / "out" / "blob.bin"
    errors: list[BaseException] = []

    def go() -> None:
        try:
            dl.fetch(remote, dest)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and dest.read_bytes() == body
    assert _leftovers(dest.parent) == ["blob.bin"]


# --------------------------------------------------------------------------- DDPM checkpoints


def _tiny_ddpm_bytes() -> bytes:
    torch.manual_seed(0)
    model = load_diffusion_spec(REPO / "config/ddpm/cpu.yml").build_model()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def _serve_ddpm(server, monkeypatch, body: bytes, env: str = "DDPM_CIFAR10") -> str:
    server.routes["/ddpm.ckpt"] = (body, None)
    monkeypatch.setenv(f"{env}_URL", server.url("/ddpm.ckpt"))
    monkeypatch.setenv(f"{env}_MD5", _md5(body))
    monkeypatch.setenv("DDPM_DOWNLOAD", "1")
    return "/ddpm.ckpt"


def test_ddpm_names_match_pytorch_diffusion():
    assert dl.DDPM_CHECKPOINTS["cifar10"][0] == "diffusion_cifar10_model/model-790000.ckpt"
    assert dl.DDPM_CHECKPOINTS["ema_cifar10"][0] == "ema_diffusion_cifar10_model/model-790000.ckpt"
    assert dl.DDPM_CHECKPOINTS["cifar10"][1].md5 == "82ed3067fd1002f5cf4c339fb80c4669"
    assert dl.DDPM_CHECKPOINTS["ema_cifar10"][1].md5 == "1fa350b952534ae442b1d5235cce5cd3"


def test_ddpm_found_in_pytorch_diffusion_cache_without_a_request(server, isolated, monkeypatch):
    body = _tiny_ddpm_bytes()
    path = _serve_ddpm(server, monkeypatch, body, "DDPM_EMA_CIFAR10")
    theirs = isolated / "xdg" / "diffusion_models_converted" / "ema_diffusion_cifar10_model" / "model-790000.ckpt"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(body)
    assert dl.ddpm_checkpoint("ema_cifar10") == theirs
    assert server.hits[path] == 0


def test_ddpm_partial_copy_in_their_cache_is_ignored_then_ours_is_reused(server, isolated, monkeypatch):
    body = _tiny_ddpm_bytes()
    path = _serve_ddpm(server, monkeypatch, body)
    theirs = isolated / "xdg" / "diffusion_models_converted" / "diffusion_cifar10_model" / "model-790000.ckpt"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(body[:100])  # pytorch_diffusion writes in place: an interrupted copy
    got = dl.ddpm_checkpoint("cifar10")
    assert got == isolated / "models" / "diffusion_cifar10_model" / "model-790000.ckpt"
    assert got.read_bytes() == body and server.hits[path] == 1
    assert dl.ddpm_checkpoint("cifar10") == got and server.hits[path] == 1


def test_ddpm_download_off(isolated, monkeypatch):
    monkeypatch.setenv("DDPM_DOWNLOAD", "0")
    with pytest.raises(UserError, match="diffusion_models_converted.*downloads are off.*by hand"):
        dl.ddpm_checkpoint("cifar10")


# --------------------------------------------------------------------------- the scripts


def _script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CIFAR10_ROOT"}
    env.update(
        PYTHONWARNINGS="ignore",
        CIFAR10_CACHE=str(tmp_path / "cache"),
        MODEL_CACHE=str(tmp_path / "models"),
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
        **extra,
    )
    return env


def test_train_py_downloads_into_empty_data_root_then_reuses_it(server, tmp_path):
    body = _tarball()
    server.routes["/cifar.tgz"] = (body, None)
    env = _script_env(tmp_path, CIFAR10_URL=server.url("/cifar.tgz"), CIFAR10_MD5=_md5(body), CIFAR10_DOWNLOAD="1")
    data_root = tmp_path / "empty"
    data_root.mkdir()
    tiny = ["--poison", "clean", "--subset", "20", "--epochs", "1", "--arch", "resnet18", "--width", "4"]
    tiny += ["--batch_size", "10", "--device", "cpu", "--data_root", str(data_root), "--work_dir", str(tmp_path)]
    for i in range(2):
        res = subprocess.run(
            [sys.executable, "train.py", *tiny, "--run_name", f"r{i}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert (tmp_path / "runs" / "train" / f"r{i}" / "result.json").is_file()
    assert server.hits["/cifar.tgz"] == 1  # the second run found the data
    assert "\r" not in res.stderr  # progress in a pipe: plain lines


def test_attack_script_fetches_and_loads_a_named_ddpm(server, tmp_path, cifar_root):
    body = _tiny_ddpm_bytes()
    server.routes["/ddpm.ckpt"] = (body, None)
    env = _script_env(
        tmp_path,
        CIFAR10_ROOT=str(cifar_root),
        DDPM_CIFAR10_URL=server.url("/ddpm.ckpt"),
        DDPM_CIFAR10_MD5=_md5(body),
        DDPM_DOWNLOAD="1",
    )
    # test_attack_cli.py's tiny scale (the checkpoint has config/ddpm/cpu.yml's shapes), by name
    from test_attack_cli import _argv

    argv = _argv(tmp_path, name="named", diffusion_ckpt="cifar10", steps_T=10, purify_respace=2, rounds_n=1)
    res = subprocess.run([sys.executable, "attack/badnet.py", *argv], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert server.hits["/ddpm.ckpt"] == 1
    assert (tmp_path / "models" / "diffusion_cifar10_model" / "model-790000.ckpt").read_bytes() == body
    assert (tmp_path / "record" / "named" / "metrics.json").is_file()
