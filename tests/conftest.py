"""Shared test fixtures.

Tests that need ``../shared`` (CIFAR-10 images, reference fixtures) fail when it is
missing in CI (``CI`` set) and are skipped with the reason elsewhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))
CIFAR_ROOT = Path(os.environ.get("CIFAR10_ROOT", SHARED / "datasets" / "cifar10"))
FIXTURES = SHARED / "fixtures"

# the attack scripts' smallest real run (200 images, width 4, one epoch): what the tests of
# the attack CLI and of the baselines that read its record share
TINY_ATTACK = {
    "subset": 200,
    "test_subset": 100,
    "model_width": 4,
    "epochs": 1,
    "batch_size": 50,
    "pratio": 0.2,
    "device": "cpu",
}


def attack_argv(work: Path, name: str, cfg: dict, yaml: str = "config/badnet/cifar10.yaml") -> list[str]:
    """An attack script's command line writing record/<name>/ under ``work`` with ``cfg``'s keys."""
    argv = ["--yaml_path", yaml, "--save_folder_name", name, "--work_dir", str(work)]
    return argv + [x for k, v in cfg.items() for x in (f"--{k}", str(v))]


torch.set_num_threads(min(2, os.cpu_count() or 1))
# the suite never touches the network: tests of the downloads switch them on against a local server
os.environ.setdefault("CIFAR10_DOWNLOAD", "0")
for _name in ("CIFAR100", "SVHN", "GTSRB", "TINYIMAGENET"):  # the other datasets' (tests/test_datasets.py)
    os.environ.setdefault(f"{_name}_DOWNLOAD", "0")
os.environ.setdefault("DDPM_DOWNLOAD", "0")
if CIFAR_ROOT.exists():
    # the CLI tests (and the processes they start) find the data the way a user's run does
    os.environ.setdefault("CIFAR10_ROOT", str(CIFAR_ROOT))


def pytest_addoption(parser: pytest.Parser) -> None:
    # bench/gpu_check.py runs the device-marked tests with --device cuda; everything else ignores it
    parser.addoption(
        "--device", default="cpu", help="torch device for the tests marked `device` (default cpu; e.g. cuda, cuda:1)"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "device: numeric test that runs on the --device given to pytest (select with -m device)"
    )


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        msg = f"{what} not found at {path} (set SHARED_DIR or CIFAR10_ROOT, or place ../shared beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The torch device of ``--device`` (cpu unless asked); a CUDA device the machine lacks skips the test."""
    try:
        dev = torch.device(request.config.getoption("--device"))
    except RuntimeError as e:
        raise pytest.UsageError(f"--device: {e}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"--device {dev} asked, but torch {torch.__version__} sees no CUDA device")
        if (dev.index or 0) >= torch.cuda.device_count():
            pytest.skip(f"--device {dev} asked, but only {torch.cuda.device_count()} CUDA device(s) exist")
        # the device tests compare float32 results at ~1e-5; TF32 (on by default for cuDNN
        # convolutions on Ampere and later) rounds operands to 10 mantissa bits
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return dev


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    return _need(CIFAR_ROOT, "CIFAR-10")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _need(FIXTURES, "reference fixtures")


@pytest.fixture(scope="session")
def cifar_test(cifar_root):
    from utils.data import load_cifar10

    return load_cifar10("test", cifar_root)


@pytest.fixture(scope="session")
def cifar_train(cifar_root):
    from utils.data import load_cifar10

    return load_cifar10("train", cifar_root)


@pytest.fixture(scope="session")
def small_train(cifar_train):
    """400 real training images, 40 per class."""
    from utils.data import class_balanced_subset

    return cifar_train.subset(class_balanced_subset(cifar_train.labels, 400, seed=0))


@pytest.fixture(scope="session")
def small_test(cifar_test):
    """200 real test images, 20 per class."""
    from utils.data import class_balanced_subset

    return cifar_test.subset(class_balanced_subset(cifar_test.labels, 200, seed=0))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small tensors: on a machine whose two cores are
    shared, a second thread makes tiny forwards many times slower (synchronisation, not work).
    Modules take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
