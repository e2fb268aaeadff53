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
    ({"train": {"epochs": 0}}, "train.epochs: must be > 0"),
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
