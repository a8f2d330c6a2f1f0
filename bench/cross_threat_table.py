"""Each defence against the other's threat, at CPU scale, as one table (docs/RESULTS.md).

(A) the nine backdoor attacks (their scripts' poisoned data, CPU overlay) against ECLIPSE
(purification.py with the ECLIPSE demo's sparse model, then train.py --pure) and the ISS
baselines, BA / ASR / RA; (B) the ECLIPSE demo's eleven clean-label poisons against
DataElixir's purification rounds, victim accuracy beside the demo's ECLIPSE:

    python bench/cross_threat_table.py --jobs 2 --work_dir runs/cross_threat
    python bench/cross_threat_table.py --attacks badnet,lc --poisons none --seeds 3 --jobs 2
    python bench/cross_threat_table.py --table_only

Reads the ECLIPSE demo from ``--eclipse_work`` (its sparse diffusion model, its poisons and its
victims; ``python demo.py --poisons all --baselines`` makes them) and DataElixir's DDPM from
``--dataelixir_work`` (the overlay's diffusion_ckpt). Victims use the demo's recipe
(``config/eclipse_cpu.yaml``), seeds 0..N-1. Every step is a command (see
``utils/crossthreat/plan.py``), run ``--jobs`` at a time with one thread each; a finished step
is skipped, one made with other settings refused (``--overwrite``: redone). The table
(``cross_threat.md``/``.csv``/``.json``, ``cross_threat.png``, each step's seconds in
``step_seconds.json``) is rewritten after every finished step. ``--step`` runs one of the
steps that are no script of their own (the plan's commands use it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import machine

from utils.crossthreat.plan import CrossThreat, parse_attacks, parse_poisons
from utils.crossthreat.steps import elixir_purify, evaluate_victim, export_attack_set
from utils.crossthreat.table import TABLE, run_table, write_table
from utils.demo.pipeline import CommandFailed, interrupt_on_sigterm
from utils.demo.recipe import demo_recipe
from utils.fileio import UserError, cli_main
from utils.options import POSITIVE, ArgParser, Key, add_keys_to_argparser

KEYS = {
    "attacks": Key("all", "(A) comma-separated backdoor attacks, 'all' or 'none'"),
    "poisons": Key("all", "(B) comma-separated clean-label poisons (and 'clean': the clean subset), 'all' or 'none'"),
    "seeds": Key(1, "victims per cell, seeds 0..N-1 (table: mean ± std)", range=POSITIVE),
    "jobs": Key(2, "steps at a time (one thread each)", range=POSITIVE),
    "overlay": Key("config/dataelixir_cpu.yaml", "the attacks' CPU overlay; also DataElixir's purification settings"),
    "work_dir": Key("runs/cross_threat", "where the records, datasets, victims and the table go"),
    "eclipse_work": Key("runs/demo", "the ECLIPSE demo's work dir: its sparse model, poisons and victims"),
    "dataelixir_work": Key("runs/dataelixir", "where the overlay's diffusion_ckpt (DataElixir's DDPM) is read"),
    "table_only": Key(False, "run nothing; table what is finished", flag=True),
    "plan": Key(False, "print the steps still to run (inputs checked), run nothing", flag=True),
    "overwrite": Key(False, "redo the steps made with other settings (and the steps after them)", flag=True),
    "device": Key("auto", "device of the --step steps (the scripts choose their own)"),
    "step": Key(None, "run one step: export, elixir or evaluate (the plan's commands)", nullable=True),
    "target": Key(None, "--step: the attack (export), poison (elixir) or victim run (evaluate)", nullable=True),
    "clean_subset": Key(
        None,
        "--step elixir --target clean: images of the clean subset (default: the demo's)",
        int,
        True,
        range=POSITIVE,
    ),
}
STEPS = ("export", "elixir", "evaluate")


def cross_threat(args: argparse.Namespace) -> CrossThreat:
    return CrossThreat(
        work=Path(args.work_dir).resolve(),
        eclipse_work=Path(args.eclipse_work).resolve(),
        dataelixir_work=Path(args.dataelixir_work).resolve(),
        overlay=args.overlay,
        attacks=parse_attacks(args.attacks),
        poisons=parse_poisons(args.poisons),
        seeds=args.seeds,
        recipe=demo_recipe(),
    )


def run_step(args: argparse.Namespace) -> None:
    if args.step not in STEPS or not args.target:
        raise UserError(f"--step must be one of {', '.join(STEPS)}, with --target; got {args.step!r}")
    work = Path(args.work_dir).resolve()
    if args.step == "export":
        print(f"wrote {export_attack_set(work, parse_attacks(args.target)[0])}")
    elif args.step == "elixir":
        poison = parse_poisons(args.target)[0]
        eclipse, elixir = Path(args.eclipse_work).resolve(), Path(args.dataelixir_work).resolve()
        subset = args.clean_subset or demo_recipe()["subset"]  # the clean row's images: the demo's clean subset
        elixir_purify(
            work, poison, eclipse, elixir, args.overlay, subset=subset, overwrite=args.overwrite, device=args.device
        )
    else:
        attacks = parse_attacks(args.attacks)
        if len(attacks) != 1:
            raise UserError(f"--step evaluate needs the victim's one attack in --attacks, got {args.attacks!r}")
        m = evaluate_victim(work, args.target, attacks[0], args.device)
        print(f"{args.target}: BA {m['BA']:.2f}  ASR {m['ASR']:.2f}  RA {m['RA']:.2f}")


@cli_main
def main(argv: list[str] | None = None) -> None:
    ap = ArgParser(description=__doc__.splitlines()[0])
    add_keys_to_argparser(ap, KEYS)
    args = ap.parse_args(argv)  # a bad flag or value: one line (ArgParser, cli_main)
    if args.step is not None:
        return run_step(args)
    ct = cross_threat(args)
    if args.plan:
        return run_table(ct, args.jobs, args.overwrite, plan_only=True)
    if not args.table_only:
        ct.work.mkdir(parents=True, exist_ok=True)
        try:
            with open(ct.work / f"{TABLE}.log", "a") as log, interrupt_on_sigterm():
                run_table(ct, args.jobs, args.overwrite, machine=machine(), log=log)
        except CommandFailed as e:  # the table keeps what finished; the failure is one line
            write_table(ct, "a step failed", machine())
            raise UserError(f"step failed ({e}); fix the cause and re-run: finished steps are kept") from None
    print(write_table(ct, machine=machine()))
    print(f"wrote {ct.work / TABLE}.md (.csv, .json, .png)")


if __name__ == "__main__":
    main()
