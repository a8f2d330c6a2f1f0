"""The dataset registry (``registry.DATASETS``: CIFAR-10, CIFAR-100, SVHN, GTSRB,
Tiny-ImageNet and an image folder of one's own), the readers of their official formats
and the one way to load any of them (``load``)."""

from utils.datasets.load import (
    data_source,
    dataset_present,
    dataset_spec,
    load_dataset,
    load_poisoned,
    locate_dataset,
    read_dataset_pkl,
    resolve_root,
)
from utils.datasets.registry import (
    DATASET_KEY,
    DATASETS,
    check_image_size,
    describe,
    diffusion_config_name,
    get_dataset,
)
from utils.datasets.spec import DatasetSpec

__all__ = [
    "DATASETS",
    "DATASET_KEY",
    "DatasetSpec",
    "check_image_size",
    "data_source",
    "dataset_present",
    "dataset_spec",
    "describe",
    "diffusion_config_name",
    "get_dataset",
    "load_dataset",
    "load_poisoned",
    "locate_dataset",
    "read_dataset_pkl",
    "resolve_root",
]
