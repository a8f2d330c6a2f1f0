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

A record folder written with a different resolved configuration is refused unless
``--overwrite`` is given (which deletes it first); runs are never mixed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.backdoor import ATTACKS, BackdoorData, build_backdoor_data
from utils.backdoor_keys import all_known_keys, attack_keys, validate
from utils.data import NUM_CLASSES, ImageSet, class_balanced_subset, load_cifar10, locate_cifar10
from utils.fileio import (
    UserError,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_finite,
    read_state_json,
    read_text_file,
    safe_torch_load,
    setup_logging,
)
from utils.paths import REPO_ROOT, record_dir, resource_dir, work_dir
from utils.run_state import OutputLock, same_settings_or_refuse
from utils.runtime import dist_info
from utils.yaml_config import dump_yaml, parse_config, resolve_path

# --------------------------------------------------------------------------- record folder

# how to go on from a damaged state file of a record folder
_DAMAGED_HOW = "re-run with --overwrite to start {rec} afresh, or use another --save_folder_name"
PHASES = ("attack", "backdoor_training", "candidates", "identification", "stage1", "stage2", "final")
# settings that do not change results: a resumed run may use another value
_RUN_ONLY = {"device", "frequency_save"}


class Record:
    """``record/<name>/`` with its phase book-keeping."""

    def __init__(self, root: Path):
        self.root = root
        self.phases_file = root / "phases.json"
        self.phases: dict[str, dict] = (
            read_state_json(self.phases_file, _DAMAGED_HOW.format(rec=root)) if self.phases_file.is_file() else {}
        )

    def done(self, phase: str) -> bool:
        return bool(self.phases.get(phase, {}).get("done"))

    def mark(self, phase: str, seconds: float, **extra: Any) -> None:
        self.phases[phase] = {"done": True, "seconds": round(seconds, 3), **extra}
        atomic_write_json(self.phases_file, self.phases)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)


def open_record(
    rec: Path, resolved: dict[str, Any], overwrite: bool, defaults: dict[str, Any] | None = None
) -> tuple[Record, bool]:
    """Create or reopen ``rec``; returns the record and whether it resumes an earlier run.

    A key missing from the stored configuration matches its value in ``defaults``: records
    written before a key was added still resume when the new key keeps its default."""
    cfg_file = rec / "config.yaml"
    if rec.exists() and any(rec.iterdir()):
        if overwrite:
            if not cfg_file.is_file() and not (rec / "phases.json").is_file():
                raise UserError(f"{rec} exists and was not written by an attack script; refusing to delete it")
            shutil.rmtree(rec)
        elif not cfg_file.is_file():
            raise UserError(f"{rec} exists but holds no config.yaml; choose another --save_folder_name")
        else:
            import yaml

            try:
                stored = yaml.safe_load(read_text_file(cfg_file, "record configuration"))
            except yaml.YAMLError:
                stored = None
            if not isinstance(stored, dict) or "attack" not in stored:
                raise UserError(f"{cfg_file} is damaged; " + _DAMAGED_HOW.format(rec=rec))
            old = {**(defaults or {}), **stored}
            hint = "use another --save_folder_name or pass --overwrite to replace it"
            same_settings_or_refuse(rec, old, resolved, hint=hint, ignore=tuple(_RUN_ONLY))
            return Record(rec), True
    rec.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_file, dump_yaml(resolved))
    return Record(rec), False


# --------------------------------------------------------------------------- helpers


