"""One option declaration (utils.options.Key): the same type, range, choices and boolean
spellings whether a value comes from YAML, the attack command line, an argparse option
generated from the Key, or a trigger's parameters given from Python."""

from __future__ import annotations

import argparse

import pytest

from utils.dataelixir.triggers import coerce_params
from utils.fileio import UserError
from utils.options import BOOL_WORDS, ArgParser, Key, Range, add_keys_to_argparser, check, parse_bool, parse_config

KEYS = {
    "n": Key(5, "a count", range=Range(1)),
    "x": Key(0.5, "a fraction", range=Range(0, 1)),
    "mode": Key("a", "a mode", choices=("a", "b")),
    "flag": Key(False, "a switch"),
    "size": Key(None, "an optional size", int, nullable=True, range=Range(10)),
}


def from_argparse(*argv: str) -> argparse.Namespace:
    p = ArgParser()
    add_keys_to_argparser(p, KEYS)
    return p.parse_args(list(argv))


def from_attack_cli(tmp_path, *argv: str) -> dict:
    (tmp_path / "c.yaml").write_text("n: 5\n")
    cfg, _ = parse_config("prog", ["--yaml_path", str(tmp_path / "c.yaml"), *argv], KEYS)
    return cfg


def from_yaml(tmp_path, text: str) -> dict:
    (tmp_path / "c.yaml").write_text(text)
    cfg, _ = parse_config("prog", ["--yaml_path", str(tmp_path / "c.yaml")], KEYS)
    return cfg


@pytest.mark.parametrize(
    "name, text, value",
    [
        ("n", "3", 3),
        ("x", "0.25", 0.25),
        ("x", "1e-4", 1e-4),  # a number on the command line, though YAML 1.1 reads it as a string
        ("mode", "b", "b"),
        ("flag", "yes", True),
        ("size", "20", 20),
        ("size", "null", None),
    ],
)
def test_good_values_are_the_same_from_every_source(tmp_path, name, text, value):
    assert getattr(from_argparse(f"--{name}", text), name) == value
    assert from_attack_cli(tmp_path, f"--{name}", text)[name] == value
    assert coerce_params("t", KEYS, {name: text})[name] == value
    if name != "x" or text != "1e-4":
        assert from_yaml(tmp_path, f"{name}: {text}\n")[name] == value


@pytest.mark.parametrize(
    "name, text, must",
    [
        ("n", "0", "must be >= 1"),
        ("n", "many", "an integer"),
        ("x", "1.5", "must be in [0, 1]"),
        ("x", "nan", "must be in [0, 1]"),
        ("mode", "c", "must be a or b"),
        ("flag", "maybe", "a boolean"),
        ("size", "5", "must be >= 10"),
    ],
)
def test_bad_values_are_refused_alike_from_every_source(tmp_path, name, text, must):
    with pytest.raises(UserError) as e:
        from_argparse(f"--{name}", text)
    assert f"--{name}" in str(e.value) and must in str(e.value)
    with pytest.raises(UserError) as e:
        from_attack_cli(tmp_path, f"--{name}", text)
    assert f"{name} in --{name}" in str(e.value) and must in str(e.value)
    with pytest.raises(UserError) as e:
        coerce_params("t", KEYS, {name: text})
    assert f"t: {name} must" in str(e.value) and must in str(e.value)
    if text != "nan":  # YAML's NaN is spelled .nan
        with pytest.raises(UserError) as e:
            from_yaml(tmp_path, f"{name}: {text}\n")
        assert f"{name} in " in str(e.value) and must in str(e.value)


@pytest.mark.parametrize("word", [*BOOL_WORDS, "TRUE", " Off "])
def test_one_boolean_parser_accepts_the_same_spellings_everywhere(tmp_path, word):
    want = BOOL_WORDS[word.strip().lower()]
    assert parse_bool(word) is want
    assert from_argparse("--flag", word).flag is want
    assert from_attack_cli(tmp_path, "--flag", word)["flag"] is want
    assert coerce_params("t", KEYS, {"flag": word})["flag"] is want
    assert check(KEYS["flag"], word) is want
    (tmp_path / "c.yaml").write_text("n: 5\n")
    _, run = parse_config("prog", ["--yaml_path", str(tmp_path / "c.yaml"), f"--overwrite={word}"], KEYS)
    assert run.overwrite is want


def test_scripts_declare_their_options_as_keys():
    import purification
    import train
    import train_diffusion

    for script in (train, purification, train_diffusion):
        args = vars(script.parse_args([]))
        derived = {"run_name", "sparse_set"}  # filled in from the other options
        assert {k: v for k, v in args.items() if k not in derived} == {
            k: key.default for k, key in script.KEYS.items() if k not in derived
        }


def test_poison_defaults_are_the_declared_options():
    from utils.poisons import OPTIONS, POISONS

    for spec in POISONS.values():
        for name, key in spec.defaults.items():
            assert (key.type, key.range, key.choices, key.help) == (
                OPTIONS[name].type,
                OPTIONS[name].range,
                OPTIONS[name].choices,
                OPTIONS[name].help,
            )


def test_trigger_keys_carry_their_ranges():
    from utils.dataelixir.triggers import TRIGGERS

    with pytest.raises(UserError, match=r"lf: lf_sigma must be in \(0, 32\], got 0"):
        TRIGGERS["lf"]({"lf_sigma": 0})
    with pytest.raises(UserError, match="wanet: k must be in"):
        TRIGGERS["wanet"]({"k": "1"})
    assert TRIGGERS["wanet"]({"k": "8"}).params["k"] == 8
