"""The datasets every script can take (``--dataset``, the attack YAMLs' ``dataset`` key): one
entry each, with its classes, image size, normalisation, official files and reader.

The official files are the ones torchvision (CIFAR-100, SVHN, GTSRB's test set, Tiny-ImageNet's
usual archive) and BackdoorBench (GTSRB's Final Training set) read, URLs and MD5s as published. Each file is fetched,
verified and extracted by ``utils.download`` into the dataset's root (``--data_root``, else
``$<ENV>_ROOT``, else ``data/<name>``), exactly as CIFAR-10 is; ``$DATASETS_MIRROR`` serves
every file from another place (a local copy, the tests' server) under its official name.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from utils.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, NUM_CLASSES
from utils.datasets import readers
from utils.datasets.spec import DataFile, DatasetSpec
from utils.download import CIFAR10, CIFAR10_FOLDER, Remote
from utils.fileio import UserError
from utils.options import Key


def _remote(title: str, url: str, md5: str, env: str, root_env: str, how: str = "extract it into {dest}") -> Remote:
    return Remote(
        title,
        url,
        md5,
        env,
        f"download {url} by hand and {how}, or point --data_root / ${root_env}_ROOT at a copy",
        True,
    )


_GTSRB_BASE = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
_SVHN_BASE = "http://ufldl.stanford.edu/housenumbers/"
# the training-set statistics most SVHN code normalises with (BackdoorBench has no SVHN entry)
_SVHN_MEAN, _SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)

DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "cifar10",
        "CIFAR-10",
        NUM_CLASSES,
        32,
        CIFAR10_MEAN,
        CIFAR10_STD,
        "CIFAR10",
        (DataFile(CIFAR10, CIFAR10_FOLDER),),
        None,
        CIFAR10_CLASSES,
        "torchvision's CIFAR10; BackdoorBench's normalisation",
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        "CIFAR-100",
        100,
        32,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "CIFAR100",
        (
            DataFile(
                _remote(
                    "CIFAR-100",
                    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                    "eb9058c3a382ffc7106e4002c42a8d85",
                    "CIFAR100",
                    "CIFAR100",
                ),
                "cifar-100-python",
            ),
        ),
        readers.cifar100,
        source="torchvision's CIFAR100 (the fine labels); BackdoorBench's normalisation",
    ),
    "svhn": DatasetSpec(
        "svhn",
        "SVHN",
        10,
        32,
        _SVHN_MEAN,
        _SVHN_STD,
        "SVHN",
        tuple(
            DataFile(
                _remote(
                    f"SVHN {split}",
                    f"{_SVHN_BASE}{split}_32x32.mat",
                    md5,
                    f"SVHN_{split.upper()}",
                    "SVHN",
                    "put it in {dest}",
                ),
                f"{split}_32x32.mat",
                (split,),
                extract=False,
            )
            for split, md5 in (
                ("train", "e26dedcc434d2e4c54c9b2d4a06d8373"),
                ("test", "eb5a983be6a315427106f1b164d9cef3"),
            )
        ),
        readers.svhn,
        tuple(str(d) for d in range(10)),
        "torchvision's SVHN (train and test .mat files, label 10 read as digit 0)",
    ),
    "gtsrb": DatasetSpec(
        "gtsrb",
        "GTSRB",
        43,
        32,
        (0.0, 0.0, 0.0),  # BackdoorBench does not normalise GTSRB
        (1.0, 1.0, 1.0),
        "GTSRB",
        (
            DataFile(
                _remote(
                    "GTSRB training set",
                    f"{_GTSRB_BASE}GTSRB_Final_Training_Images.zip",
                    "f33fd80ac59bff73c82d25ab499e03a3",
                    "GTSRB_TRAIN",
                    "GTSRB",
                ),
                "GTSRB/Final_Training",
                ("train",),
            ),
            DataFile(
                _remote(
                    "GTSRB test images",
                    f"{_GTSRB_BASE}GTSRB_Final_Test_Images.zip",
                    "c7e4e6327067d32654124b0fe9e82185",
                    "GTSRB_TEST",
                    "GTSRB",
                ),
                "GTSRB/Final_Test",
                ("test",),
            ),
            DataFile(
                _remote(
                    "GTSRB test labels",
                    f"{_GTSRB_BASE}GTSRB_Final_Test_GT.zip",
                    "fe31e9c9270bbcd7b84b7f21a9d9d9e5",
                    "GTSRB_TEST_GT",
                    "GTSRB",
                ),
                "GT-final_test.csv",
                ("test",),
            ),
        ),
        readers.gtsrb,
        tuple(f"{c:05d}" for c in range(43)),
        "the GTSRB archives BackdoorBench's download script fetches (the Final Training set's 39,209 images, not "
        "torchvision's smaller GTSRB-Training_fixed.zip), each image resized to 32x32 (bilinear) as its Resize((32, 32))",
    ),
    "tinyimagenet": DatasetSpec(
        "tinyimagenet",
        "Tiny-ImageNet",
        200,
        64,
        (0.4802, 0.4481, 0.3975),
        (0.2302, 0.2265, 0.2262),
        "TINYIMAGENET",
        (
            DataFile(
                _remote(
                    "Tiny-ImageNet",
                    "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                    "90528d7ca1a48142e341f4ef8d21d0de",
                    "TINYIMAGENET",
                    "TINYIMAGENET",
                ),
                "tiny-imagenet-200",
            ),
        ),
        readers.tinyimagenet,
        source="the cs231n archive; classes in wnids.txt order, the val split as the test set (BackdoorBench's Tiny)",
    ),
    "imagefolder": DatasetSpec(
        "imagefolder",
        "image folder",
        0,
        0,
        (0.5, 0.5, 0.5),  # no statistics known in advance: [0, 1] mapped to [-1, 1]
        (0.5, 0.5, 0.5),
        "IMAGEFOLDER",
        (),
        readers.imagefolder,
        source="your own data: <root>/train|test/<class>/*.png|jpg, square images of one size, classes sorted by name",
    ),
}

DATASET_KEY = Key(
    "cifar10",
    "dataset: " + ", ".join(DATASETS) + " (imagefolder: your own <data_root>/train|test/<class>/*.png|jpg)",
    choices=tuple(DATASETS),
)


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def describe(spec: DatasetSpec, root: Path) -> DatasetSpec:
    """``spec`` with its class count, class names and image size filled in (the image-folder
    entry's are read off ``root``; the others' are fixed)."""
    if spec.num_classes:
        return spec
    classes, size = readers.imagefolder_layout(root)
    return replace(spec, num_classes=len(classes), image_size=size, classes=tuple(classes))


# the configs an image folder of one size uses: the named dataset of that size's
_CONFIG_OF_SIZE = {32: "cifar10", 64: "tinyimagenet"}


def diffusion_config_name(spec: DatasetSpec, kind: str, flag: str = "--config") -> str:
    """The file name of the dataset's diffusion config in ``config/<kind>/`` (``eclipse`` for
    ECLIPSE's UNet, ``ddpm`` for DataElixir's DDPM): its own, or for an image folder the one of
    its image size (32: cifar10.yml, 64: tinyimagenet.yml); ``flag`` is the option that names one."""
    if spec.name != "imagefolder":
        return f"{spec.name}.yml"
    if spec.image_size not in _CONFIG_OF_SIZE:
        raise UserError(
            f"no diffusion config in config/{kind}/ for {spec.image_size}x{spec.image_size} images (there are "
            f"32x32 and 64x64 ones); pass one with {flag}"
        )
    return f"{_CONFIG_OF_SIZE[spec.image_size]}.yml"


def check_image_size(model_size: int, spec: DatasetSpec, config: object, kind: str) -> None:
    """A diffusion model of ``model_size`` (its config ``config`` of ``config/<kind>/``) fits
    ``spec``'s images, or a one-line error naming the config that does."""
    if model_size != spec.image_size:
        raise UserError(
            f"{config}: the model takes {model_size}x{model_size} images, {spec.title} has "
            f"{spec.image_size}x{spec.image_size} ones; use config/{kind}/{diffusion_config_name(spec, kind)}"
        )
