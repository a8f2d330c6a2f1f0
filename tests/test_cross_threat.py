"""bench/cross_threat_table.py at tiny scale: the plan, one cell of each half end to end (real
scripts, run in this process), resume, the table's shape, the bad inputs, and ASR / RA measured
as the attack scripts measure them."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import purification
import train
from utils.crossthreat import plan as xp
from utils.crossthreat.steps import backdoor_metrics, elixir_purify, evaluate_victim
from utils.crossthreat.table import backdoor_rows, poison_rows, run_table, table_markdown, write_table
from utils.data import class_balanced_subset, read_eclipse_pkl, write_eclipse_pkl
from utils.dataelixir.defence import construct_candidates
from utils.dataelixir.flow import run_attack_then_defence
from utils.dataelixir.keys import FlowConfig
from utils.dataelixir.models import load_model
from utils.dataelixir.outputs import last_metrics, load_attack_data
from utils.datasets import load_poisoned
from utils.demo.stored import check_stored_settings
from utils.diffusion.factory import load_diffusion_spec
from utils.fileio import UserError, file_fingerprint
from utils.paths import poisoned_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import cross_threat_table as bench  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DDPM = "diff_ckpt/cifar10/tiny/ema_0.999_000001.pt"
# the attacks' overlay at tiny scale: 100 training images (20 poisoned), 100 test images, one
# epoch of a width-4 model; DataElixir: a random CPU-scale DDPM, 2 rounds of 4 steps from 20
OVERLAY = {
    "subset": 100,
    "test_subset": 100,
    "model_width": 4,
    "epochs": 1,
    "batch_size": 50,
    "train_augment": "none",
    "diffusion_config": "config/ddpm/cpu.yml",
    "diffusion_ckpt": DDPM,
    "steps_T": 20,
    "purify_respace": 4,
    "rounds_n": 2,
    "last_steps_m": 2,
    "purify_batch_size": 8,
    "pratio": 0.2,
    "device": "cpu",
    "precision": "fp32",
}
# the ECLIPSE demo's recipe at tiny scale (its sparse model: ema_0.99_000005.pt)
RECIPE = {
    "arch": "resnet18",
    "width": 4,
    "epochs": 1,
    "schedule": "onecycle",
    "weight_decay": 0.0005,
    "t": 4,
    "respace": 2,
    "diffusion_iterations": 5,
    "diffusion_ema": 0.99,
    "test_subset": 100,
    "subset": 16,  # the demo's clean subset: (B)'s clean row
}


def _demo_settings(**change) -> dict:
    """What train.py stores for the demo's ECLIPSE victim made with :data:`RECIPE`."""
    r = {**RECIPE, **change}
    keys = ("arch", "width", "epochs", "schedule", "weight_decay", "test_subset", "t")
    return {**{k: r[k] for k in keys}, "iter": r["diffusion_iterations"], "pure": True, "seed": 0}


def _random_model(config: str, seed: int) -> dict:
    torch.manual_seed(seed)
    model = load_diffusion_spec(REPO / config).build_model()
    for p in model.parameters():  # the zero-initialised output layers would make denoising trivial
        p.data.normal_(0, 0.02)
    return model.state_dict()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_train):
    """The ECLIPSE demo's work dir (sparse model, an EM poison of 20 images, one ECLIPSE victim's
    result), DataElixir's (a DDPM) and the overlay."""
    root = tmp_path_factory.mktemp("xt")
    eclipse, elixir = root / "demo", root / "dataelixir"
    sparse = eclipse / "diff_ckpt/cifar10/test2000ps8000/ema_0.99_000005.pt"
    sparse.parent.mkdir(parents=True)
    torch.save(_random_model("config/eclipse/cpu.yml", 0), sparse)
    (elixir / DDPM).parent.mkdir(parents=True)
    torch.save(_random_model("config/ddpm/cpu.yml", 1), elixir / DDPM)
    poison = small_train.subset(class_balanced_subset(small_train.labels, 20, 0))
    write_eclipse_pkl(poisoned_file(eclipse, "EM"), poison)
    demo_victim = eclipse / "runs/train/demo-EM-eclipse/result.json"
    demo_victim.parent.mkdir(parents=True)
    demo_victim.write_text(json.dumps({"settings": _demo_settings(), "final_test_acc": 50.0}))
    overlay = root / "tiny.yaml"
    overlay.write_text("".join(f"{k}: {v}\n" for k, v in OVERLAY.items()))
    return root, eclipse, elixir, str(overlay)


