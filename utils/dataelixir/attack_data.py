"""Poisoned CIFAR-10 training and test sets for the nine backdoor attacks.

``build_backdoor_data(attack, params, train, test, device, resource_dir)`` follows
BackdoorBench v1's conventions as DataElixir's fork uses them:

* poisoned-index selection: dirty-label all2one draws ``round(pratio * N)`` training
  samples from the non-target classes (the fork's rule; v1 draws from every class),
  all2all draws from every class, clean-label
  attacks (SIG, LC) draw ``round(pratio * N)`` from the target class (capped at its
  size). The draw uses ``numpy.random.default_rng(random_seed)``, so it is reproducible.
  WaNet and Input-aware take BackdoorBench v1's own per-batch selection instead
  (``selection: per_batch``, see ``triggers.wanet``), and their cross samples count as
  poisoned in ``poison_indicator`` (``cross_poisoned``), as in v1's saved ``bd_train``:
  DataElixir's TPR divides by the poisoned and cross samples, its FPR by the rest.
* labels: all2one relabels a poisoned sample to ``attack_target``; all2all to
  ``(y + 1) % 10``; clean-label attacks keep the true label.
* test sets: ``test_bd`` holds the triggered test images (non-target classes for
  all2one, every class for all2all) labelled with the attack target(s), for the attack
  success rate; ``test_ra`` is the same images with their true labels.

The triggers themselves live in ``utils.dataelixir.triggers.<attack>``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.data import CIFAR10_MEAN, CIFAR10_STD, NUM_CLASSES, ImageSet
from utils.dataelixir.triggers import TRIGGERS, coerce_params, get_trigger
from utils.dataelixir.triggers.base import Trigger, attack_targets
from utils.dataelixir.triggers.wanet import CrossSampleTrigger
from utils.fileio import UserError
from utils.options import NONNEG, Key, Range


@dataclass
class AttackSpec:
    name: str
    clean_label: bool  # only target-class samples are poisoned and labels stay unchanged
    supports_all2all: bool
    keys: dict  # attack-specific config keys (utils.options.Key)
    defaults: dict  # key -> BackdoorBench v1 default
    help: dict  # key -> one-line description


ATTACKS: dict[str, AttackSpec] = {
    name: AttackSpec(
        name=name,
        clean_label=cls.clean_label,
        supports_all2all=cls.supports_all2all,
        keys=dict(cls.keys),
        defaults=dict(cls.defaults),
        help=dict(cls.help),
    )
    for name, cls in TRIGGERS.items()
}

# keys every attack shares (BackdoorBench v1 defaults, DataElixir's seed)
COMMON_KEYS: dict[str, Key] = {
    "attack_target": Key(0, "target class of an all2one attack (0 to the dataset's classes - 1)", range=NONNEG),
    "attack_label_trans": Key(
        "all2one",
        "all2one (every poisoned sample -> attack_target) or all2all (y -> (y+1) % 10)",
        choices=("all2one", "all2all"),
    ),
    "pratio": Key(
        0.1,
        "poisoning ratio in (0, 1]: round(pratio * N) training samples carry the trigger",
        range=Range(0, 1, low_open=True),
    ),
    "random_seed": Key(2022, "seed of the poisoned-index draw and of every random choice of the attack"),
}
COMMON_DEFAULTS: dict[str, Any] = {k: key.default for k, key in COMMON_KEYS.items()}


@dataclass
class BackdoorData:
    train: ImageSet  # poisoned training set, labels as the attacker set them
    original_labels: torch.Tensor  # int64 [N] true labels of the training set
    # bool [N], True where the image carries the trigger (and, for WaNet and Input-aware
    # with cross_poisoned, where it is a cross sample)
    poison_indicator: torch.Tensor
    test_clean: ImageSet  # clean test set (BA)
    test_bd: ImageSet  # triggered test images labelled with the attack target(s) (ASR)
    test_ra: ImageSet  # the same triggered images with their true labels (RA)
    info: dict  # JSON-able description of the attack and its run


def _common(attack: str, params: Mapping[str, Any]) -> tuple[int, str, float, int]:
    p = coerce_params(attack, COMMON_KEYS, params)
    return p["attack_target"], p["attack_label_trans"], p["pratio"], p["random_seed"]


def select_poison_indices(
    labels: torch.Tensor,
    pratio: float,
    target: int,
    label_trans: str,
    clean_label: bool,
    seed: int,
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """Sorted indices of the training samples that get the trigger (DataElixir fork's rule)."""
    y = np.asarray(labels)
    n_want = int(round(pratio * len(y)))
    if clean_label:
        pool = np.flatnonzero(y == target)
        what = f"target class {target}"
    elif label_trans == "all2one":
        pool = np.flatnonzero(y != target)
        what = "the non-target classes"
    else:
        pool = np.arange(len(y))
        what = "all classes"
    if n_want > len(pool):
        log(f"note: round(pratio * N) = {n_want} but {what} hold only {len(pool)} samples; poisoning all {len(pool)}")
        n_want = len(pool)
    if n_want == 0:
        raise UserError(
            f"pratio {pratio} poisons no sample of {what} ({len(y)} training images, {len(pool)} eligible); "
            "raise pratio or use more data"
        )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=n_want, replace=False))


