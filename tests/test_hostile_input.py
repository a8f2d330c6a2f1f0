"""Hostile or accidental input is refused with one short line, quickly and without large
allocations: repeated YAML keys, YAML alias bombs, huge values quoted in errors, a
checkpoint of the other diffusion family, a state_dict holding a list, pickles declaring
more data than they hold, an uncreatable work folder, and files that are no checkpoint."""

from __future__ import annotations

import codecs
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import utils.data
from utils.data import IMAGE_BYTES, read_eclipse_pkl
from utils.diffusion.factory import load_diffusion_spec
from utils.fileio import UserError, load_state_dict_strict, safe_torch_load
from utils.options import MAX_YAML_BYTES, QUOTE_CHARS, BadValue, Key, coerce, from_text, load_yaml_file, parse_config
from utils.safe_pickle import safe_loads

REPO = Path(__file__).resolve().parents[1]
KEYS = {"pratio": Key(0.1), "epochs": Key(1), "milestones": Key([10, 20], type=list)}

BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefg", "bcdefgh")]
    + [f"milestones: [{','.join(['*h'] * 9)}]"]
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- 9b: repeated YAML keys


def test_repeated_yaml_key_names_the_file_the_key_and_both_lines(tmp_path):
    f = _write(tmp_path / "attack.yaml", "pratio: 0.1\nepochs: 3\npratio: 0.2\n")
    with pytest.raises(UserError) as e:
        load_yaml_file(f)
    assert str(e.value) == f"{f}: key 'pratio' is given twice (lines 1 and 3); keep one"


def test_repeated_key_in_an_overlay_or_a_nested_mapping_is_refused(tmp_path):
    base = _write(tmp_path / "base.yaml", "epochs: 2\n")
    overlay = _write(tmp_path / "overlay.yaml", "pratio: 0.1\n\n\npratio: 0.3\n")
    with pytest.raises(UserError, match=r"overlay\.yaml: key 'pratio' is given twice \(lines 1 and 4\)"):
        parse_config("t", ["--yaml_path", str(base), "--overlay", str(overlay)], KEYS)
    nested = _write(tmp_path / "nested.yaml", "model:\n  ch: 1\n  ch: 2\n")
    with pytest.raises(UserError, match=r"key 'ch' is given twice \(lines 2 and 3\)"):
        load_yaml_file(nested)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    f = _write(tmp_path / "m.yaml", "base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n")
    assert load_yaml_file(f)["use"] == {"x": 1, "y": 3}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "config").rglob("*.y*ml")))
def test_the_shipped_configurations_load_strictly(path):
    assert isinstance(load_yaml_file(REPO / path), dict)


# --------------------------------------------------------------------------- 15: alias bombs, huge values


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    f = _write(tmp_path / "bomb.yaml", BOMB)
    assert f.stat().st_size < 400
    with pytest.raises(UserError, match=r"bomb\.yaml: holds more than 100000 values once its aliases are expanded"):
        load_yaml_file(f)
    # on the command line it stays text: a list key refuses it with a short line
    assert from_text(KEYS["milestones"], BOMB) == BOMB
    with pytest.raises(UserError, match="--milestones: expected a list, got 'a: &a") as e:
        coerce("--milestones", KEYS["milestones"], from_text(KEYS["milestones"], BOMB), KEYS)
    assert len(str(e.value)) < 250