def _ct(inputs, work: Path, attacks=("badnet",), poisons=("EM",), seeds=1, **recipe) -> xp.CrossThreat:
    root, eclipse, elixir, overlay = inputs
    return xp.CrossThreat(work, eclipse, elixir, overlay, attacks, poisons, seeds, {**RECIPE, **recipe}, py="py")


def in_process(cmd: list[str]) -> float:
    """Run a planned command in this process (no interpreter start per step)."""
    t0 = time.time()
    script, argv = cmd[1], cmd[2:]
    if script == "train.py":
        train.main(argv)
    elif script == "purification.py":
        purification.main(argv)
    elif script.startswith("attack/"):
        run_attack_then_defence(Path(script).stem, argv)
    else:
        assert script == xp.BENCH, cmd
        bench.main([*argv, "--device", "cpu"])
    return time.time() - t0


def test_plan_builds_each_step_as_its_command(inputs, tmp_path):
    ct = _ct(inputs, tmp_path, attacks=("sig", "badnet"), seeds=2)
    steps = {s.key: s for s in xp.build_steps(ct)}
    # per attack: data, export, purification, 4 victims and their evaluations per seed; per poison 1 + 2 per seed
    assert len(steps) == 2 * (3 + 4 * 2 * 2) + (1 + 2 * 2)
    sig = steps["sig attack"].cmd
    assert sig[:2] == ["py", "attack/sig.py"] and sig[-2:] == ["--stop_after", "attack"]
    assert sig[sig.index("--overlay") + 1 :][:3] == [ct.overlay, "--overlay", "config/sig/cpu.yaml"]
    assert "config/badnet/cpu.yaml" not in steps["badnet attack"].cmd
    assert steps["badnet export"].after == ("badnet attack",)
    purify = steps["badnet purification"].cmd
    assert purify[purify.index("--diff_work_dir") + 1] == str(ct.eclipse_work)
    assert purify[purify.index("--sparse_diff_model") + 1] == "ema_0.99_000005.pt"
    eclipse = steps["badnet eclipse s1"]
    assert eclipse.after == ("badnet purification",) and "--pure" in eclipse.cmd
    assert eclipse.cmd[-4:] == ["--work_dir", str(tmp_path), "--run_name", "xt-badnet-eclipse-s1"]
    issj = steps["badnet issj s0"].cmd
    assert issj[issj.index("--defense") + 1] == "jpeg" and issj[issj.index("--width") + 1] == "4"
    assert steps["badnet issj s0 eval"].cmd[-6:] == [
        "--target",
        "xt-badnet-issj-s0",
        "--attacks",
        "badnet",
        "--work_dir",
        str(tmp_path),
    ]
    # the overlay trains without crop + flip, so do the backdoor victims; the poisons' victims keep ECLIPSE's
    for v in xp.BACKDOOR_VARIANTS:
        cmd = steps[f"badnet {v} s0"].cmd
        assert cmd[cmd.index("--train_augment") + 1] == "none"
    elixir = steps["EM elixir s0"].cmd
    assert "--train_augment" not in elixir and "--train_augment" not in steps["EM elixir_comp s0"].cmd
    assert elixir[elixir.index("--sparse_set") + 1 :][:5] == ["dataelixir", "--t", "20", "--iter", "1"]
    assert elixir[elixir.index("--p") + 1] == "0" and "--p" not in steps["EM elixir_comp s0"].cmd
    assert steps["EM elixir_comp s1"].after == ("EM dataelixir",)


def test_backdoor_victims_keep_crop_flip_where_the_overlay_trains_with_it(inputs, tmp_path):
    overlay = tmp_path / "crop_flip.yaml"
    overlay.write_text("".join(f"{k}: {v}\n" for k, v in {**OVERLAY, "train_augment": "crop_flip"}.items()))
    ct = replace(_ct(inputs, tmp_path), overlay=str(overlay))
    victims = [s for s in xp.build_steps(ct) if s.cmd[1] == "train.py"]
    assert len(victims) == 4 + 2 and not any("--train_augment" in s.cmd for s in victims)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(attacks="nope"), r"--attacks: unknown name\(s\) \['nope'\]; choose from badnet"),
        (dict(poisons="EM,XX"), r"--poisons: unknown name\(s\) \['XX'\]"),
        (dict(eclipse_work="nowhere"), r"ECLIPSE's sparse diffusion model not found: .*nowhere.*python demo.py"),
        (dict(attacks="none", poisons="TAP"), r"poisoned set\(s\) TAP not found in .*demo.py --poisons TAP"),
        (
            dict(attacks="none", poisons="EM", dataelixir_work="nowhere"),
            r"diffusion checkpoint not found: .*--dataelixir_work",
        ),
        (dict(attacks="none", step="export"), r"--step must be one of export, elixir, evaluate, with --target"),
        (dict(seeds="0"), r"--seeds must be"),  # a bad value: ArgParser's one line
        (dict(jobs="two"), r"--jobs"),
        (dict(attacks="badnet", poisons="none", overlay="svhn.yaml"), r"svhn\.yaml: dataset 'svhn': .*CIFAR-10 only"),
        (dict(attacks="none", poisons="EM", overlay="svhn.yaml"), r"svhn\.yaml: dataset 'svhn': .*CIFAR-10 only"),
    ],
)
def test_bad_inputs_are_one_line_errors(inputs, tmp_path, capsys, change, message):
    root, eclipse, elixir, overlay = inputs
    (root / "svhn.yaml").write_text(Path(overlay).read_text() + "dataset: svhn\n")
    opts = {"eclipse_work": eclipse, "dataelixir_work": elixir, "overlay": overlay, "work_dir": tmp_path, "plan": True}
    opts |= {k: (root / v if k.endswith("work") or k == "overlay" else v) for k, v in change.items()}
    argv = [a for k, v in opts.items() for a in ([f"--{k}"] if v is True else [f"--{k}", str(v)])]
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err


