"""The cross-threat table's steps (``bench/cross_threat_table.py``): each defence against the
other's threat, at CPU scale, as the commands a user would type.

(A) **Backdoors against ECLIPSE and the ISS baselines.** Per attack: ``attack/<attack>.py``
with the attacks' CPU overlays up to its attack data (``--stop_after attack``, random_seed
0, record ``<work>/record/<attack>_s0``); the poisoned training set exported in ECLIPSE's
format (``<work>/poisoned_data/cifar10/<attack>.pkl``); ``purification.py`` with the ECLIPSE
demo's sparse model (read from ``--eclipse_work``); ``train.py`` victims with the demo's
recipe: no defence, ISS-G, ISS-J, ECLIPSE (``--pure``); each victim's ASR / RA measured on the
record's triggered test images (``utils.crossthreat.steps.evaluate_victim``). Where the attack's
overlay trains without augmentation (``train_augment: none``, the CPU overlay: at 5000 images
crop + flip keeps BadNets' patch from being learned, so the table would have no backdoor to
stop) the victims do too (``--train_augment none``); otherwise they keep the recipe's crop +
flip (without the rotation of WaNet's and Input-aware's own ``crop_rotate_flip``).

(B) **Clean-label poisons against DataElixir's purification.** Per poison crafted by the
ECLIPSE demo (``<eclipse_work>/poisoned_data/cifar10/<P>.pkl``): DataElixir's rounds over every
image as the overlay configures them, the purified image being the last round's last kept
sample (``steps.elixir_purify``), written as a purified set
(``<work>/purified_data/cifar10/dataelixir/<steps_T>/<ddpm iteration>/<P>-pure.pkl``); victims
with the demo's recipe trained on it with train.py's ``--pure``, without compensation
(``--p 0 --std 0``: crop + flip only) and with it. Its ``clean`` row does the same to the demo's
clean subset (what DataElixir's rounds cost on clean data; no poisoned set is read).

Each step is a :class:`utils.demo.pipeline.DemoCommand` whose output marks it done, with the
settings its script stores (:class:`utils.demo.stored.Stored`), so a re-run skips finished
steps and refuses (or with ``--overwrite`` redoes) outputs made with other settings.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.dataelixir.attack_data import ATTACKS
from utils.dataelixir.defence import check_step_settings
from utils.dataelixir.flow import attack_argv, resolve_flow_config
from utils.dataelixir.keys import DEFENCE_KEYS, FlowConfig, all_known_keys, apply_reference_exact
from utils.dataelixir.models import diffusion_ckpt
from utils.demo.pipeline import SPARSE_SET, VARIANTS, DemoCommand, victim_result
from utils.demo.stored import Stored
from utils.diffusion.checkpoints import checkpoint_name, parse_checkpoint_name, resolve_checkpoint
from utils.fileio import UserError, file_fingerprint, read_state_json
from utils.options import coerce, load_yaml_file, quote, resolve_path
from utils.paths import DATASET, diff_ckpt_dir, poisoned_file, purified_file, record_dir
from utils.poisons import POISONS

BENCH = "bench/cross_threat_table.py"  # runs the steps that are no script of their own (--step)
ECLIPSE_CONFIG = "config/eclipse/cpu.yml"
ATTACK_SEED = 0  # every attack's data is drawn once; the victims' seeds vary
ELIXIR_SET = "dataelixir"  # the purified_data/ folder of DataElixir's rounds (train.py --sparse_set)
CLEAN = "clean"  # (B)'s row of the demo's clean subset: what DataElixir's rounds cost on clean data
BACKDOOR_VARIANTS = ("none", "issg", "issj", "eclipse")  # demo.py's columns (their train.py flags)
# DataElixir's purified set, trained on as ECLIPSE trains on its own: with crop + flip alone
# (compensation off: grayscale p 0, noise std 0) and with ECLIPSE's compensation
ELIXIR_VARIANTS = {
    "elixir": ("DataElixir rounds", ["--pure", "--p", "0", "--std", "0"]),
    "elixir_comp": ("DataElixir rounds + compensation", ["--pure"]),
}


@dataclass(frozen=True)
class CrossThreat:
    """One cross-threat table: where it goes, what it reads, and what it runs."""

    work: Path
    eclipse_work: Path  # the ECLIPSE demo's work dir: its sparse model, poisons and victims
    dataelixir_work: Path  # where the overlay's (relative) diffusion_ckpt is read
    overlay: str  # the attacks' CPU overlay, also DataElixir's purification settings
    attacks: tuple[str, ...]
    poisons: tuple[str, ...]
    seeds: int
    recipe: Mapping[str, Any]  # the ECLIPSE demo's (utils.demo.recipe.demo_recipe)
    py: str = sys.executable


def parse_names(text: str, known: Mapping[str, Any] | list[str], flag: str) -> tuple[str, ...]:
    """``all``, ``none`` or comma-separated names of ``known``; anything else is a one-line error."""
    if text == "none":
        return ()
    names = list(known) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UserError(f"{flag}: unknown name(s) {unknown or [text]}; choose from {', '.join(known)}, 'all' or 'none'")
    return tuple(dict.fromkeys(names))


def parse_attacks(text: str) -> tuple[str, ...]:
    return parse_names(text, list(ATTACKS), "--attacks")


def parse_poisons(text: str) -> tuple[str, ...]:
    return parse_names(text, [CLEAN, *POISONS], "--poisons")


# --------------------------------------------------------------------------- names and paths


def record_name(attack: str) -> str:
    return f"{attack}_s{ATTACK_SEED}"


def attack_data_file(work: Path, attack: str) -> Path:
    return record_dir(work, record_name(attack)) / "attack_data.pt"


def victim_name(dataset: str, variant: str, seed: int) -> str:
    """train.py run name of a cross-threat victim."""
    return f"xt-{dataset}-{variant}-s{seed}"


def victim_key(dataset: str, variant: str, seed: int) -> str:
    """Its step's key: the row's name first (the table sums each row's steps' seconds)."""
    return f"{dataset} {variant} s{seed}"


def eval_file(work: Path, victim: str) -> Path:
    return work / "eval" / f"{victim}.json"


def sparse_checkpoint(ct: CrossThreat) -> Path:
    """The ECLIPSE demo's sparse diffusion checkpoint (either spelling of its name)."""
    name = checkpoint_name("ema", ct.recipe["diffusion_iterations"], ct.recipe["diffusion_ema"])
    return resolve_checkpoint(diff_ckpt_dir(ct.eclipse_work, SPARSE_SET) / name)