def test_a_yaml_alias_cycle_and_an_oversized_file_are_refused(tmp_path):
    with pytest.raises(UserError, match="an alias refers to the collection holding it"):
        load_yaml_file(_write(tmp_path / "cycle.yaml", "a: &x [1, *x]\n"))
    big = _write(tmp_path / "big.yaml", "# padding\n" * (MAX_YAML_BYTES // 10 + 1))
    with pytest.raises(UserError, match=rf"big\.yaml is {big.stat().st_size} bytes, more than a configuration holds"):
        load_yaml_file(big)


def test_the_attack_script_refuses_an_alias_bomb_with_one_line(tmp_path):
    f = _write(tmp_path / "bomb.yaml", BOMB)
    res = subprocess.run(
        [sys.executable, "attack/badnet.py", "--yaml_path", str(f), "--work_dir", str(tmp_path / "w")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=120,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [f"error: {f}: " + res.stderr.split(f"{f}: ", 1)[1].strip()]
    assert "alias" in res.stderr and len(res.stderr) < 300
    assert not (tmp_path / "w").exists()


def test_values_quoted_in_errors_are_cut():
    huge = list(range(10**5))
    with pytest.raises(UserError) as e:
        coerce("pratio", KEYS["pratio"], huge, KEYS, "a.yaml")
    assert len(str(e.value)) < 250 and "got [0, 1, 2" in str(e.value) and "..." in str(e.value)
    with pytest.raises(UserError) as e:
        coerce("epochs", Key(1, range=None, choices=(1, 2)), "x" * 10**6, KEYS)
    assert len(str(e.value)) < 250
    with pytest.raises(UserError) as e:
        coerce("pratio", KEYS["pratio"], "y" * 1000, KEYS)
    assert f"got '{'y' * (QUOTE_CHARS - 1)}..." in str(e.value) and len(str(e.value)) < 250


def test_bad_value_message_and_unknown_keys_are_cut(tmp_path):
    assert len(BadValue("a number", "z" * 10**5, type_error=True).message("--x")) < 150
    f = _write(tmp_path / "a.yaml", f"{'k' * 1000}: 1\n")
    with pytest.raises(UserError) as e:
        parse_config("t", ["--yaml_path", str(f)], KEYS)
    assert len(str(e.value)) < 300 and "unknown key 'kkk" in str(e.value)
    with pytest.raises(UserError) as e:
        parse_config("t", ["--yaml_path", str(_write(tmp_path / "b.yaml", "")), "--" + "q" * 5000, "1"], KEYS)
    assert len(str(e.value)) < 300 and "unknown option --qqq" in str(e.value)


# --------------------------------------------------------------------------- 16: checkpoints and pickles


def _state(cfg: str) -> dict[str, torch.Tensor]:
    return load_diffusion_spec(REPO / cfg).build_model().state_dict()


def test_a_checkpoint_of_the_other_family_is_named():
    unet = load_diffusion_spec(REPO / "config/eclipse/cpu.yml").build_model()
    with pytest.raises(UserError) as e:
        load_state_dict_strict(unet, _state("config/ddpm/cpu.yml"), "model000010.pt")
    msg = str(e.value)
    assert msg.startswith("model000010.pt does not match the configured model: expected an improved-diffusion UNet")
    assert "missing keys (e.g. time_embed.0.weight)" in msg and "unexpected keys (e.g. temb.dense.0.weight)" in msg
    assert msg.endswith("it looks like a DDPM checkpoint") and "\n" not in msg and len(msg) < 400
    ddpm = load_diffusion_spec(REPO / "config/ddpm/cpu.yml").build_model()
    with pytest.raises(UserError, match="expected a DDPM checkpoint.*it looks like an improved-diffusion UNet"):
        load_state_dict_strict(ddpm, _state("config/eclipse/cpu.yml"), "ema.pt")


def test_a_state_dict_holding_a_list_is_named():
    ddpm = load_diffusion_spec(REPO / "config/ddpm/cpu.yml").build_model()
    state = dict(_state("config/ddpm/cpu.yml"))
    state["conv_in.weight"] = [1, 2, 3]
    with pytest.raises(
        UserError, match=r"ema\.pt: expected a state_dict \(a dict of tensors\), but 'conv_in.weight' holds a list"
    ):
        load_state_dict_strict(ddpm, state, "ema.pt")


def test_a_pkl_declaring_more_images_than_it_holds_is_refused_before_allocating(tmp_path, monkeypatch):
    """A 2 MB file of 10^6 references to one image would need 3 GB; the limit is lowered here
    so that the test allocates little whatever the code does."""
    monkeypatch.setattr(utils.data, "MAX_SHARED_PIXEL_BYTES", 100 * IMAGE_BYTES)
    pair = (bytes(IMAGE_BYTES), 1)
    path = tmp_path / "shared.pkl"
    path.write_bytes(pickle.dumps([pair] * 2000, protocol=4))  # one image's bytes, referenced 2000 times
    assert path.stat().st_size < 10 * IMAGE_BYTES
    with pytest.raises(UserError, match=r"shared\.pkl: declares 2000 images \(6144000 bytes of pixels\) in a file of"):
        read_eclipse_pkl(path)
    path.write_bytes(pickle.dumps([pair] * 100, protocol=4))  # sharing within the limit is read
    assert len(read_eclipse_pkl(path)) == 100


class _BigArray:
    """What a numpy array pickles as, with a declared shape far beyond the data that follows."""

    def __reduce__(self):
        return (np.ndarray.__reduce__(np.zeros(1, np.uint8))[0], (np.ndarray, (10**4, IMAGE_BYTES), b"B"))


class _Hex:
    """``_codecs.encode`` with a codec that doubles the data at each nesting."""

    def __init__(self, inner):
        self.inner = inner

    def __reduce__(self):
        return (codecs.encode, (self.inner, "hex"))


def test_a_pickle_cannot_ask_for_more_than_it_holds(tmp_path):
    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps([(_BigArray(), 1)], protocol=2))
    with pytest.raises(UserError, match=r"big\.pkl: declares a numpy array of shape \(10000, 3072\)"):
        read_eclipse_pkl(path)
    with pytest.raises(UserError, match="refused _codecs.encode with encoding 'hex'"):
        safe_loads(pickle.dumps(_Hex(_Hex(b"x" * 64)), protocol=2))
    # what protocol 2 writes for bytes, and numpy arrays as pickled, still load
    img = np.arange(IMAGE_BYTES, dtype=np.uint8).reshape(32, 32, 3)
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps([(img, 3), (bytes(range(256)) * 12, 4)], protocol=2))
    assert read_eclipse_pkl(tmp_path / "ok.pkl").labels.tolist() == [3, 4]


def test_demo_names_a_work_folder_it_cannot_create(tmp_path, monkeypatch):
    import demo

    target = (tmp_path / "readonly" / "work").resolve()
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--plan", "--work_dir", str(target)])
    with pytest.raises(UserError, match=rf"cannot create the work folder {target} \(Permission denied\)"):
        demo.main()


# --------------------------------------------------------------------------- 17: files that are no checkpoint


@pytest.mark.parametrize(
    "content, what",
    [
        (b"\x95" + bytes(range(256)) * 4, "unrecognised bytes 95 00 01"),
        (np.random.default_rng(0).bytes(4096), "unrecognised bytes"),
        (b"model weights\nlearning rate 0.1\n", "a text file: 'model weights"),
        (b"", "the file is empty"),
        (b"PK\x03\x04" + bytes(100), "a damaged zip archive"),
        (pickle.dumps({"a": [1, 2]}, protocol=4), "a pickle torch cannot read"),
    ],
    ids=["bytes", "random", "text", "empty", "zip", "pickle"],
)
def test_a_file_that_is_no_checkpoint_says_so(tmp_path, content, what):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        safe_torch_load(path, "model checkpoint")
    msg = str(e.value)
    assert msg.startswith(f"cannot load model checkpoint {path}: not a torch checkpoint (") and what in msg, msg
    assert "code" not in msg and "weights_only" not in msg and "\n" not in msg


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo never > /tmp/should_not_exist",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_pickle_needing_other_globals_is_refused_as_code(tmp_path, zip_format):
    path = tmp_path / "evil.pt"
    if zip_format:
        torch.save({"w": _Exploit()}, path)
    else:
        path.write_bytes(pickle.dumps({"w": _Exploit()}, protocol=4))
    with pytest.raises(UserError) as e:
        safe_torch_load(path)
    msg = str(e.value)
    assert "refused: it needs the global posix.system" in msg and "could run code" in msg
    assert "not a torch checkpoint" not in msg and "weights_only" not in msg
    assert not os.path.exists("/tmp/should_not_exist")
