"""Config loading and validation: every error names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from otmdr.config import ConfigError, apply_overrides, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.train.epochs > 0


def test_overrides_are_parsed_as_yaml_and_nested():
    data = apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr=0.05", "otmdr.rho=[0.1, 0.2]", "train.progress=false"])
    cfg = config_from_dict(data)
    assert cfg.optim.lr == 0.05 and cfg.otmdr.rho == [0.1, 0.2] and cfg.train.progress is False


@pytest.mark.parametrize("data,message", [
    ({"optim": {"lrr": 0.1}}, "unknown config key optim.lrr; did you mean optim.lr"),
    ({"optimizer": {}}, "unknown config key optimizer"),
    ({"optim": {"lr": "fast"}}, "optim.lr: expected a number"),
    ({"optim": {"method": "adam-sam"}}, "optim.method: 'adam-sam' is not one of"),
    ({"train": {"epochs": 0}}, "train.epochs: must be in [1, 100000], got 0"),
    ({"train": {"epochs": 10**6}}, "train.epochs: must be in [1, 100000], got 1000000 (past 100000 epochs"),
    ({"train": {"seed": -1}}, "train.seed: must be in [0, 4294967295], got -1"),
    ({"schedule": {"milestones": [10, -1]}}, "schedule.milestones[1]: must be > 0, got -1.0"),
    ({"data": {"crop_padding": 10**12}}, "data.crop_padding: must be in [0, 128], got 1000000000000 (a padding"),
    ({"optim": {"max_grad_norm": 0}}, "optim.max_grad_norm: must be > 0, got 0.0"),
    ({"model": {"options": {"hidden": [16, 0]}}}, "model.options: mlp: hidden[1] must be a whole number of units in"),
    ({"model": {"options": {"hidden": [10**12]}}}, "model.options: mlp: hidden[0] must be"),
    ({"model": {"options": {"bogus": 1}}}, "model.options: mlp does not accept"),
    ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer"),
    ({"otmdr": {"rho": [0.05, -0.1]}}, "config section otmdr: rho must be non-negative"),
    ({"otmdr": {"split": [0.8, 0.8]}}, "sum to at most 1"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
    ({"train": {"device": "gpu"}}, "train.device"),
    ({"optim": 3}, "section optim must be a mapping"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace("[", "\\[")):
        config_from_dict(data)


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["optim.lr"])


def test_fractions_written_as_text():
    assert config_from_dict({"otmdr": {"noise_std": "1/100"}}).otmdr.noise_std == pytest.approx(0.01)


def test_otmdr_config_prints_every_key_annotated_as_valid_yaml(capsys):
    import yaml

    from otmdr.cli import main
    from otmdr.config import config_to_dict, load_config

    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == config_to_dict(load_config(None))
    keys = [line for line in out.splitlines() if line.startswith("  ")]
    assert sum("#" in line for line in keys) >= 0.8 * len(keys)
    assert "label_noise_kind: symmetric  # symmetric" in out and "normalize: merged  # merged" in out
    assert main(["config", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
                 "--set", "sam.rho=0.3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["sam"]["rho"] == 0.3


def test_renamed_key_asam_eta_is_read_as_adaptive_eta_with_a_warning():
    with pytest.warns(FutureWarning, match="asam.eta is now asam.adaptive_eta"):
        config = config_from_dict({"asam": {"eta": 0.2}})
    assert config.asam.adaptive_eta == 0.2
    assert config_from_dict({"asam": {"adaptive_eta": 0.3}}).asam.adaptive_eta == 0.3
    with pytest.raises(ConfigError, match="same setting"):
        config_from_dict({"asam": {"eta": 0.2, "adaptive_eta": 0.3}})


def test_every_number_has_a_declared_range():
    """Each int or float key (alone, optional or in a list) carries a Bound next to its field,
    except the optimizer's own rho and split, which PerturbationConfig checks."""
    import dataclasses
    import typing

    from otmdr.config import BOUNDS, ExperimentConfig

    numbers = set()
    for section in dataclasses.fields(ExperimentConfig):
        cls = typing.get_type_hints(ExperimentConfig)[section.name]
        for name, hint in typing.get_type_hints(cls).items():
            if {int, float} & set(typing.get_args(hint) or (hint,)) or any(
                    {int, float} & set(typing.get_args(arg)) for arg in typing.get_args(hint)):
                numbers.add(f"{section.name}.{name}")
    assert numbers - set(BOUNDS) == {"otmdr.rho", "otmdr.split"}


def test_otmdr_config_shows_every_range(capsys):
    from otmdr.cli import main
    from otmdr.config import BOUNDS

    assert main(["config"]) == 0
    out = capsys.readouterr().out
    lines, section = {}, ""
    for line in out.splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":")
        else:
            lines[f"{section}.{line.split(':')[0].strip()}"] = line
    for key, bound in BOUNDS.items():
        assert f"# {bound.text()}" in lines[key], (key, lines[key])
    assert "epochs: 10  # in [1, 100000]" in out and "val_fraction: 0.1  # in [0, 1); of the training set" in out