def ddpm_iteration(cfg: FlowConfig) -> int:
    """The training iteration in the DDPM checkpoint's name (0 when it names none)."""
    parsed = parse_checkpoint_name(Path(cfg.diffusion_ckpt).name)
    return parsed.step if parsed else 0


def elixir_file(work: Path, cfg: FlowConfig, poison: str) -> Path:
    return purified_file(work, ELIXIR_SET, cfg.steps_T, ddpm_iteration(cfg), poison)


def check_cifar10(dataset: Any, where: str) -> None:
    """The table is CIFAR-10 only: (A)'s ECLIPSE half purifies with the CIFAR-10 demo's sparse
    model and trains CIFAR-10 victims, (B) purifies the CIFAR-10 demo's poisons; another
    dataset is a one-line refusal naming where it was set."""
    if dataset != DATASET:
        raise UserError(
            f"{where}: dataset {quote(dataset)}: the cross-threat table is CIFAR-10 only; expected dataset: {DATASET}"
        )


def elixir_config(overlay: str) -> FlowConfig:
    """DataElixir's purification settings as ``overlay`` sets them (its defence keys over their
    defaults; every other key is the attacks'), with random_seed :data:`ATTACK_SEED`. An
    overlay for another dataset than CIFAR-10 is refused (:func:`check_cifar10`)."""
    path = resolve_path(overlay, "overlay file")
    settings: dict[str, Any] = {k: key.default for k, key in DEFENCE_KEYS.items()}
    known = all_known_keys()
    for k, v in load_yaml_file(path).items():
        if k == "dataset":
            check_cifar10(v, str(path))
        if k in DEFENCE_KEYS:
            settings[k] = coerce(k, DEFENCE_KEYS[k], v, DEFENCE_KEYS, str(path))
        elif k not in known:
            raise UserError(f"unknown key {quote(k)} in {path}; valid keys: {', '.join(sorted(known))}")
    cfg = FlowConfig.from_dict(apply_reference_exact({**settings, "random_seed": ATTACK_SEED}))
    check_step_settings(cfg.steps_T, cfg.rounds_n, cfg.last_steps_m, cfg.purify_respace, cfg.purify_dense_tail)
    return cfg