def test_steps_refuse_another_dataset(inputs, tmp_path):
    """--step elixir with a non-CIFAR-10 overlay, and --step evaluate on a victim of another
    dataset, are one-line refusals too (the plan is not the only way in)."""
    root, eclipse, elixir, overlay = inputs
    svhn = root / "svhn-steps.yaml"
    svhn.write_text(Path(overlay).read_text() + "dataset: svhn\n")
    with pytest.raises(UserError, match=r"dataset 'svhn': the cross-threat table is CIFAR-10 only"):
        elixir_purify(tmp_path, "EM", eclipse, elixir, str(svhn), subset=16, device="cpu", log=lambda m: None)
    run = tmp_path / "runs/train/v"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"settings": {"dataset": "svhn"}, "final_test_acc": 1.0}))
    (run / "model.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"result\.json: dataset 'svhn'"):
        evaluate_victim(tmp_path, "v", "badnet", "cpu")


def test_one_cell_of_each_half_end_to_end_then_resumes(inputs, tmp_path):
    work = tmp_path / "w"
    ct = _ct(inputs, work)
    run_table(ct, runner=in_process, say=lambda line: None)
    rec = work / "record" / "badnet_s0"
    assert json.loads((rec / "phases.json").read_text()).keys() == {"attack"}  # stopped after the attack data
    bd, _ = load_attack_data(rec / "attack_data.pt")
    exported = read_eclipse_pkl(poisoned_file(work, "badnet"))
    assert torch.equal(exported.images, bd.train.images) and torch.equal(exported.labels, bd.train.labels)
    info = json.loads(poisoned_file(work, "badnet").with_suffix(".json").read_text())
    assert info["poisoned"] == 20 and info["attack_config"]["subset"] == 100
    evaluated = json.loads((work / "eval" / "xt-badnet-eclipse-s0.json").read_text())
    assert evaluated["n_triggered"] == len(bd.test_bd) == 90  # the non-target test images
    settings = json.loads((work / "runs/train/xt-badnet-eclipse-s0/result.json").read_text())["settings"]
    assert settings["pure"] and settings["t"] == 4 and settings["iter"] == 5 and settings["width"] == 4
    elixir = json.loads((work / "runs/train/xt-EM-elixir-s0/result.json").read_text())["settings"]
    assert elixir["sparse_set"] == "dataelixir" and elixir["p"] == 0 and elixir["std"] == 0 and elixir["pure"]

    out = json.loads((work / "cross_threat.json").read_text())
    (a,) = out["backdoor"]
    assert a["attack"] == "badnet" and set(a["cells"]) == {"none", "issg", "issj", "eclipse"}
    assert a["cells"]["eclipse"]["ASR"]["values"] == [evaluated["ASR"]] and a["minutes"] > 0
    assert {k.split(" ", 1)[1] for k in a["step_seconds"]} >= {"attack", "export", "purification", "eclipse s0 eval"}
    (b,) = out["poisons"]
    assert (
        b["cells"]["eclipse"]["mean"] == 50.0 and b["cells"]["elixir_comp"]["n"] == 1 and b["cells"]["none"]["n"] == 0
    )
    md = (work / "cross_threat.md").read_text()
    assert md.count("\n| badnet | ") == 1 and md.count("\n| EM | — | — | — | 50.0 | ") == 1
    rows = list(csv.reader(io.StringIO((work / "cross_threat.csv").read_text())))
    assert len(rows) == 1 + 4 * 3 + 6 and rows[1][:4] == ["A", "badnet", "none", "BA"]
    assert (work / "cross_threat.png").read_bytes()[:4] == b"\x89PNG"

    result = work / "runs/train/xt-badnet-none-s0/result.json"
    mtime = result.stat().st_mtime_ns

    def nothing_runs(cmd):
        raise AssertionError(f"ran {cmd}")

    run_table(ct, runner=nothing_runs, say=lambda line: None)  # every step finished: skipped
    assert result.stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match=r"step 'badnet purification': .* made with other settings \(respace: 2 -> 3\)"):
        run_table(replace(ct, recipe={**RECIPE, "respace": 3}), runner=nothing_runs, say=lambda line: None)
    assert write_table(ct).count("\n| ") == 4  # each half: its header and its row