def _poison_indices(
    trigger: Trigger, train: ImageSet, pratio: float, target: int, trans: str, seed: int, log: Callable[[str], None]
) -> np.ndarray:
    """The samples that get the trigger: the attack's own per-batch rule where it has one
    (WaNet, Input-aware), else ``select_poison_indices``."""
    chosen = trigger.batch_selection(len(train)) if isinstance(trigger, CrossSampleTrigger) else None
    if chosen is None:
        return select_poison_indices(train.labels, pratio, target, trans, trigger.clean_label, seed, log)
    if len(chosen[0]) == 0:
        raise UserError(
            f"pratio {pratio} poisons no sample of {len(train)} training images "
            f"(per batch of {trigger.params['selection_batch']}); raise pratio or use more data"
        )
    return chosen[0]


def build_backdoor_data(
    attack: str,
    params: Mapping[str, Any],
    train: ImageSet,
    test: ImageSet,
    device: torch.device,
    resource_dir: Path,
    log: Callable[[str], None] = print,
    precision: str = "fp32",
    num_classes: int = NUM_CLASSES,
    mean: tuple[float, float, float] = CIFAR10_MEAN,
    std: tuple[float, float, float] = CIFAR10_STD,
) -> BackdoorData:
    """Poison ``train`` with ``attack`` and build the clean, backdoor and robust test sets.

    ``params`` holds the common keys (``COMMON_KEYS``) and the attack's own keys
    (``ATTACKS[attack].defaults``); other keys are ignored. Auxiliary models are trained
    or loaded under ``resource_dir/<attack>/``, in ``precision``. ``num_classes``, ``mean``,
    ``std``: the dataset's (the images' size is ``train``'s); the auxiliary classifiers and
    WaNet's and Input-aware's normalised tensors use ``mean``/``std``. Bad values raise
    ``UserError``."""
    cls = get_trigger(attack)
    target, trans, pratio, seed = _common(attack, params)
    if target >= num_classes:
        raise UserError(f"{attack}: attack_target must be a class, 0..{num_classes - 1}, got {target}")
    if trans == "all2all" and not cls.supports_all2all:
        kind = "a clean-label attack (only target-class samples are poisoned)" if cls.clean_label else "all2one only"
        raise UserError(f"{attack} is {kind}; attack_label_trans must be all2one, not all2all")
    size = train.image_size
    geometry = {"num_classes": num_classes, "image_size": size, "mean": mean, "std": std}
    trigger = cls(params, seed=seed, target=target, label_trans=trans, pratio=pratio, **geometry)
    trigger.precision = precision
    timings: dict[str, float] = {}

    t0 = time.time()
    trigger.prepare(train, device, Path(resource_dir), log)
    timings["prepare_s"] = round(time.time() - t0, 3)

    t0 = time.time()
    idx = _poison_indices(trigger, train, pratio, target, trans, seed, log)
    idx_t = torch.from_numpy(idx).long()
    if cls.clean_label:
        new_labels = train.labels[idx_t].clone()
    else:
        new_labels = attack_targets(train.labels[idx_t], target, trans, num_classes)
    images, labels, extra = trigger.poison_train(train, idx_t, new_labels, log)
    poison_indicator = torch.zeros(len(train), dtype=torch.bool)
    poison_indicator[idx_t] = True
    cross_marked = isinstance(trigger, CrossSampleTrigger) and trigger.params["cross_poisoned"]
    if cross_marked:
        poison_indicator[torch.as_tensor(extra["cross_indices"], dtype=torch.long)] = True
    timings["poison_train_s"] = round(time.time() - t0, 3)

    t0 = time.time()
    keep = torch.ones(len(test), dtype=torch.bool) if trans == "all2all" else test.labels != target
    bd_src = test.subset(torch.nonzero(keep).flatten())
    bd_images = trigger.poison_test(bd_src.images, bd_src.labels, log)
    test_bd = ImageSet(bd_images, attack_targets(bd_src.labels, target, trans, num_classes))
    test_ra = ImageSet(bd_images.clone(), bd_src.labels.clone())
    timings["poison_test_s"] = round(time.time() - t0, 3)

    per_class = torch.bincount(train.labels[idx_t], minlength=num_classes).tolist()
    info: dict[str, Any] = {
        "attack": attack,
        "clean_label": cls.clean_label,
        "attack_target": target,
        "attack_label_trans": trans,
        "pratio": pratio,
        "random_seed": seed,
        **trigger.info(),
        "n_train": len(train),
        "n_poisoned": int(len(idx)),
        "n_marked_poisoned": int(poison_indicator.sum()),
        "poisoned_per_class": per_class,
        "n_relabelled": int((labels != train.labels).sum()),
        "n_test_clean": len(test),
        "n_test_bd": len(test_bd),
        **extra,
        "timings": timings,
    }
    log(
        f"{attack}: poisoned {len(idx)}/{len(train)} training images ({trans}, target {target}); "
        f"{len(test_bd)} triggered test images"
    )
    return BackdoorData(
        train=ImageSet(images, labels),
        original_labels=train.labels.clone(),
        poison_indicator=poison_indicator,
        test_clean=test,
        test_bd=test_bd,
        test_ra=test_ra,
        info=info,
    )