def elixir_images(eclipse_work: Path, poison: str, subset: int) -> str | None:
    """What (B) purifies for ``poison``, as its stored identity: the demo's poisoned set (its
    fingerprint; None while it is not there), or for ``clean`` the demo's clean subset (the
    class-balanced draw of ``subset`` images that ``train.py --poison clean --subset`` uses)."""
    if poison == CLEAN:
        return f"{DATASET} train, class-balanced subset of {subset} (seed 0)"
    source = poisoned_file(eclipse_work, poison)
    return file_fingerprint(source) if source.is_file() else None


def elixir_settings(cfg: FlowConfig, ddpm: Path | None, images: str | None) -> dict[str, Any]:
    """What a DataElixir-purified set is made from: its rounds, seed, DDPM and input
    (fingerprints; :func:`elixir_images`). None (the plan, where the DDPM or the poison is not
    here) leaves that out, so the other settings are still compared with a stored set's."""
    keys = ("steps_T", "purify_respace", "rounds_n", "last_steps_m", "purify_dense_tail", "noise_offset")
    return {
        **{k: getattr(cfg, k) for k in (*keys, "original_round_trip", "random_seed", "purify_batch_size")},
        "diffusion_config": cfg.diffusion_config,
        **({} if ddpm is None else {"ddpm": file_fingerprint(ddpm)}),
        **({} if images is None else {"images": images}),
        "kept_sample": "last",  # the last round's last kept sample
    }


# --------------------------------------------------------------------------- the steps


def _flag_dict(flags: list[str]) -> dict[str, Any]:
    """``--flag value`` pairs as ``{flag: value}``; a flag without a value is True."""
    out: dict[str, Any] = {}
    for i, word in enumerate(flags):
        if word.startswith("--"):
            value = flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else True
            out[word[2:]] = value
    return out


def victim_step(
    ct: CrossThreat, dataset: str, variant: str, flags: list[str], seed: int, after: str, title: str
) -> DemoCommand:
    """train.py on ``dataset`` (``<work>/poisoned_data`` or, with ``--pure``, its purified set)
    with the demo's recipe and ``flags``; its stored settings are what the command sets."""
    r = ct.recipe
    opts: dict[str, Any] = {"poison": dataset, "defense": "none", "pure": False, **_flag_dict(flags)}
    opts |= {"arch": r["arch"], "width": r["width"], "epochs": r["epochs"], "schedule": r["schedule"]}
    opts |= {"weight_decay": r["weight_decay"], "test_subset": r.get("test_subset"), "seed": seed}
    name = victim_name(dataset, variant, seed)
    cmd = [ct.py, "train.py"]
    for k, v in opts.items():
        if v is True:
            cmd.append(f"--{k}")
        elif v is not None and v is not False and not (k == "defense" and v == "none"):
            cmd += [f"--{k}", str(v)]
    cmd += ["--work_dir", str(ct.work), "--run_name", name]
    result = victim_result(ct.work, name)
    stored = Stored((result, result.with_name("settings.json")), opts, ("settings", None))
    key = victim_key(dataset, variant, seed)
    return DemoCommand(
        key, title + (f", seed {seed}" if ct.seeds > 1 else ""), cmd, None, result.is_file(), (after,), stored
    )


