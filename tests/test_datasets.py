"""The dataset registry (utils/datasets/) without network: for each dataset a tiny archive in
its official format (tests/dataset_archives.py) served from 127.0.0.1 through
``$DATASETS_MIRROR``, downloaded, verified, extracted, read and cached; an image folder of
one's own; then one epoch of train.py on each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_archives import CLASSES, PER_CLASS, MirrorServer, write_archives
from PIL import Image

import train
from utils.data import read_eclipse_pkl
from utils.datasets import DATASETS, dataset_present, dataset_spec, load_dataset, locate_dataset
from utils.fileio import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = ("cifar100", "svhn", "gtsrb", "tinyimagenet")
SIZES = {"cifar100": 32, "svhn": 32, "gtsrb": 32, "tinyimagenet": 64}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """The archives, their MD5s and the server; the datasets' roots (filled by the first test of each)."""
    base = tmp_path_factory.mktemp("datasets")
    md5s = write_archives(base / "mirror")
    server = MirrorServer(base / "mirror")
    yield {"md5s": md5s, "server": server, "roots": base / "roots", "cache": base / "cache"}
    server.close()


@pytest.fixture
def served(mirror, monkeypatch):
    """The registry pointed at the local mirror, downloads on, caches in the module's folder."""
    monkeypatch.setenv("DATASETS_MIRROR", mirror["server"].url)
    for var, md5 in mirror["md5s"].items():
        monkeypatch.setenv(var, md5)
    for spec in DATASETS.values():
        monkeypatch.setenv(f"{spec.env}_DOWNLOAD", "1")
        monkeypatch.delenv(f"{spec.env}_ROOT", raising=False)
    monkeypatch.setenv("CIFAR10_CACHE", str(mirror["cache"]))
    return mirror


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_archive_downloaded_verified_read_and_cached(served, tmp_path, name):
    root = tmp_path / name  # a root of its own: the shared roots may be filled by tests run before
    requests = served["server"].requests
    assert not dataset_present(name, root)
    before = len(requests)
    train_set = load_dataset(name, "train", root)
    test_set = load_dataset(name, "test", root)
    per_train, per_test = PER_CLASS[name]
    size = SIZES[name]
    assert tuple(train_set.images.shape) == (CLASSES[name] * per_train, 3, size, size)
    assert tuple(test_set.images.shape) == (CLASSES[name] * per_test, 3, size, size)
    assert torch.bincount(train_set.labels, minlength=CLASSES[name]).tolist() == [per_train] * CLASSES[name]
    assert sorted(set(test_set.labels.tolist())) == list(range(CLASSES[name]))
    assert len(requests) - before == len(DATASETS[name].files)  # each official file fetched once
    assert dataset_present(name, root)
    assert not [p for p in root.iterdir() if p.suffix in (".zip", ".gz")]  # archives removed once extracted
    # a second read: no request, the cache's arrays, the same bytes
    again = load_dataset(name, "train", root)
    assert len(requests) - before == len(DATASETS[name].files)
    assert torch.equal(again.images, train_set.images) and torch.equal(again.labels, train_set.labels)
    spec = dataset_spec(name, root)
    assert (spec.num_classes, spec.image_size) == (CLASSES[name], size)


def test_svhn_label_10_is_digit_0_and_images_keep_their_pixels(served, tmp_path):
    import scipy.io

    root = served["roots"] / "svhn"
    locate_dataset("svhn", None, root)
    mat = scipy.io.loadmat(root / "train_32x32.mat")
    data = load_dataset("svhn", "train", root)
    assert data.labels.tolist() == [int(v) % 10 for v in mat["y"].ravel()]
    assert torch.equal(data.images[3], torch.from_numpy(mat["X"][:, :, :, 3]).permute(2, 0, 1))


def test_gtsrb_images_are_resized_as_backdoorbench(served):
    root = served["roots"] / "gtsrb"
    locate_dataset("gtsrb", None, root)
    first = sorted((root / "GTSRB" / "Final_Training" / "Images" / "00000").glob("*.ppm"))[0]
    with Image.open(first) as im:
        assert im.size != (32, 32)  # the archive's images are of assorted sizes
        expected = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR))
    data = load_dataset("gtsrb", "train", root)
    assert np.array_equal(data.images[0].permute(1, 2, 0).numpy(), expected)


def test_tinyimagenet_wnids_blank_lines_are_skipped(served, tmp_path):
    from utils.datasets import readers

    src = served["roots"] / "tinyimagenet"
    locate_dataset("tinyimagenet", None, src)
    root = tmp_path / "tiny"
    shutil.copytree(src, root)
    wnids = root / "tiny-imagenet-200" / "wnids.txt"
    ids = wnids.read_text().split()
    wnids.write_text("\n" + "\n".join(ids[:100]) + "\n  \n" + "\n".join(ids[100:]) + "\n\n")
    x, y = readers.tinyimagenet(root, "train", DATASETS["tinyimagenet"]).read()
    assert len(x) == 200 and y.tolist() == list(range(200))


