"""Dataset sanitisation against backdoors, the baselines DataElixir is compared with: Spectral
Signatures (Tran et al., NeurIPS 2018) and Activation Clustering (Chen et al., 2018).

Both look at the backdoored model's penultimate features (the pooled output of its last
block, ``model.features``) of the poisoned training set, class by class (the defender knows
neither the target nor which samples are poisoned), flag samples, and the model is retrained
on the rest by the attack flow's own training (``utils.dataelixir.models``, the one loop).

* Spectral Signatures: per class, the features centred on the class mean; the score of a
  sample is its squared projection on the top right singular vector; the ``1.5·ε·n`` highest
  scores of the class's ``n`` samples are removed, ε an upper bound on the poisoned share
  (the paper's rule; ε defaults to BackdoorBench's poisoning rate 0.1). BackdoorBench's own
  script looks at the target class only, projects uncentred layer-4 maps and removes
  its top 15 %: it knows the target, which a defender does not.
* Activation Clustering: per class, the features reduced to 10 dimensions (PCA, as
  BackdoorBench's script; Chen et al. use ICA) and split by 2-means (k-means++, 10 starts,
  the lowest inertia kept, as scikit-learn's KMeans); a cluster is poisoned when it holds
  less than 35 % of the class (Chen et al.'s relative size with ART's default threshold and
  ART's strict ``<``), or with ``analysis="smaller"`` the smaller cluster of every class
  (BackdoorBench's config). Chen et al.'s other analysis, the silhouette score, is not
  implemented.

Both loop over the record's dataset classes (``cfg.data_spec().num_classes``), not CIFAR-10's
ten: a class past the tenth would otherwise never be looked at.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from utils.data import ImageSet
from utils.dataelixir.keys import FlowConfig
from utils.dataelixir.models import build_model, load_model, train_augment, train_config
from utils.dataelixir.outputs import last_metrics, load_attack_data
from utils.fileio import read_state_json
from utils.runtime import seed_everything
from utils.trainer import predict, train_classifier

METHODS = ("ss", "ac")
AC_ANALYSES = ("relative_size", "smaller")


# --------------------------------------------------------------------------- Spectral Signatures


def spectral_scores(features: torch.Tensor) -> torch.Tensor:
    """Tran et al.'s outlier score of each row: its squared projection, after centring, on the
    top right singular vector of the centred matrix (float64)."""
    centred = features.double() - features.double().mean(0, keepdim=True)
    if len(features) < 2:
        return torch.zeros(len(features), dtype=torch.float64)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]) ** 2


def spectral_signatures(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, eps: float = 0.1, multiplier: float = 1.5
) -> torch.Tensor:
    """The samples Spectral Signatures removes: per class, the ``int(multiplier·eps·n)`` highest scores."""
    flagged = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(num_classes):
        rows = torch.nonzero(labels == c).flatten()
        k = min(int(multiplier * eps * len(rows)), len(rows))
        if k > 0:
            flagged[rows[spectral_scores(features[rows]).topk(k).indices]] = True
    return flagged


# --------------------------------------------------------------------------- Activation Clustering


def pca_reduce(features: torch.Tensor, dims: int) -> torch.Tensor:
    """The rows' coordinates on the ``dims`` leading principal axes (float64), each axis's sign
    fixed so that its largest-magnitude loading is positive (as scikit-learn's ``svd_flip``)."""
    centred = features.double() - features.double().mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    axes = vh[: min(dims, vh.shape[0])]
    sign = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    return centred @ (axes * sign).T


def two_means(
    x: torch.Tensor, g: torch.Generator, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4
) -> tuple[torch.Tensor, float]:
    """2-means of the rows of ``x``: ``n_init`` k-means++ starts run together (Lloyd steps until
    the centres move less than ``tol`` × the mean per-dimension variance, as scikit-learn's
    tolerance), the assignment of the lowest inertia and that inertia."""
    x = x.double()
    n = len(x)
    if n < 2:
        return torch.zeros(n, dtype=torch.long), 0.0
    first = torch.randint(0, n, (n_init,), generator=g)
    d2 = ((x[None] - x[first][:, None]) ** 2).sum(-1)  # [n_init, n]
    second = torch.multinomial(d2 + 1e-300, 1, generator=g).squeeze(1)  # ∝ squared distance (k-means++)
    centres = torch.stack([x[first], x[second]], 1)  # [n_init, 2, d]
    threshold = tol * float(x.var(0, unbiased=False).mean())
    for _ in range(max_iter):
        assign = torch.cdist(x[None].expand(n_init, -1, -1), centres).argmin(-1)  # [n_init, n]
        onehot = torch.nn.functional.one_hot(assign, 2).double()  # [n_init, n, 2]
        counts = onehot.sum(1)  # [n_init, 2]
        sums = onehot.transpose(1, 2) @ x  # [n_init, 2, d]
        new = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centres)
        shift = ((new - centres) ** 2).sum((1, 2))
        centres = new
        if bool((shift <= threshold).all()):
            break
    dist = torch.cdist(x[None].expand(n_init, -1, -1), centres)
    assign = dist.argmin(-1)
    inertia = (dist.min(-1).values ** 2).sum(1)
    best = int(inertia.argmin())
    return assign[best], float(inertia[best])