def current_eval(work: Path, victim: str) -> dict[str, Any] | None:
    """The victim's stored evaluation when it was made of its current model (the fingerprint
    it stores is the model's now); None when it is missing or stale (a victim redone since)."""
    model, out = work / "runs" / "train" / victim / "model.pt", eval_file(work, victim)
    if not (model.is_file() and out.is_file()):
        return None
    stored = read_state_json(out, "delete it (the evaluation is redone)")
    return stored if isinstance(stored, dict) and stored.get("model") == file_fingerprint(model) else None


def backdoor_steps(ct: CrossThreat, attack: str) -> list[DemoCommand]:
    """(A) for one attack: its data, the export, ECLIPSE's purification, the victims and their ASR / RA."""
    w, bench = str(ct.work), [ct.py, BENCH]
    argv = [*attack_argv(attack, ct.overlay, ATTACK_SEED, ct.work, record_name(attack)), "--stop_after", "attack"]
    cfg, _ = resolve_flow_config(attack, argv)  # the overlay checked now, and what the record stores
    check_cifar10(cfg.dataset, f"{ct.overlay} (attack {attack})")
    record_cfg = {k: v for k, v in cfg.to_dict().items() if k != "precisions"}
    exported = poisoned_file(ct.work, attack)
    info = exported.with_suffix(".json")
    data = DemoCommand(
        f"{attack} attack",
        f"{attack}: the poisoned data (attack/{attack}.py --stop_after attack)",
        [ct.py, f"attack/{attack}.py", *argv],
        None,
        exported.is_file(),
        stored=Stored((info,), record_cfg, ("attack_config",)),
    )
    export = DemoCommand(
        f"{attack} export",
        f"{attack}: the poisoned training set in ECLIPSE's format",
        [*bench, "--step", "export", "--target", attack, "--work_dir", w],
        None,
        exported.is_file(),
        (data.key,),
    )
    r = ct.recipe
    ckpt = sparse_checkpoint(ct)
    purified = purified_file(ct.work, SPARSE_SET, r["t"], r["diffusion_iterations"], attack)
    cmd = [ct.py, "purification.py", "--poison", attack, "--config", ECLIPSE_CONFIG, "--sparse_diff_model", ckpt.name]
    cmd += ["--t", str(r["t"]), "--respace", str(r["respace"]), "--work_dir", w]
    cmd += ["--diff_work_dir", str(ct.eclipse_work)]  # the demo's model, this work dir's data
    purify = DemoCommand(
        f"{attack} purification",
        f"{attack}: ECLIPSE's purification",
        cmd,
        None,
        purified.is_file(),
        (export.key,),
        Stored((purified.with_suffix(".json"),), {"t": r["t"], "respace": r["respace"], "checkpoint": str(ckpt)}),
    )
    steps = [data, export, purify]
    for seed in range(ct.seeds):
        for v in BACKDOOR_VARIANTS:
            flags = list(VARIANTS[v][1])
            flags += ["--t", str(r["t"]), "--iter", str(r["diffusion_iterations"])] if v == "eclipse" else []
            flags += ["--train_augment", "none"] if cfg.train_augment == "none" else []
            after = purify.key if v == "eclipse" else export.key
            victim = victim_step(ct, attack, v, flags, seed, after, f"{attack}: victim, {VARIANTS[v][0]}")
            name = victim_name(attack, v, seed)
            evaluate = DemoCommand(
                f"{victim.key} eval",
                f"{attack}: ASR / RA of {name}",
                [*bench, "--step", "evaluate", "--target", name, "--attacks", attack, "--work_dir", w],
                None,
                current_eval(ct.work, name) is not None,
                (victim.key,),
            )
            steps += [victim, evaluate]
    return steps