def _history_csv(path: Path, history: list[dict]) -> None:
    cols: list[str] = []
    for h in history:
        cols += [k for k in h if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for h in history:
        w.writerow(h)
    atomic_write_text(path, buf.getvalue())


def _save_curves(rec: Record, name: str, history: list[dict], title: str) -> None:
    from utils.plots import history_series, save_curves

    _history_csv(rec.path(f"{name}_curves.csv"), history)
    save_curves(rec.path(f"{name}_curves.png"), history_series(history, ["BA", "ASR", "RA"]), title=title)


def _last(history: list[dict]) -> dict[str, float]:
    for h in reversed(history):
        if "BA" in h:
            return {k: h.get(k) for k in ("BA", "ASR", "RA")}
    return {"BA": None, "ASR": None, "RA": None}


def _finite(x: Any) -> Any:
    """JSON-safe numbers: inf / nan become strings."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return _finite(x.tolist())
    if isinstance(x, float | np.floating) and not math.isfinite(float(x)):
        return str(float(x))
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def _build_model(cfg: dict[str, Any]) -> torch.nn.Module:
    from models import build_classifier
    from utils.trainer import Normalized

    net = build_classifier(cfg["model"], NUM_CLASSES, cfg["model_width"])
    if not hasattr(net, "features"):
        raise UserError(f"model {cfg['model']} has no pooled-feature output, which DataElixir's image selection needs")
    return Normalized(net)


def train_augment(cfg: dict[str, Any]):
    """The training augmentation the keys ``train_augment`` etc. select."""
    from utils.augment import crop_rotate_flip, no_augment, standard_augment

    if cfg["train_augment"] == "crop_flip":
        return standard_augment
    if cfg["train_augment"] == "crop_rotate_flip":
        return crop_rotate_flip(
            cfg["random_crop"], cfg["random_rotation"], cfg["crop_prob"], cfg["rotation_prob"], cfg["rotation_interp"]
        )
    return no_augment


def _train_config(cfg: dict[str, Any], lr: float, n_train: int, seed_offset: int):
    from utils.trainer import TrainConfig

    multistep = cfg["lr_scheduler"] == "MultiStepLR"
    return TrainConfig(
        epochs=cfg["epochs"],
        batch_size=min(cfg["batch_size"], max(1, n_train)),
        lr=lr,
        momentum=cfg["sgd_momentum"],
        weight_decay=cfg["wd"],
        schedule="multistep" if multistep else "cosine",
        milestones=tuple(cfg["steplr_milestones"]) if multistep else (),
        gamma=cfg["steplr_gamma"] if multistep else 0.1,
        test_every=1,
        bf16=cfg["amp"],
        channels_last=True,
        seed=cfg["random_seed"] + seed_offset,
    )


def _load_model(cfg: dict[str, Any], path: Path, device: torch.device) -> torch.nn.Module:
    model = _build_model(cfg)
    state = safe_torch_load(path, "classifier")
    check_finite(state, path)
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.no_grad()
def predict_candidates(
    model: torch.nn.Module,
    cand: np.ndarray,
    rows: np.ndarray,
    device: torch.device,
    bf16: bool,
    desc: str,
    samples_per_batch: int = 256,
) -> torch.Tensor:
    """Labels ``[len(rows), K]`` of every candidate of the listed samples."""
    from utils.progress import progress
    from utils.trainer import predict

    k = cand.shape[1]
    out = torch.empty(len(rows), k, dtype=torch.long)
    for s in progress(range(0, len(rows), samples_per_batch), desc=desc, unit="batch", dynamic_ncols=True):
        idx = rows[s : s + samples_per_batch]
        imgs = torch.from_numpy(np.ascontiguousarray(cand[idx]))
        flat = imgs.reshape(-1, *imgs.shape[2:])
        out[s : s + len(idx)] = predict(model, flat, device, batch_size=512, bf16=bf16).argmax(1).view(len(idx), k)
    return out


def _diffusion_ckpt(cfg: dict[str, Any], work: Path) -> tuple[Path, str]:
    """The DDPM checkpoint path and the hint that says how to make it; raises if it is missing."""
    from utils.checkpoints import resolve_checkpoint
    from utils.diffusion_setup import diffusion_train_command
    from utils.download import DDPM_CHECKPOINTS, ddpm_checkpoint

    if cfg["diffusion_ckpt"] in DDPM_CHECKPOINTS:
        hint = f"Ho et al.'s DDPM {cfg['diffusion_ckpt']!r} goes with diffusion_config config/ddpm/cifar10.yml"
        return ddpm_checkpoint(cfg["diffusion_ckpt"]), hint
    ckpt = Path(cfg["diffusion_ckpt"]).expanduser()
    if not ckpt.is_absolute():
        ckpt = work / ckpt
    ckpt = resolve_checkpoint(ckpt)  # either spelling of a train_diffusion.py name
    hint = (
        f"make one with `{diffusion_train_command(cfg['diffusion_config'], ckpt.parent.name, ckpt.name)}`"
        " (a DDPM trained on the clean CIFAR-10 training set), or point diffusion_ckpt at Ho's converted"
        " model-790000.ckpt with diffusion_config config/ddpm/cifar10.yml"
    )
    if not ckpt.is_file():
        raise UserError(f"diffusion checkpoint not found: {ckpt}; {hint}")
    return ckpt, hint


def _diffusion(cfg: dict[str, Any], work: Path, device: torch.device):
    from utils.diffusion_setup import load_diffusion_model, load_diffusion_spec

    spec = load_diffusion_spec(resolve_path(cfg["diffusion_config"], "diffusion config"))
    ckpt, hint = _diffusion_ckpt(cfg, work)
    model = load_diffusion_model(spec, ckpt, device, hint=hint)
    base = spec.build_diffusion(respacing="")
    total = base.num_timesteps
    if cfg["steps_T"] + cfg["noise_offset"] > total:
        raise UserError(
            f"steps_T + noise_offset = {cfg['steps_T'] + cfg['noise_offset']} exceeds the {total} diffusion steps"
        )
    return model, base, spec


def _train_phase(
    rec: Record,
    cfg: dict[str, Any],
    device: torch.device,
    phase: str,
    name: str,
    data: ImageSet,
    lr: float,
    seed_offset: int,
    tests: dict[str, ImageSet],
    log: Any,
    title: str,
    init: torch.nn.Module | None = None,
) -> tuple[torch.nn.Module, list[dict]]:
    """One of the three classifier trainings (fresh, or fine-tuned from ``init``): resumable
    per epoch, skipped when done; writes ``<name>_model.pt``, ``_history.json|csv`` and curves."""
    from utils.trainer import train_classifier

    augment = train_augment(cfg)
    model_file, hist_file = rec.path(f"{name}_model.pt"), rec.path(f"{name}_history.json")
    if rec.done(phase) and model_file.is_file() and hist_file.is_file():
        log(f"phase {phase}: done earlier")
        return _load_model(cfg, model_file, device), read_state_json(hist_file, _DAMAGED_HOW.format(rec=rec.root))
    t0 = time.time()
    model = _build_model(cfg)
    if init is not None:
        model.load_state_dict(init.state_dict())
    history = train_classifier(
        model,
        data,
        augment,
        _train_config(cfg, lr, len(data), seed_offset),
        device,
        tests=tests,
        checkpoint=rec.path("ckpt", f"{name}.ckpt"),
        log=log,
        desc=name,
    )
    atomic_torch_save(model.state_dict(), model_file)
    atomic_write_json(hist_file, history)
    _save_curves(rec, name, history, title)
    rec.mark(phase, time.time() - t0)
    return model, history


# --------------------------------------------------------------------------- the flow


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
    from utils.runtime import cleanup_distributed

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


def _build_candidates(
    cfg: dict[str, Any],
    work: Path,
    rec_dir: Path,
    images: torch.Tensor,
    device: torch.device,
    rank: int,
    world: int,
    log: Any,
) -> tuple[np.memmap, np.memmap]:
    """DataElixir's candidates of ``images`` in ``rec_dir/candidates`` (this rank's share)."""
    from utils import dataelixir as de

    diff_model, base, _spec = _diffusion(cfg, work, device)
    # every rank labels with the saved backdoored model, so the labels do not depend on
    # whether rank 0 trained it in this process (its weights then in another memory layout)
    classifier = _load_model(cfg, rec_dir / "backdoored_model.pt", device)
    return de.construct_candidates(
        diff_model,
        base,
        classifier,
        images,
        rec_dir / "candidates",
        steps_T=cfg["steps_T"],
        rounds_n=cfg["rounds_n"],
        last_steps_m=cfg["last_steps_m"],
        batch_size=cfg["purify_batch_size"],
        respace=cfg["purify_respace"],
        dense_tail=cfg["purify_dense_tail"],
        noise_offset=cfg["noise_offset"],
        original_round_trip=cfg["original_round_trip"],
        seed=cfg["random_seed"],
        bf16=cfg["bf16"],
        device=device,
        rank=rank,
        world=world,
        log=log,
    )


def _candidates_rank(
    cfg: dict[str, Any], work: Path, rec_dir: Path, device: torch.device, rank: int, world: int, gate: _RankGate
) -> dict[str, Any]:
    """A torchrun rank other than 0: wait for rank 0's word, build this rank's chunks, leave."""
    message = gate.receive()
    if message.startswith("error: "):
        raise UserError(message.removeprefix("error: "))
    if message == "build":
        bd = _load_bd(rec_dir / "attack_data.pt")

        def log(m: str) -> None:
            print(f"[rank {rank}] {m}", flush=True)

        _build_candidates(cfg, work, rec_dir, bd.train.images, device, rank, world, log)
    return {}


def _run_flow(attack: str, argv: list[str], locks: ExitStack, gate: _RankGate) -> dict[str, Any]:
    from utils.runtime import init_distributed, resolve_device, seed_everything

    if attack not in ATTACKS:
        raise UserError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    keys = attack_keys(attack)
    cfg, run = parse_config(
        f"attack/{attack}.py",
        argv,
        keys,
        known_elsewhere=all_known_keys(),
        default_yaml=str(REPO_ROOT / "config" / attack / "cifar10.yaml"),
        default_name=attack,
    )
    validate(cfg, attack)
    from utils.dataelixir import apply_reference_exact

    cfg = apply_reference_exact(cfg)
    work = work_dir(run.work_dir)
    # everything is checked before the record folder is made, so a refused command leaves nothing behind
    resolve_path(cfg["diffusion_config"], "diffusion config")
    rec_dir = record_dir(work, run.save_folder_name)
    if not (rec_dir / "attack_data.pt").is_file():
        locate_cifar10(_data_root(cfg))
    device = resolve_device(cfg["device"])
    threads = torch.get_num_threads()
    rank, world = init_distributed(device, _RANK_WAIT)
    shard_threads = torch.get_num_threads()
    if rank != 0:
        return _candidates_rank(cfg, work, rec_dir, device, rank, world, gate)
    torch.set_num_threads(threads)  # rank 0 runs the other phases alone, on every core
    if not (rec_dir / "candidates" / "done").is_dir():
        # load the DDPM now (weights-only, strict, finite): a bad file fails before hours of attack and training
        _diffusion(cfg, work, torch.device("cpu"))
    resolved = {"attack": attack, **cfg}
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
    seed_everything(cfg["random_seed"])
    torch.backends.cudnn.benchmark = True

    # ------------------------------------------------------------------ 1. attack
    data_file = rec.path("attack_data.pt")
    if rec.done("attack") and data_file.is_file():
        log("phase attack: done earlier, loading attack_data.pt")
        bd = _load_bd(data_file)
    else:
        t0 = time.time()
        train = load_cifar10("train", _data_root(cfg))
        test = load_cifar10("test", _data_root(cfg))
        train_idx = torch.arange(len(train))
        if cfg["subset"]:
            train_idx = class_balanced_subset(train.labels, cfg["subset"], seed=0)
            train = train.subset(train_idx)
        if cfg["test_subset"]:
            test = test.subset(class_balanced_subset(test.labels, cfg["test_subset"], seed=0))
        log(f"data: {len(train)} training / {len(test)} test images")
        bd = build_backdoor_data(attack, cfg, train, test, device, resource_dir(work), log)
        _save_bd(data_file, bd, train_idx)
        poison_idx = torch.nonzero(bd.poison_indicator).flatten()
        atomic_write_json(
            rec.path("poison_indices.json"),
            {
                "indices": poison_idx.tolist(),
                "cifar10_train_indices": train_idx[poison_idx].tolist(),
                "note": "indices: positions in the (sub-sampled) training set; cifar10_train_indices: in CIFAR-10",
            },
        )
        atomic_write_json(rec.path("attack_info.json"), _finite(bd.info))
        rec.mark("attack", time.time() - t0)
    n = len(bd.train)
    tests = {"BA": bd.test_clean, "ASR": bd.test_bd, "RA": bd.test_ra}

    # ------------------------------------------------------------------ 2. backdoored model
    backdoored, bd_history = _train_phase(
        rec,
        cfg,
        device,
        "backdoor_training",
        "backdoored",
        bd.train,
        cfg["lr"],
        0,
        tests,
        log,
        f"{attack}: backdoored model",
    )
    backdoored.eval()
    attack_metrics = _last(bd_history)
    log(f"attack: BA {attack_metrics['BA']} ASR {attack_metrics['ASR']} RA {attack_metrics['RA']}")

    # ------------------------------------------------------------------ 3. candidates
    from utils import dataelixir as de

    cand_dir = rec.path("candidates")
    if rec.done("candidates") and de.candidates_complete(cand_dir):
        gate.send("skip")
        log("phase candidates: done earlier")
        cand, preds, _ = de.open_candidates(cand_dir)
    else:
        t0 = time.time()
        gate.send("build")
        torch.set_num_threads(shard_threads)
        cand, preds = _build_candidates(cfg, work, rec.root, bd.train.images, device, rank, world, log)
        torch.set_num_threads(threads)
        # after an interruption this is the time of the resuming run only
        rec.mark("candidates", time.time() - t0)
    k = cand.shape[1]
    labels = bd.train.labels

    # ------------------------------------------------------------------ 4. identification
    ident_file = rec.path("identification.pt")
    if rec.done("identification") and ident_file.is_file():
        log("phase identification: done earlier")
        st = safe_torch_load(ident_file, "identification results")
        detection = read_state_json(rec.path("target_detection.json"), _DAMAGED_HOW.format(rec=rec.root))
    else:
        t0 = time.time()
        p = torch.from_numpy(np.asarray(preds).astype(np.int64))
        ident = de.label_transition(p, cfg["threshold_tau"], NUM_CLASSES)
        det = de.detect_target_labels(
            p, ident["kept"], ident["transition"], labels, NUM_CLASSES, tail=cfg["detection_tail"]
        )
        detection = _finite(
            {
                "target_labels": det["targets"],
                "scores": det["scores"],
                "kl_metrics": det["metrics"],
                "median": det["median"],
                "mad": det["mad"],
                "transitioning_per_class": det["transitioning_per_class"],
                "kept_label_histograms": det["histograms"],
                "true_attack_target": cfg["attack_target"] if cfg["attack_label_trans"] == "all2one" else "all2all",
            }
        )
        atomic_write_json(rec.path("target_detection.json"), detection)
        log(f"target labels {det['targets']} (scores {np.round(det['scores'], 3).tolist()})")
        srt = de.sort_samples(p, ident, labels, det["targets"])
        decision, new_label = srt["decision"], srt["label"]
        rows = torch.nonzero(decision != de.KEPT).flatten().numpy()
        dist = de.candidate_distances(
            cand, rows, backdoored, device, bf16=cfg["bf16"], desc="selection distances", ssim_mode=cfg["ssim_mode"]
        )
        chosen = torch.zeros(n, dtype=torch.long)
        rel = decision[rows] == de.RELABELLED
        if rel.any():
            chosen[torch.from_numpy(rows)[rel]] = de.select_index(dist[rel.numpy()], ident["kept"][rows][rel])
        chosen[decision == de.SUSPICIOUS] = -1
        st = {
            "kept": ident["kept"],
            "transition": ident["transition"],
            "majority": ident["majority"],
            "decision": decision,
            "label": new_label,
            "chosen": chosen,
            "dist_rows": torch.from_numpy(rows),
            "distances": torch.from_numpy(dist),
        }
        atomic_torch_save(st, ident_file)
        counts = {de.DECISION_NAMES[c]: int((decision == c).sum()) for c in de.DECISION_NAMES}
        log(f"sorting: {counts}; {int(ident['transition'].sum())} samples transition")
        rec.mark("identification", time.time() - t0)
    decision, chosen = st["decision"], st["chosen"].clone()
    susp = torch.nonzero(decision == de.SUSPICIOUS).flatten()
    row_of = {int(r): i for i, r in enumerate(st["dist_rows"].tolist())}
    susp_dist = st["distances"][[row_of[int(r)] for r in susp]] if len(susp) else torch.zeros(0, k, dtype=torch.float64)
    non_susp = torch.nonzero(decision != de.SUSPICIOUS).flatten()

    # ------------------------------------------------------------------ 5. stage 1
    purified1 = ImageSet(de.gather_images(cand, non_susp.numpy(), chosen[non_susp].numpy()), st["label"][non_susp])
    if not rec.done("stage1"):
        log(f"stage 1: training a fresh model on {len(purified1)} non-suspicious samples")
    stage1, s1_history = _train_phase(
        rec, cfg, device, "stage1", "stage1", purified1, cfg["lr"], 1, tests, log, f"{attack}: DataElixir stage 1"
    )

    # ------------------------------------------------------------------ 6. stage 2
    s2_sel_file = rec.path("stage2_selection.pt")
    if s2_sel_file.is_file():
        s2 = safe_torch_load(s2_sel_file, "stage-2 selection")
    elif len(susp):
        p1 = predict_candidates(stage1, cand, susp.numpy(), device, cfg["bf16"], "stage-1 labels")
        s2 = de.stage2_selection(p1, st["label"][susp], susp_dist)
        atomic_torch_save(s2, s2_sel_file)
    else:
        s2 = {"consensus": torch.zeros(0, dtype=torch.bool), "chosen": torch.zeros(0, dtype=torch.long)}
        atomic_torch_save(s2, s2_sel_file)
    cons = susp[s2["consensus"]]
    extra = ImageSet(de.gather_images(cand, cons.numpy(), s2["chosen"][s2["consensus"]].numpy()), st["label"][cons])
    ft_set = ImageSet(torch.cat([purified1.images, extra.images]), torch.cat([purified1.labels, extra.labels]))
    if not rec.done("stage2"):
        log(f"stage 2: {len(cons)} of {len(susp)} suspicious samples reach consensus; fine-tuning on {len(ft_set)}")
    stage2, s2_history = _train_phase(
        rec,
        cfg,
        device,
        "stage2",
        "stage2",
        ft_set,
        cfg["ft_lr"],
        2,
        tests,
        log,
        f"{attack}: DataElixir stage 2 (defended model)",
        init=stage1,
    )

    # ------------------------------------------------------------------ 7. final relabelling
    t0 = time.time()
    stage2.eval()
    final_label = st["label"].clone()
    if len(susp):
        p2 = predict_candidates(stage2, cand, susp.numpy(), device, cfg["bf16"], "stage-2 labels")
        fin = de.final_relabel(p2, susp_dist)
        final_label[susp] = fin["label"]
        chosen[susp] = fin["chosen"]
    rates = de.tpr_fpr(final_label, labels, bd.poison_indicator)
    images = de.gather_images(cand, np.arange(n), chosen.numpy())
    atomic_torch_save(
        {"images": images, "labels": final_label, "chosen_candidate": chosen, "decision": decision},
        rec.path("purified_dataset.pt"),
    )
    _write_decisions(rec.path("decisions.csv"), bd, st, s2, susp, final_label, chosen)
    _example_png(rec.path("purified_examples.png"), bd, images, final_label)
    defended = _last(s2_history)
    if not rec.done("final"):
        rec.mark("final", time.time() - t0)
    timings = {ph: rec.phases.get(ph, {}).get("seconds") for ph in PHASES}
    counts = {de.DECISION_NAMES[c]: int((decision == c).sum()) for c in de.DECISION_NAMES}
    metrics = _finite(
        {
            "attack": attack,
            "save_folder_name": run.save_folder_name,
            "n_train": n,
            "n_poisoned": int(bd.poison_indicator.sum()),
            "n_test_clean": len(bd.test_clean),
            "n_test_bd": len(bd.test_bd),
            "attack_metrics": attack_metrics,
            "defended_metrics": defended,
            "stage1_metrics": _last(s1_history),
            "TPR": rates["TPR"],
            "FPR": rates["FPR"],
            "detection": rates,
            "target_labels": detection["target_labels"],
            "target_scores": detection["scores"],
            "decisions": counts,
            "stage2_consensus": int(s2["consensus"].sum()),
            "candidates_per_sample": k,
            "candidate_label_rates": de.candidate_label_rates(preds, labels, bd.original_labels, bd.poison_indicator),
            "timings_s": timings,
            "total_s": round(sum(t for t in timings.values() if t is not None), 3),
        }
    )
    atomic_write_json(rec.path("metrics.json"), metrics)
    log(
        f"done: attack BA {attack_metrics['BA']} ASR {attack_metrics['ASR']} | defended BA {defended['BA']} "
        f"ASR {defended['ASR']} RA {defended['RA']} | TPR {rates['TPR']} FPR {rates['FPR']}"
    )
    return metrics


# --------------------------------------------------------------------------- outputs


def _data_root(cfg: dict[str, Any]) -> Path | None:
    if not cfg["dataset_path"]:
        return None
    root = resolve_path(cfg["dataset_path"], "dataset_path")
    # BackdoorBench appends the dataset name to dataset_path
    return root / "cifar10" if (root / "cifar10").is_dir() else root


def _save_bd(path: Path, bd: BackdoorData, train_idx: torch.Tensor) -> None:
    atomic_torch_save(
        {
            "train_images": bd.train.images,
            "train_labels": bd.train.labels,
            "original_labels": bd.original_labels,
            "poison_indicator": bd.poison_indicator,
            "train_cifar_indices": train_idx,
            "test_clean_images": bd.test_clean.images,
            "test_clean_labels": bd.test_clean.labels,
            "test_bd_images": bd.test_bd.images,
            "test_bd_labels": bd.test_bd.labels,
            "test_ra_labels": bd.test_ra.labels,
            "info_json": json.dumps(_finite(bd.info)),
        },
        path,
    )


def _load_bd(path: Path) -> BackdoorData:
    d = safe_torch_load(path, "attack data")
    return BackdoorData(
        train=ImageSet(d["train_images"], d["train_labels"]),
        original_labels=d["original_labels"],
        poison_indicator=d["poison_indicator"],
        test_clean=ImageSet(d["test_clean_images"], d["test_clean_labels"]),
        test_bd=ImageSet(d["test_bd_images"], d["test_bd_labels"]),
        test_ra=ImageSet(d["test_bd_images"], d["test_ra_labels"]),
        info=json.loads(d["info_json"]),
    )


def _write_decisions(
    path: Path,
    bd: BackdoorData,
    st: dict,
    s2: dict,
    susp: torch.Tensor,
    final_label: torch.Tensor,
    chosen: torch.Tensor,
) -> None:
    from utils.dataelixir import DECISION_NAMES

    consensus = torch.zeros(len(bd.train), dtype=torch.int8) - 1
    if len(susp):
        consensus[susp] = s2["consensus"].to(torch.int8)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "index",
            "poisoned",
            "true_label",
            "dataset_label",
            "transition",
            "decision",
            "stage1_label",
            "stage2_consensus",
            "final_label",
            "chosen_candidate",
        ]
    )
    cols = zip(
        bd.poison_indicator.tolist(),
        bd.original_labels.tolist(),
        bd.train.labels.tolist(),
        st["transition"].tolist(),
        st["decision"].tolist(),
        st["label"].tolist(),
        consensus.tolist(),
        final_label.tolist(),
        chosen.tolist(),
    )
    for i, (pi, y0, y, tr, dec, l1, con, fl, ch) in enumerate(cols):
        w.writerow([i, int(pi), y0, y, int(tr), DECISION_NAMES[dec], l1, "" if con < 0 else con, fl, ch])
    atomic_write_text(path, buf.getvalue())


def _example_png(path: Path, bd: BackdoorData, purified: torch.Tensor, final_label: torch.Tensor) -> None:
    from utils.plots import save_image_grid

    poisoned = torch.nonzero(bd.poison_indicator).flatten()[:12]
    clean = torch.nonzero(~bd.poison_indicator).flatten()[:4]
    idx = torch.cat([poisoned, clean])
    if len(idx) == 0:
        return
    save_image_grid(
        path,
        [bd.train.images[idx], purified[idx]],
        row_labels=["training set (poisoned first)", "purified"],
    )
