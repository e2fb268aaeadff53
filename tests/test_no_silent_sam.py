"""OT-MDR with one ascent step on the whole batch (no noise, one particle) is SAM (ASAM with
adaptive scaling): it is refused under OT-MDR's name, in the class, the davda54 form, configs,
--set and --grid; SAM/ASAM themselves, genuine one-step OT-MDR variants and saved runs still work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from otmdr import ASAM, OTMDR, SAM
from otmdr.cli import main
from otmdr.config import ConfigError, config_from_dict, config_to_dict, load_config
from otmdr.optim.config import PerturbationConfig, sam_equivalent
from conftest import data, tiny_mlp

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


@pytest.mark.parametrize("options, method", [
    ({"rho": 0.05}, "SAM"),
    ({"rho": (0.05,)}, "SAM"),
    ({"rho": (0.1,), "preset": "release"}, "SAM"),
    ({"rho": 0.05, "split": (1.0,), "merge": False, "normalize": "step"}, "SAM"),
    ({"rho": 0.5, "adaptive": True, "adaptive_eta": 0.01}, "ASAM"),
])
def test_one_step_otmdr_is_refused_naming_the_method(options, method):
    with pytest.raises(ValueError, match=rf"one entry: OT-MDR with one ascent step on the whole batch is {method}; "
                                         rf"use {method}\(params, base, rho="):
        OTMDR(tiny_mlp(), torch.optim.SGD, lr=0.1, **options)


def test_the_davda54_form_is_refused_too():
    """davda54/sam users write rho=0.05 and call first_step/second_step: refused at construction,
    before a first_step could silently take SAM's step."""
    with pytest.raises(ValueError, match="is SAM"):
        OTMDR(tiny_mlp().parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    model = tiny_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)  # what it says to use instead
    x, y = data(16)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("options", [{"noise_std": 0.01}, {"particles": 2}, {"split": (0.5,)}, {"rho": (0.02, 0.04)}])
def test_one_step_variants_that_are_not_sam_still_build(options):
    rho = {"rho": (0.05,)} if "rho" not in options else {}
    opt = OTMDR(tiny_mlp(), torch.optim.SGD, lr=0.1, **rho, **options)
    assert sam_equivalent(opt.config) is None


def test_sam_and_asam_are_the_one_step_case():
    assert sam_equivalent(SAM(tiny_mlp(), torch.optim.SGD, rho=0.05, lr=0.1).config) == "SAM"
    assert sam_equivalent(ASAM(tiny_mlp(), torch.optim.SGD, lr=0.1).config) == "ASAM"
    assert sam_equivalent(PerturbationConfig(rho=(0.05,), noise_std=0.1)) is None


@pytest.mark.parametrize("override, fix", [
    ("otmdr.rho=0.05", "use method sam with sam.rho=0.05"),
    ("otmdr.rho=[0.05]", "otmdr.rho=[0.025,0.05]"),
    ("otmdr.preset=release", None),  # two entries: fine
])
def test_a_config_with_one_entry_is_refused(override, fix):
    if fix is None:
        assert load_config(None, [override]).otmdr.rho == [0.05, 0.1]
        return
    with pytest.raises(ConfigError, match=r"config key otmdr.rho: \[0.05\] has one entry, and OT-MDR with one ascent "
                                          r"step is SAM") as error:
        load_config(None, [override])
    assert fix in str(error.value) and "\n" not in str(error.value)


def test_adaptive_one_step_config_names_asam():
    with pytest.raises(ConfigError, match="is ASAM: use method asam with asam.rho=0.5 asam.adaptive_eta=0.01"):
        load_config(None, ["otmdr.rho=[0.5]", "otmdr.adaptive=true", "otmdr.adaptive_eta=0.01"])
    assert load_config(None, ["otmdr.rho=[0.05]", "otmdr.noise_std=0.01"]).otmdr.rho == [0.05]


@pytest.mark.parametrize("argv, words", [
    (["train", "--config", DEMO, "--set", "otmdr.rho=0.05"], "is SAM: use method sam with sam.rho=0.05"),
    (["compare", "--config", DEMO, "--grid", "otmdr.rho=0.1,0.2"], "bracket each value"),
    (["compare", "--config", DEMO, "--methods", "sgd,otmdr", "--set", "otmdr.rho=[0.05]"], "is SAM"),
])
def test_the_command_line_refuses_it_in_one_line(tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("otmdr: error: ") and "config key otmdr.rho" in err[0], err
    assert words in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def test_a_saved_run_that_ran_sam_under_otmdr_still_reads_and_builds():
    """Runs saved before the refusal hold otmdr.rho: [0.05]: they read (eval, resume) and build the
    optimizer they ran, SAM's step."""
    from otmdr.train.builders import build_optimizer

    saved = config_to_dict(load_config(None, []))
    saved["otmdr"]["rho"] = [0.05]
    cfg = config_from_dict(saved)
    model = tiny_mlp()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, SAM) and opt.config.rho == (0.05,)