def test_wrong_md5_is_one_line_and_leaves_nothing(served, monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR100_MD5", "0" * 32)
    with pytest.raises(UserError, match="checksum mismatch") as e:
        load_dataset("cifar100", "train", tmp_path / "c100")
    assert "\n" not in str(e.value)
    assert not [p for p in (tmp_path / "c100").rglob("*") if p.is_file()]


def test_missing_dataset_with_downloads_off_says_how(served, monkeypatch, tmp_path):
    monkeypatch.setenv("GTSRB_DOWNLOAD", "0")
    with pytest.raises(UserError, match=r"GTSRB not found at .*GTSRB/Final_Training missing.*GTSRB_ROOT"):
        load_dataset("gtsrb", "train", tmp_path / "none")


def _image_tree(root, classes, size, per=3):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")


def test_image_folder_entry_takes_classes_and_size_from_the_folder(served, tmp_path):
    _image_tree(tmp_path / "mine", ["cat", "dog", "emu"], 64)
    spec = dataset_spec("imagefolder", tmp_path / "mine")
    assert (spec.num_classes, spec.image_size, spec.class_names()) == (3, 64, ["cat", "dog", "emu"])
    data = load_dataset("imagefolder", "test", tmp_path / "mine")
    assert tuple(data.images.shape) == (9, 3, 64, 64) and data.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    with pytest.raises(UserError, match="image folder not found.*train/<class>"):
        dataset_spec("imagefolder", tmp_path / "absent")


def _train_argv(root, work, name, *extra):
    return [
        *("--dataset", name, "--poison", "clean", "--epochs", "1", "--width", "4", "--batch_size", "64"),
        *("--data_root", str(root), "--work_dir", str(work), "--device", "cpu", *extra),
    ]


@pytest.mark.parametrize("name", OFFICIAL)
def test_train_py_one_epoch(served, tmp_path, name):
    """train.py --dataset: the classifier's head has the dataset's classes, the run is named after it."""
    root = served["roots"] / name
    subset = CLASSES[name] * min(PER_CLASS[name][0], 2)
    train.main(_train_argv(root, tmp_path, name, "--subset", str(subset)))
    (run,) = (tmp_path / "runs" / "train").iterdir()
    assert run.name.startswith(f"{name}-clean-")
    result = json.loads((run / "result.json").read_text())
    assert result["settings"]["dataset"] == name and result["n_train"] == subset
    assert result["train_source"] == f"{DATASETS[name].title} train ({subset} images)"
    weights = torch.load(run / "model.pt", weights_only=True)
    assert weights["linear.weight"].shape[0] == CLASSES[name]


def test_train_py_reads_poisoned_data_of_its_dataset(served, tmp_path, capsys):
    """poisoned_data/<dataset>/<POISON>.pkl holds the dataset's images (64x64 for Tiny-ImageNet)."""
    from utils.data import write_eclipse_pkl

    root = served["roots"] / "tinyimagenet"
    data = load_dataset("tinyimagenet", "train", root)
    write_eclipse_pkl(tmp_path / "poisoned_data" / "tinyimagenet" / "X.pkl", data)
    assert torch.equal(read_eclipse_pkl(tmp_path / "poisoned_data/tinyimagenet/X.pkl", 200, 64).images, data.images)
    argv = _train_argv(root, tmp_path, "tinyimagenet")
    train.main([*argv[: argv.index("clean")], "X", *argv[argv.index("clean") + 1 :]])
    # another dataset's reader refuses the 64x64 entries, naming the file and the size it expected
    shutil.copytree(tmp_path / "poisoned_data" / "tinyimagenet", tmp_path / "poisoned_data" / "svhn")
    argv = _train_argv(served["roots"] / "svhn", tmp_path, "svhn")
    with pytest.raises(SystemExit):
        train.main([*argv[: argv.index("clean")], "X", *argv[argv.index("clean") + 1 :]])
    assert "expected 3072 (32x32 RGB)" in capsys.readouterr().err


# --------------------------------------------------------------------------- the attack scripts

# a tiny DataElixir run: a width-4 PreActResNet18 for 1 epoch, a 10-step DDPM of 32 channels
# (random weights), 1 round of noise to step 4 and 2 respaced reverse steps keeping the last
TINY_FLOW = {
    "model_width": 4,
    "epochs": 1,
    "batch_size": 100,
    "train_augment": "none",
    "steps_T": 4,
    "purify_respace": 2,
    "rounds_n": 1,
    "last_steps_m": 1,
    "threshold_tau": 1,
    "purify_batch_size": 1000,
    "pratio": 0.2,
    "device": "cpu",
}


def _tiny_ddpm(folder, size):
    """A random one-level DDPM at ``size`` and its config, written under ``folder``."""
    import yaml

    from utils.diffusion.factory import spec_from_dict

    cfg = {
        "model": {
            "architecture": "ddpm",
            "resolution": size,
            "ch": 32,
            "ch_mult": [1, 1, 1],  # the middle block's attention at a quarter of the side
            "num_res_blocks": 1,
            "attn_resolutions": [],
        },
        "diffusion": {"num_diffusion_timesteps": 10},
    }
    config = folder / f"ddpm{size}.yml"
    config.write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    torch.save(spec_from_dict(cfg, str(config)).build_model().state_dict(), folder / f"ddpm{size}.pt")
    return config, folder / f"ddpm{size}.pt"


def _overlay(folder, name, size, **extra):
    import yaml

    config, ckpt = _tiny_ddpm(folder, size)
    overlay = folder / "tiny.yaml"
    subset = {"tinyimagenet": 100, "cifar100": 100, "gtsrb": 86, "svhn": 100}[name]
    values = {**TINY_FLOW, "diffusion_config": str(config), "diffusion_ckpt": str(ckpt), "subset": subset, **extra}
    overlay.write_text(yaml.safe_dump(values))
    return overlay


def _check_record(rec, name):
    metrics = json.loads((rec / "metrics.json").read_text())
    assert {"attack_metrics", "defended_metrics", "TPR", "FPR"} <= set(metrics), sorted(metrics)
    assert {"BA", "ASR"} <= set(metrics["attack_metrics"]) and {"BA", "ASR"} <= set(metrics["defended_metrics"])
    config = (rec / "config.yaml").read_text()
    assert f"dataset: {name}" in config
    weights = torch.load(rec / "backdoored_model.pt", weights_only=True)
    head = next(v for k, v in weights.items() if k.endswith("linear.weight"))
    assert head.shape[0] == CLASSES[name]  # the classifier's head has the dataset's classes


def test_badnet_script_on_gtsrb_end_to_end(served, tmp_path):
    """``python attack/badnet.py --yaml_path config/badnet/gtsrb.yaml --overlay <tiny>``, the
    archives fetched from the local mirror into a fresh data root."""
    import os
    import subprocess
    import sys

    overlay = _overlay(tmp_path, "gtsrb", 32, dataset_path=str(tmp_path / "data"), test_subset=43)
    argv = ["--yaml_path", "config/badnet/gtsrb.yaml", "--overlay", str(overlay)]
    argv += ["--work_dir", str(tmp_path), "--save_folder_name", "gtsrb"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "attack/badnet.py", *argv], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = tmp_path / "record" / "gtsrb"
    _check_record(rec, "gtsrb")
    assert (tmp_path / "data" / "GTSRB" / "Final_Training" / "Images").is_dir()  # downloaded there


@pytest.mark.parametrize("name", ("cifar100", "svhn", "tinyimagenet"))
def test_badnet_flow_on_dataset(served, tmp_path, name):
    """The attack flow in-process on each other dataset: its classes, its image size (BadNets'
    8x8 patch of config/badnet/tinyimagenet.yaml at 64x64), DataElixir over its classes."""
    from utils.dataelixir.flow import run_attack_then_defence
    from utils.dataelixir.outputs import load_attack_data

    overlay = _overlay(tmp_path, name, SIZES[name], dataset_path=str(served["roots"] / name))
    argv = ["--yaml_path", f"config/badnet/{name}.yaml", "--overlay", str(overlay)]
    run_attack_then_defence("badnet", [*argv, "--work_dir", str(tmp_path), "--save_folder_name", name])
    rec = tmp_path / "record" / name
    _check_record(rec, name)
    bd, _ = load_attack_data(rec / "attack_data.pt")
    patch = 8 if name == "tinyimagenet" else 4
    corner = bd.test_bd.images[:, :, -patch:, -patch:]
    assert (corner[:, 0, :2, :2] == 255).all() and (corner[:, :, -2:, -2:] == 122).all()  # yellow .. grey blocks
    assert tuple(bd.test_bd.images.shape[1:]) == (3, SIZES[name], SIZES[name])


# --------------------------------------------------------------------------- ECLIPSE's chain at 64x64


def test_eclipse_chain_on_tinyimagenet(served, tmp_path, capsys):
    """poison.py -> train_diffusion.py (config/eclipse/cpu_64.yml) -> purification.py ->
    train.py --pure on 64x64 images, every file under the dataset's folders."""
    import poison
    import purification
    import train_diffusion

    root = str(served["roots"] / "tinyimagenet")
    common = ["--dataset", "tinyimagenet", "--work_dir", str(tmp_path), "--device", "cpu"]
    assert poison.main(["--poison", "URP", "--subset", "10", "--data_root", root, "--no_progress", *common]) == 0
    train_diffusion.main(
        ["--config", "config/eclipse/cpu_64.yml", "--num_clean", "8", "--replicas", "1", "--iterations", "1"]
        + ["--batch_size", "4", "--save_interval", "1", "--sparse_set", "tiny", "--data_root", root, *common]
    )
    assert (tmp_path / "diff_ckpt" / "tinyimagenet" / "tiny").is_dir()
    purification.main(
        ["--poison", "URP", "--config", "cpu_64.yml", "--sparse_set", "tiny", "--sparse_diff_model"]
        + ["ema_0.9999_1.pt", "--t", "2", "--batch_size", "10", *common]
    )
    pure = tmp_path / "purified_data" / "tinyimagenet" / "tiny" / "2" / "1" / "URP-pure.pkl"
    assert tuple(read_eclipse_pkl(pure, 200, 64).images.shape) == (10, 3, 64, 64)
    argv = _train_argv(root, tmp_path, "tinyimagenet", "--pure", "--t", "2", "--iter", "1", "--sparse_set", "tiny")
    argv[argv.index("clean")] = "URP"
    train.main([*argv, "--test_subset", "20"])
    assert (tmp_path / "runs" / "train" / "tinyimagenet-URP-pure-resnet18-w4-s0" / "result.json").is_file()
    # a 32x32 model does not purify 64x64 images
    capsys.readouterr()
    with pytest.raises(SystemExit):
        purification.main(["--poison", "URP", "--config", "cpu.yml", "--sparse_set", "tiny", *common])
    assert "the model takes 32x32 images, Tiny-ImageNet has 64x64 ones" in capsys.readouterr().err


def test_train_py_on_an_image_folder(tmp_path):
    _image_tree(tmp_path / "mine", ["a", "b"], 32, per=10)
    train.main(_train_argv(tmp_path / "mine", tmp_path, "imagefolder"))
    (run,) = (tmp_path / "runs" / "train").iterdir()
    assert json.loads((run / "result.json").read_text())["n_train"] == 20


def test_image_folder_runs_record_their_folder(tmp_path, capsys):
    """Another image folder with the same flags is another run: train.py's finished run, a
    poisoned set of poisoned_data/imagefolder/ and a diffusion run's folder refuse it."""
    import poison
    import train_diffusion

    _image_tree(tmp_path / "a", ["x", "y"], 32, per=5)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "train" / "x" / "0.png").unlink()
    train.main(_train_argv(tmp_path / "a", tmp_path, "imagefolder"))
    (run,) = (tmp_path / "runs" / "train").iterdir()
    settings = json.loads((run / "result.json").read_text())["settings"]
    assert settings["data_root"] == str((tmp_path / "a").resolve()) and len(settings["data_listing"]) == 16
    capsys.readouterr()
    train.main(_train_argv(tmp_path / "a", tmp_path, "imagefolder"))  # the same folder: finished
    assert "is finished" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.main(_train_argv(tmp_path / "b", tmp_path, "imagefolder"))
    assert "other settings (data_listing:" in capsys.readouterr().err
    # a poison crafted from folder a does not train folder b's victim
    common = ["--dataset", "imagefolder", "--work_dir", str(tmp_path), "--device", "cpu", "--no_progress"]
    assert poison.main(["--poison", "URP", "--data_root", str(tmp_path / "a"), *common]) == 0
    crafted = json.loads((tmp_path / "poisoned_data" / "imagefolder" / "URP.json").read_text())
    assert crafted["data_root"] == settings["data_root"]
    argv = _train_argv(tmp_path / "b", tmp_path, "imagefolder")
    with pytest.raises(SystemExit):
        train.main([*argv[: argv.index("clean")], "URP", *argv[argv.index("clean") + 1 :]])
    assert f"URP.pkl was crafted from the image folder {settings['data_root']}, not" in capsys.readouterr().err
    # a diffusion run's folder (its sparse set) is another folder's only under another --sparse_set
    diff = ["--config", "config/eclipse/cpu.yml", "--num_clean", "4", "--replicas", "1", "--iterations", "1"]
    diff += ["--batch_size", "4", "--save_interval", "1", "--sparse_set", "tiny", *common[:-1]]
    train_diffusion.main([*diff, "--data_root", str(tmp_path / "a")])
    with pytest.raises(SystemExit):
        train_diffusion.main([*diff, "--data_root", str(tmp_path / "b")])
    assert "other settings (sparse_set.data_listing:" in capsys.readouterr().err