def test_a_stored_elixir_set_is_compared_even_without_the_ddpm(inputs, tmp_path):
    """A purified set made with other rounds is refused though the DDPM (whose fingerprint
    the set also stores) is not here to fingerprint; with the same rounds it counts as done."""
    root, eclipse, elixir, overlay = inputs
    ct = replace(_ct(inputs, tmp_path, attacks=()), dataelixir_work=root / "no-ddpm-here")
    cfg = xp.elixir_config(overlay)
    out = xp.elixir_file(tmp_path, cfg, "EM")
    out.parent.mkdir(parents=True)
    out.write_bytes(b"")
    stored = {**xp.elixir_settings(cfg, elixir / DDPM, xp.elixir_images(eclipse, "EM", 16)), "rounds_n": 3}
    out.with_suffix(".json").write_text(json.dumps({"settings": stored}))
    with pytest.raises(UserError, match=r"step 'EM dataelixir': .* other settings \(rounds_n: 3 -> 2\)"):
        check_stored_settings(xp.build_steps(ct), overwrite=False)
    out.with_suffix(".json").write_text(json.dumps({"settings": {**stored, "rounds_n": 2}}))
    steps = {s.key: s for s in xp.build_steps(ct)}
    assert steps["EM dataelixir"].done and check_stored_settings(list(steps.values()), overwrite=False) == []


def test_table_shows_only_current_evaluations_and_same_recipe_demo_victims(inputs, tmp_path):
    """(A) never shows an evaluation of a model since replaced (the plan's fingerprint check);
    (B) leaves out the demo's victims made with another recipe, naming them in one line."""
    root, eclipse, elixir, overlay = inputs
    ct = _ct(inputs, tmp_path)
    run = tmp_path / "runs/train/xt-badnet-none-s0"
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"old model")
    evaluation = {"model": file_fingerprint(run / "model.pt"), "BA": 80.0, "ASR": 95.0, "RA": 4.0}
    xp.eval_file(tmp_path, run.name).parent.mkdir(parents=True)
    xp.eval_file(tmp_path, run.name).write_text(json.dumps(evaluation))
    assert backdoor_rows(tmp_path, ["badnet"], 1)[0]["cells"]["none"]["ASR"]["values"] == [95.0]
    (run / "model.pt").write_bytes(b"the victim redone")  # its evaluation is stale now
    assert backdoor_rows(tmp_path, ["badnet"], 1) == []

    demo = tmp_path / "demo"
    for name, settings in (("demo-EM-none", _demo_settings()), ("demo-EM-eclipse", _demo_settings(epochs=3))):
        (demo / "runs/train" / name).mkdir(parents=True)
        (demo / "runs/train" / name / "result.json").write_text(
            json.dumps({"settings": settings, "final_test_acc": 30.0})
        )
    mine = tmp_path / "runs/train/xt-EM-elixir-s0/result.json"
    mine.parent.mkdir(parents=True)
    mine.write_text(json.dumps({"final_test_acc": 40.0}))
    (row,) = poison_rows(tmp_path, demo, ["EM"], 1, ct.recipe)
    assert row["cells"]["none"]["values"] == [30.0] and row["cells"]["eclipse"]["n"] == 0
    assert row["demo_left_out"] == ["demo-EM-eclipse (epochs: 3 -> 1)"]
    md = table_markdown([], [row])
    assert md.endswith(
        "\ndemo victims left out, made with another recipe than this table's: demo-EM-eclipse (epochs: 3 -> 1)"
    )


