"""``pip install otmdr`` gives torch and numpy only: the optimizers work with them, and every CLI
command without the ``train`` extra says what to install (one line, exit 2) instead of dying in an
import. The extras are hidden here by blocking their imports in a subprocess; ``.ci/wheel_smoke.sh``
checks the same on the built wheel in a fresh virtual environment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from otmdr.cli.entry import TRAIN_EXTRA

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
OPTIONAL = sorted({*TRAIN_EXTRA, "skimage", "cv2", "wand", "autoattack", "pytorch_optimizer", "lightning",
                   "torchmetrics", "hypothesis"})


def _core_only(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which no optional package can be imported."""
    block = f"import sys\nfor _m in {OPTIONAL!r}:\n    sys.modules[_m] = None\n"
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, timeout=120,
                          check=False, cwd=cwd)


def _cli_core_only(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return _core_only(f"from otmdr.cli import main\nsys.exit(main({args!r}))", cwd)


def test_the_optimizers_work_with_the_core_dependencies_only(tmp_path):
    result = _core_only(
        "import torch, otmdr\n"
        "from otmdr import OTMDR\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Linear(4, 3)\n"
        "x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))\n"
        "before = model.weight.detach().clone()\n"
        "opt = OTMDR(model, torch.optim.SGD, lr=0.1)\n"
        "result = opt.step(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), batch=(x, y))\n"
        "assert not torch.equal(before, model.weight) and torch.isfinite(torch.as_tensor(result.loss))\n"
        f"loaded = sorted(m for m, module in sys.modules.items()\n"
        f"                if module is not None and m.split('.')[0] in {OPTIONAL!r})\n"
        "print(otmdr.__version__, loaded)\n", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("[]")


@pytest.mark.parametrize("args", [
    ["train", "--config", str(DEMO), "--out", "run"],
    ["eval", "some.pt"],
    ["compare", "--config", str(DEMO), "--out", "study"],
    ["models"],
    ["datasets"],
    ["corrupt", "--dataset", "digits", "--out", "copy"],
    ["sharpness", "some.pt"],
    ["landscape", "some.pt", "--out", "surface.png"],
    ["config"],
], ids=lambda args: args[0])
def test_every_command_without_the_train_extra_is_one_line_naming_the_install(tmp_path, args):
    result = _cli_core_only(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"otmdr: error: otmdr {args[0]} needs the train extra")
    assert "pip install 'otmdr[train]'" in result.stderr and "pyyaml" in result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []  # nothing made


def test_help_and_version_need_the_core_only(tmp_path):
    import otmdr

    assert _cli_core_only(["--help"], tmp_path).stdout.startswith("usage: otmdr")
    version = _cli_core_only(["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"otmdr {otmdr.__version__}"


def test_the_guard_lists_exactly_the_train_extra():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[; ]", requirement)[0].lower()
                for requirement in project["optional-dependencies"]["train"]}
    assert declared == set(TRAIN_EXTRA.values())
    assert {re.split(r"[<>=!~\[; ]", requirement)[0].lower() for requirement in project["dependencies"]} == {
        "torch", "numpy"}


def test_one_version_read_by_pyproject_and_named_by_the_changelog():
    tomllib = pytest.importorskip("tomllib")
    import otmdr

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "otmdr._version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+)?", otmdr.__version__)
    headings = [line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## ")]
    assert otmdr.__version__ in headings[0]  # the newest section is this version
