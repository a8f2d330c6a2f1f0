"""Attack, then DataElixir: the flow every ``attack/<name>.py`` script runs.

Phases, each saved under ``record/<save_folder_name>/`` as soon as it finishes so that a
re-run with the same configuration skips it (``phases.json`` lists what is done):

1. ``attack``: poison the (optionally sub-sampled) CIFAR-10 training set.
2. ``backdoor_training``: train the backdoored classifier (BA / ASR / RA every epoch).
3. ``candidates``: DataElixir's candidate sets, labelled by the backdoored model
   (resumable by chunk, memory-mapped uint8 on disk).
4. ``identification``: label transition, target-label detection, sorting, image choice
   for relabelled samples.
5. ``stage1``: a fresh classifier on the non-suspicious purified set.
6. ``stage2``: consensus suspicious samples added, stage-1 model fine-tuned with ``ft_lr``.
7. ``final``: suspicious samples relabelled by the stage-2 model, TPR / FPR, outputs.

This module parses the command line into a ``FlowConfig`` (the keys are
``utils.dataelixir.keys``'), opens the record folder (``utils.dataelixir.record``) and runs
the phases (``utils.dataelixir.phases.run_flow``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from utils.data import ImageSet, class_balanced_subset
from utils.dataelixir.attack_data import ATTACKS
from utils.dataelixir.keys import (
    FlowConfig,
    all_known_keys,
    apply_reference_exact,
    attack_keys,
    flow_precisions,
    validate,
)
from utils.dataelixir.models import build_candidates, load_diffusion
from utils.dataelixir.outputs import load_attack_data
from utils.dataelixir.phases import FlowContext, run_flow
from utils.dataelixir.record import open_record, stored_config
from utils.datasets import load_dataset, locate_dataset
from utils.fileio import UserError, setup_logging
from utils.options import RunArgs, parse_config, resolve_path
from utils.paths import REPO_ROOT, record_dir, work_dir
from utils.precision import keep_stored
from utils.run_state import OutputLock
from utils.runtime import cleanup_distributed, dist_info, init_distributed, resolve_device, seed_everything

# the other torchrun ranks wait at one broadcast while rank 0 runs the attack and trains the
# backdoored model: hours at the paper's scale, beyond torch's default 30-minute timeout
_RANK_WAIT = timedelta(days=7)


class _RankGate:
    """Rank 0 tells the other torchrun ranks, once, what to do at the candidates phase:
    ``build``, ``skip`` (built earlier), or ``error: <message>`` (rank 0 stopped before it)."""

    def __init__(self) -> None:
        self.sent = False

    def send(self, message: str) -> None:
        if self.sent or dist_info()[0] != 0 or not torch.distributed.is_initialized():
            return
        self.sent = True
        torch.distributed.broadcast_object_list([message], src=0)

    def receive(self) -> str:
        box: list[Any] = [None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def run_attack_then_defence(attack: str, argv: list[str]) -> dict[str, Any]:
    """Parse the command line, run the attack, then DataElixir; returns ``metrics.json``'s content.

    Under ``torchrun`` rank 0 runs the whole flow; the other ranks only help build the
    candidates (sharded by chunk, the same bytes as one process) and return ``{}``."""
    gate = _RankGate()
    try:
        with ExitStack() as locks:  # the record folder's lock, released however the run ends
            return _run_flow(attack, argv, locks, gate)
    except Exception as e:
        # the waiting ranks stop with rank 0's one-line error instead of at a timeout
        gate.send(f"error: {e}" if isinstance(e, UserError) else f"error: rank 0 failed ({type(e).__name__}: {e})")
        raise
    finally:
        cleanup_distributed()


def _candidates_rank(
    cfg: FlowConfig, work: Path, rec_dir: Path, device: torch.device, rank: int, world: int, gate: _RankGate
) -> dict[str, Any]:
    """A torchrun rank other than 0: wait for rank 0's word, build this rank's chunks, leave."""
    message = gate.receive()
    if message.startswith("error: "):
        raise UserError(message.removeprefix("error: "))
    if message == "build":
        bd, _ = load_attack_data(rec_dir / "attack_data.pt")

        def log(m: str) -> None:
            print(f"[rank {rank}] {m}", flush=True)

        build_candidates(cfg, work, rec_dir, bd.train.images, device, rank, world, log)
    return {}


def attack_overlays(attack: str, overlay: str) -> list[str]:
    """The common CPU-scale overlay(s) (comma-separated, applied in order), then the attack's
    own ``config/<attack>/cpu.yaml`` where it has one."""
    own = Path("config") / attack / "cpu.yaml"
    common = [o.strip() for o in overlay.split(",") if o.strip()]
    return [*common, *([str(own)] if (REPO_ROOT / own).is_file() else [])]


def attack_argv(attack: str, overlay: str, seed: int, work: Path, name: str) -> list[str]:
    """The options of ``attack/<attack>.py`` at CPU scale (``overlay`` and the attack's own),
    with ``random_seed`` ``seed``, its record ``<work>/record/<name>``."""
    argv = ["--yaml_path", f"config/{attack}/cifar10.yaml"]
    for o in attack_overlays(attack, overlay):
        argv += ["--overlay", o]
    return argv + ["--random_seed", str(seed), "--work_dir", str(work), "--save_folder_name", name]


def resolve_flow_config(attack: str, argv: list[str]) -> tuple[FlowConfig, RunArgs]:
    """The configuration ``attack/<attack>.py argv`` runs with (checked; precisions not yet
    resolved) and its run options."""
    if attack not in ATTACKS:
        raise UserError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    settings, run = parse_config(
        f"attack/{attack}.py",
        argv,
        attack_keys(attack),
        known_elsewhere=all_known_keys(),
        default_yaml=str(REPO_ROOT / "config" / attack / "cifar10.yaml"),
        default_name=attack,
    )
    validate(FlowConfig.from_dict(settings, attack))
    return FlowConfig.from_dict(apply_reference_exact(settings), attack), run


def _run_flow(attack: str, argv: list[str], locks: ExitStack, gate: _RankGate) -> dict[str, Any]:
    cfg, run = resolve_flow_config(attack, argv)
    keys = attack_keys(attack)
    work = work_dir(run.work_dir)
    # everything is checked before the record folder is made, so a refused command leaves nothing behind
    resolve_path(cfg.diffusion_config, "diffusion config")
    rec_dir = record_dir(work, run.save_folder_name)
    if not (rec_dir / "attack_data.pt").is_file():
        locate_dataset(cfg.dataset, None, cfg.data_root())
    device = resolve_device(cfg.device)
    precisions = flow_precisions(cfg, device)
    chosen = {"precisions": {k: p.name for k, p in precisions.items()}}
    if not run.overwrite:  # a resumed record keeps the precisions it was started with (every rank)
        keep_stored(chosen, stored_config(rec_dir), rec_dir, print, ("precisions",))
    cfg = cfg.with_precisions(chosen["precisions"])
    threads = torch.get_num_threads()
    rank, world = init_distributed(device, _RANK_WAIT)
    shard_threads = torch.get_num_threads()
    if rank != 0:
        return _candidates_rank(cfg, work, rec_dir, device, rank, world, gate)
    torch.set_num_threads(threads)  # rank 0 runs the other phases alone, on every core
    stops_early = run.stop_after in ("attack", "backdoor_training")
    if not stops_early and not (rec_dir / "candidates" / "done").is_dir():
        # load the DDPM now (weights-only, strict, finite): a bad file fails before hours of attack and training
        load_diffusion(cfg, work, torch.device("cpu"))
    resolved = cfg.to_dict()
    locks.enter_context(OutputLock(rec_dir))
    rec, resumed = open_record(rec_dir, resolved, run.overwrite, {k: v.default for k, v in keys.items()})
    logger = setup_logging(rec.path("run.log"), name=f"dataelixir.{run.save_folder_name}")
    log = logger.info
    log(f"{'resuming' if resumed else 'starting'} {attack} + DataElixir in {rec.root}")
    log(f"configuration: {run.yaml_path}" + "".join(f" + overlay {o}" for o in run.overlays))
    if run.empty_yaml:
        logger.warning(
            f"{run.yaml_path} sets no key: every key not given on the command line takes its built-in default "
            "(the paper's full scale: all 50,000 images, 100 epochs per training)"
        )
    for o, ks in run.ignored.items():
        log(f"overlay {o}: keys not used by {attack} ignored: {', '.join(ks)}")
    log("resolved configuration: " + json.dumps(resolved))
    for computation, p in precisions.items():
        log(p.line(computation, used=cfg.precision_of(computation)))
    seed_everything(cfg.random_seed)
    torch.backends.cudnn.benchmark = True
    ctx = FlowContext(
        cfg=cfg,
        rec=rec,
        work=work,
        device=device,
        log=log,
        load_data=lambda: _clean_data(cfg, log),
        save_folder_name=run.save_folder_name,
        tell_ranks=gate.send,
        rank=rank,
        world=world,
        threads=threads,
        shard_threads=shard_threads,
    )
    metrics = run_flow(ctx, run.stop_after)
    if metrics is None:
        log(f"stopped after phase {run.stop_after} (--stop_after); re-run without it to go on")
        return {}
    return metrics


def _clean_data(cfg: FlowConfig, log: Callable[[str], None]) -> tuple[ImageSet, ImageSet, torch.Tensor]:
    """The clean training and test sets of the configured dataset (class-balanced subsets
    where asked) and the training set's indices in the whole set."""
    train = load_dataset(cfg.dataset, "train", cfg.data_root())
    test = load_dataset(cfg.dataset, "test", cfg.data_root())
    train_idx = torch.arange(len(train))
    if cfg.subset:
        train_idx = class_balanced_subset(train.labels, cfg.subset, seed=0)
        train = train.subset(train_idx)
    if cfg.test_subset:
        test = test.subset(class_balanced_subset(test.labels, cfg.test_subset, seed=0))
    log(f"data: {len(train)} training / {len(test)} test images")
    return train, test, train_idx