def poison_steps(ct: CrossThreat, poison: str, cfg: FlowConfig) -> list[DemoCommand]:
    """(B) for one poison: DataElixir's rounds over its images, then the victims."""
    out = elixir_file(ct.work, cfg, poison)
    try:
        ddpm: Path | None = diffusion_ckpt(cfg, ct.dataelixir_work)[0]
    except UserError:  # needed only while the step is to run (missing_inputs says so)
        ddpm = None
    # without the DDPM (or the poison) here, the settings that need no fingerprint are compared
    made = elixir_settings(cfg, ddpm, elixir_images(ct.eclipse_work, poison, ct.recipe["subset"]))
    cmd = [ct.py, BENCH, "--step", "elixir", "--target", poison, "--work_dir", str(ct.work)]
    cmd += ["--eclipse_work", str(ct.eclipse_work), "--dataelixir_work", str(ct.dataelixir_work)]
    cmd += ["--overlay", ct.overlay] + (["--clean_subset", str(ct.recipe["subset"])] if poison == CLEAN else [])
    elixir = DemoCommand(
        f"{poison} dataelixir",
        f"{poison}: DataElixir's purification rounds",
        cmd,
        None,
        out.is_file(),
        stored=Stored((out.with_suffix(".json"),), made, ("settings",)),
    )
    steps = [elixir]
    pure = ["--sparse_set", ELIXIR_SET, "--t", str(cfg.steps_T), "--iter", str(ddpm_iteration(cfg))]
    for seed in range(ct.seeds):
        for v, (title, flags) in ELIXIR_VARIANTS.items():
            steps.append(victim_step(ct, poison, v, [*flags, *pure], seed, elixir.key, f"{poison}: victim, {title}"))
    return steps


def missing_inputs(ct: CrossThreat) -> None:
    """One line naming what the chosen halves need and lack: the demo's sparse model, its
    poisons, DataElixir's DDPM (only where a step still needs them)."""
    r = ct.recipe
    need_sparse = any(
        not purified_file(ct.work, SPARSE_SET, r["t"], r["diffusion_iterations"], a).is_file() for a in ct.attacks
    )
    ckpt = sparse_checkpoint(ct)
    if need_sparse and not ckpt.is_file():
        raise UserError(
            f"ECLIPSE's sparse diffusion model not found: {ckpt}; train it with `python demo.py --work_dir "
            f"{ct.eclipse_work}` (its first step), or point --eclipse_work at the demo that has it, or --attacks none"
        )
    if not ct.poisons:
        return
    cfg = elixir_config(ct.overlay)
    todo = [p for p in ct.poisons if not elixir_file(ct.work, cfg, p).is_file()]
    lacking = [p for p in todo if p != CLEAN and not poisoned_file(ct.eclipse_work, p).is_file()]
    if lacking:
        raise UserError(
            f"poisoned set(s) {', '.join(lacking)} not found in {poisoned_file(ct.eclipse_work, 'P').parent}; craft them "
            f"with `python demo.py --poisons {','.join(lacking)} --work_dir {ct.eclipse_work}`, or choose --poisons"
        )
    if todo:
        try:
            diffusion_ckpt(cfg, ct.dataelixir_work)
        except UserError as e:  # a missing DDPM: one line saying how to make it, and where it is read
            raise UserError(
                f"{e}; it is read under --dataelixir_work {ct.dataelixir_work}: train it with --work_dir there, "
                "or point --dataelixir_work at the folder holding it"
            ) from None


def build_steps(ct: CrossThreat) -> list[DemoCommand]:
    """Every step of both halves, inputs checked first (the overlay's dataset before anything)."""
    overlay = resolve_path(ct.overlay, "overlay file")
    check_cifar10(load_yaml_file(overlay).get("dataset", DATASET), str(overlay))
    missing_inputs(ct)
    steps = [s for a in ct.attacks for s in backdoor_steps(ct, a)]
    if ct.poisons:
        cfg = elixir_config(ct.overlay)
        steps += [s for p in ct.poisons for s in poison_steps(ct, p, cfg)]
    return steps