def activation_clustering(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    dims: int = 10,
    analysis: str = "relative_size",
    size_threshold: float = 0.35,
    seed: int = 0,
) -> torch.Tensor:
    """The samples Activation Clustering flags: per class, 2-means of the PCA-reduced features,
    then the cluster(s) ``analysis`` calls poisoned."""
    if analysis not in AC_ANALYSES:
        raise ValueError(f"analysis must be one of {', '.join(AC_ANALYSES)}, got {analysis!r}")
    g = torch.Generator().manual_seed(seed)
    flagged = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(num_classes):
        rows = torch.nonzero(labels == c).flatten()
        if len(rows) < 2:
            continue
        assign, _ = two_means(pca_reduce(features[rows], dims), g)
        sizes = torch.bincount(assign, minlength=2)
        if analysis == "smaller":
            poisoned = [int(sizes.argmin())]
        else:
            # strict, as ART's ``relative_size`` analysis (``< size_threshold``)
            poisoned = [k for k in range(2) if sizes[k] / len(rows) < size_threshold]
        for k in poisoned:
            flagged[rows[assign == k]] = True
    return flagged


# --------------------------------------------------------------------------- on an attack record


@dataclass(frozen=True)
class RemovalRates:
    """How the removal split the training set: TPR = removed poisoned / poisoned, FPR = removed
    clean / clean (None where there is no such sample)."""

    removed: int
    poisoned: int
    removed_poisoned: int
    tpr: float | None
    fpr: float | None


def removal_rates(flagged: torch.Tensor, poison_indicator: torch.Tensor) -> RemovalRates:
    pi = poison_indicator.bool()
    hit, n_p, n_c = int((flagged & pi).sum()), int(pi.sum()), int((~pi).sum())
    return RemovalRates(
        removed=int(flagged.sum()),
        poisoned=n_p,
        removed_poisoned=hit,
        tpr=hit / n_p if n_p else None,
        fpr=int((flagged & ~pi).sum()) / n_c if n_c else None,
    )


def flag_samples(
    method: str, features: torch.Tensor, labels: torch.Tensor, num_classes: int, options: dict
) -> torch.Tensor:
    """``method``'s flags (``ss``: options ``eps``, ``multiplier``; ``ac``: ``dims``, ``analysis``,
    ``size_threshold``, ``seed``)."""
    if method == "ss":
        return spectral_signatures(features, labels, num_classes, options["eps"], options["multiplier"])
    if method == "ac":
        keys = ("dims", "analysis", "size_threshold", "seed")
        return activation_clustering(features, labels, num_classes, **{k: options[k] for k in keys})
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def sanitise_record(
    record: Path,
    cfg: FlowConfig,
    method: str,
    options: dict[str, Any],
    device: torch.device,
    checkpoint: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``method`` on the attack record ``record`` (its backdoored model and poisoned training
    set; ``cfg`` its configuration, epochs possibly replaced): the flagged samples removed, a
    fresh model trained on the rest as the flow trains its models, and the report (BA / ASR /
    RA before and after, the removal's TPR / FPR, the flagged indices, the history)."""
    t0 = time.time()
    bd, _ = load_attack_data(record / "attack_data.pt")
    model = load_model(cfg, record / "backdoored_model.pt", device)
    bf16 = cfg.precision_of("candidate_labels") == "bf16"
    features = predict(model, bd.train.images, device, bf16=bf16, features=True).double()
    num_classes = cfg.data_spec().num_classes  # the record's dataset, which need not be CIFAR-10
    flagged = flag_samples(method, features, bd.train.labels, num_classes, options)
    rates = removal_rates(flagged, bd.poison_indicator)
    log(f"{method}: removed {rates.removed} of {len(flagged)} ({rates.removed_poisoned} of {rates.poisoned} poisoned)")
    keep = torch.nonzero(~flagged).flatten()
    kept = ImageSet(bd.train.images[keep], bd.train.labels[keep])
    seed_everything(cfg.phase_seed(f"sanitise/{method}"))  # the fresh model's initialisation
    fresh = build_model(cfg)
    history = train_classifier(
        fresh,
        kept,
        train_augment(cfg),
        train_config(cfg, cfg.lr, len(kept), seed_offset=1),  # as DataElixir's stage 1: a fresh model on what is kept
        device,
        tests={"BA": bd.test_clean, "ASR": bd.test_bd, "RA": bd.test_ra},
        checkpoint=checkpoint,
        log=log,
        desc=f"{method} retraining",
    )
    return {
        "before": _record_metrics(record),
        "after": last_metrics(history),
        "removal": asdict(rates),
        "removed_per_class": torch.bincount(bd.train.labels[flagged], minlength=num_classes).tolist(),
        "n_train": len(flagged),
        "n_train_after": len(kept),
        "flagged": torch.nonzero(flagged).flatten().tolist(),
        "history": history,
        "model": fresh,
        "seconds": time.time() - t0,
    }


def _record_metrics(record: Path) -> dict[str, float | None]:
    """BA / ASR / RA of the record's backdoored model (its last evaluated epoch)."""
    path = record / "backdoored_history.json"
    history = read_state_json(path, f"re-run the attack with --stop_after backdoor_training to write {path}")
    return last_metrics(history if isinstance(history, list) else [])