def test_elixir_image_is_the_last_candidate_of_the_attack_flows_store(inputs, tmp_path, small_train):
    """DataElixir's purified image is the candidate construction's last one (same rounds, seed, chunks)."""
    root, eclipse, elixir, overlay = inputs
    out = elixir_purify(tmp_path, "EM", eclipse, elixir, overlay, subset=16, device="cpu", log=lambda m: None)
    purified = read_eclipse_pkl(out)
    cfg = xp.elixir_config(overlay)
    spec = load_diffusion_spec(REPO / cfg.diffusion_config)
    model = spec.build_model()
    model.load_state_dict(torch.load(elixir / DDPM))
    images = read_eclipse_pkl(poisoned_file(eclipse, "EM")).images
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    rounds = dict(steps_T=20, rounds_n=2, last_steps_m=2, respace=4, batch_size=8, seed=0)
    cands, _ = construct_candidates(model.eval(), spec.build_diffusion(), classifier, images, tmp_path / "c", **rounds)
    assert torch.equal(purified.images, torch.from_numpy(cands[:, -1].copy()))
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["kept_sample"] == "last"


def test_clean_row_purifies_the_demos_clean_subset_beside_its_clean_victims(inputs, tmp_path):
    """(B)'s ``clean`` row: DataElixir's rounds over the demo's clean subset (the images its
    clean victims train on; no poisoned set needed), and the demo's clean victims beside it."""
    root, eclipse, elixir, overlay = inputs
    assert xp.parse_poisons("all")[0] == "clean" and xp.parse_poisons("clean,EM") == ("clean", "EM")
    ct = _ct(inputs, tmp_path, attacks=(), poisons=("clean",))
    steps = {s.key: s for s in xp.build_steps(ct)}  # no clean.pkl is asked for
    cmd = steps["clean dataelixir"].cmd
    assert cmd[cmd.index("--clean_subset") + 1] == "16" and "xt-clean-elixir-s0" in steps["clean elixir s0"].cmd
    out = elixir_purify(tmp_path, "clean", eclipse, elixir, overlay, subset=16, device="cpu", log=lambda m: None)
    purified, (clean, _) = read_eclipse_pkl(out), load_poisoned(eclipse, "clean", subset=16)
    assert torch.equal(purified.labels, clean.labels) and not torch.equal(purified.images, clean.images)
    made = json.loads(out.with_suffix(".json").read_text())
    assert made["settings"]["images"] == xp.elixir_images(eclipse, "clean", 16) and "16 images" in made["source"]
    assert steps["clean dataelixir"].stored.values["images"] == made["settings"]["images"]
    for name, acc in (("demo-clean", 60.0), ("demo-clean-eclipse", 58.0)):
        (eclipse / "runs/train" / name).mkdir(parents=True)
        settings = _demo_settings() | ({} if name.endswith("eclipse") else {"pure": False})
        (eclipse / "runs/train" / name / "result.json").write_text(
            json.dumps({"settings": settings, "final_test_acc": acc})
        )
    mine = tmp_path / "runs/train/xt-clean-elixir-s0/result.json"
    mine.parent.mkdir(parents=True)
    mine.write_text(json.dumps({"final_test_acc": 55.0}))
    (row,) = poison_rows(tmp_path, eclipse, ["clean"], 1, ct.recipe)
    cells = row["cells"]
    assert (cells["clean"]["mean"], cells["none"]["mean"], cells["eclipse"]["mean"]) == (60.0, 60.0, 58.0)


def test_asr_and_ra_are_the_attack_scripts_own(inputs, tmp_path):
    """The backdoored model of a tiny attack run, measured by backdoor_metrics, gives the BA /
    ASR / RA its record logged after training."""
    root, eclipse, elixir, overlay = inputs
    argv = ["--yaml_path", "config/badnet/cifar10.yaml", "--overlay", overlay, "--work_dir", str(tmp_path)]
    argv += ["--epochs", "6", "--batch_size", "10", "--lr", "0.02", "--pratio", "0.1"]  # predictions that vary
    run_attack_then_defence("badnet", [*argv, "--save_folder_name", "ref", "--stop_after", "backdoor_training"])
    rec = tmp_path / "record" / "ref"
    cfg = FlowConfig.from_dict(yaml.safe_load((rec / "config.yaml").read_text()))
    model = load_model(cfg, rec / "backdoored_model.pt", torch.device("cpu"))
    bd, _ = load_attack_data(rec / "attack_data.pt")
    bf16 = cfg.precision_of("backdoor_training") == "bf16"
    ours = backdoor_metrics(model, bd, torch.device("cpu"), bf16)
    logged = last_metrics(json.loads((rec / "backdoored_history.json").read_text()))
    for m in ("BA", "ASR", "RA"):  # one image of slack: the saved weights run in another memory layout
        assert abs(ours[m] - logged[m]) <= 100 / len(bd.test_bd) + 1e-9, (m, ours, logged)
