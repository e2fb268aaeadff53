"""Every bad input is one line on stderr naming the problem and the fix, exit status 2, no
traceback, nothing that existed before changed, and no partial artefact left behind."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest

from otmdr.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
FAST = ["--set", "train.epochs=1", "--set", "train.progress=false", "--set", "model.options={hidden: [16]}"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained run, a corrupted checkpoint, odd files and folders, shared by every case."""
    base = tmp_path_factory.mktemp("world")
    run = base / "run"
    assert main(["train", "--config", DEMO, "--out", str(run)] + FAST) == 0
    (base / "bad.yaml").write_text("data:\n  name: digits\n batch: [\n")
    (base / "random.yaml").write_bytes(bytes(range(256)) * 3)
    (base / "list.yaml").write_text("- 1\n- 2\n")
    (base / "afile").write_text("not a folder")
    (base / "folder").mkdir()
    (base / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    (base / "notckpt.pt").write_bytes(b"hello")
    (base / "empty").mkdir()
    nonempty = base / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("mine")
    stale = base / "stale"  # a run folder without checkpoints or config
    stale.mkdir()
    (stale / "notes.txt").write_text("x")
    return base


T = "train --config {demo} --out {new}".split()
C = "compare --config {demo} --out {new}".split()
CASES = [
    # config files
    ("train --config {base}/missing.yaml --out {new}", "does not exist"),
    ("train --config {base}/random.yaml --out {new}", "not a text file"),
    ("train --config {base}/bad.yaml --out {new}", "line 3, column 2"),
    ("train --config {base}/list.yaml --out {new}", "must hold a mapping"),
    ("train --config {base}/folder --out {new}", "does not exist"),
    # config keys and values
    ("train --config {demo} --out {new} --set bogus.key=1", "unknown config key bogus"),
    ("train --config {demo} --out {new} --set optim.lrr=0.1", "did you mean optim.lr"),
    ("train --config {demo} --out {new} --set optim.lr=fast", "optim.lr: expected a number"),
    ("train --config {demo} --out {new} --set optim.lr=-1", "optim.lr: must be >= 0"),
    ("train --config {demo} --out {new} --set optim.lr=1/0", "optim.lr: expected a number"),
    ("train --config {demo} --out {new} --set sam.rho=inf", "sam.rho: expected a finite number"),
    ("train --config {demo} --out {new} --set sam.rho=.nan", "sam.rho: expected a finite number"),
    ("train --config {demo} --out {new} --set otmdr.rho=[0.1,.inf]", "otmdr.rho[1]"),
    ("train --config {demo} --out {new} --set otmdr.rho=0.05,0.1", "write a list in brackets: otmdr.rho=[0.05,0.1]"),
    ("train --config {demo} --out {new} --set otmdr.rho=[-0.1,0.1]", "rho must be non-negative"),
    ("train --config {demo} --out {new} --set otmdr.split=[0.7,0.7]", "sum to at most 1"),
    ("train --config {demo} --out {new} --set otmdr.split=[1.0]", "one fraction per ascent step"),
    ("train --config {demo} --out {new} --set otmdr.normalize=sideways", "otmdr.normalize"),
    ("train --config {demo} --out {new} --set otmdr.reduce=max", "otmdr.reduce"),
    ("train --config {demo} --out {new} --set otmdr.particle_reduce=max", "otmdr.particle_reduce"),
    ("train --config {demo} --out {new} --set otmdr.particles=0", "otmdr.particles: must be in [1, 1024]"),
    ("train --config {demo} --out {new} --set otmdr.merge=maybe", "otmdr.merge: expected true or false"),
    ("train --config {demo} --out {new} --set otmdr.bn_policy=some", "otmdr.bn_policy"),
    ("train --config {demo} --out {new} --set data.val_fraction=1.0", "data.val_fraction"),
    ("train --config {demo} --out {new} --set data.label_noise=1.0", "data.label_noise"),
    ("train --config {demo} --out {new} --set data.label_noise_kind=asym", "data.label_noise_kind"),
    ("train --config {demo} --out {new} --set data.batch_size=0", "data.batch_size: must be >= 1"),
    ("train --config {demo} --out {new} --set data.batch_size=1.5", "data.batch_size: expected an integer"),
    ("train --config {demo} --out {new} --set train.epochs=0", "train.epochs: must be in [1, 100000]"),
    ("train --config {demo} --out {new} --set train.precision=fp8", "train.precision"),
    ("train --config {demo} --out {new} --set train.device=tpu", "train.device"),
    ("train --config {demo} --out {new} --set train.device=cuda", "CUDA is not available"),
    ("train --config {demo} --out {new} --set train.label_smoothing=1.5", "train.label_smoothing"),
    ("train --config {demo} --out {new} --set model.name=nonexistent", "unknown model"),
    ("train --config {demo} --out {new} --set model.options={{bogus:1}}", "model.options"),
    ("train --config {demo} --out {new} --set data.name=nonexistent", "data.name"),
    ("train --config {demo} --out {new} --set optim.method=adamw", "optim.method"),
    ("train --config {demo} --out {new} --set optim.base=lion", "optim.base"),
    ("train --config {demo} --out {new} --set schedule.name=linear", "schedule.name"),
    ("train --config {demo} --out {new} --set ensemble.regime=solo", "ensemble.regime"),
    ("train --config {demo} --out {new} --set eval.ece_bins=0", "eval.ece_bins: must be in [1, 1000]"),
    ("train --config {demo} --out {new} --set optim", "must look like section.key=value"),
    ("train --config {demo} --out {new} --set optim=5", "must be a mapping"),
    # data
    ("train --config {demo} --out {new} --set data.name=fashion-mnist --set data.dir={base}/missing", "fashion-mnist"),
    ("train --config {demo} --out {new} --set data.name=fashion-mnist --set data.dir={base}/empty", "fashion-mnist"),
    ("train --config {demo} --out {new} --set data.name=cifar10 --set data.dir={base}/afile", "cifar10"),
    ("train --config {demo} --out {new} --set data.name=imagefolder --set data.dir={base}/empty", "imagefolder"),
    # output folders and resume
    ("train --config {demo} --out {base}/afile", "is a file, not a folder"),
    ("train --config {demo} --out {base}/nonempty", "already exists and is not empty"),
    ("train --config {demo} --out {run}", "already exists and is not empty"),
    ("train --resume {base}/missing", "nothing to resume"),
    ("train --resume {base}/stale", "nothing to resume"),
    ("train --resume {run} --config {demo}", "drop --config"),
    ("train --resume {run} --epochs 5", "drop --config"),
    ("train --config {demo} --out {new} --epochs 0", "--epochs: must be in [1, 100000]"),
    # evaluation
    ("eval {base}/missing", "does not exist"),
    ("eval {base}/corrupt.pt", "corrupted or not an otmdr checkpoint"),
    ("eval {base}/notckpt.pt", "corrupted or not an otmdr checkpoint"),
    ("eval {base}/empty", "holds no checkpoints/last.pt"),
    ("eval {run} --json {base}/folder", "is a folder"),
    ("eval {run} --attack pgd --plot {base}/folder", "is a folder"),
    ("eval {run} --attack pgd --eps big", "--eps"),
    ("eval {run} --attack pgd --eps 1/0", "--eps"),
    ("eval {run} --corruptions sunshine", "--corruptions"),
    ("eval {run} --corruptions all --severities 9", "--corruptions/--severities"),
    ("eval {run} --test-limit 0", "--test-limit: must be >= 1"),
    ("eval {run} --device cuda", "CUDA is not available"),
    ("eval {run} --device nonsense", "is not a device"),
    ("sharpness {base}/missing", "does not exist"),
    ("sharpness {run} --json {base}/folder", "is a folder"),
    ("landscape {base}/corrupt.pt --out {new}", "corrupted"),
    ("corrupt --dataset digits --out {new} --limit 0", "--limit: must be >= 1"),
    ("corrupt --dataset digits --out {new} --corruptions sunshine", "--corruptions"),
    ("corrupt --dataset nonexistent --out {new}", "nonexistent"),
    # comparisons
    ("compare --config {demo} --out {new} --methods bogus", "--methods"),
    ("compare --config {demo} --out {new} --methods sgd,sgd", "listed twice"),
    ("compare --config {demo} --out {new} --seeds 0", "--seeds: must be in [1, 1000]"),
    ("compare --config {demo} --out {new} --jobs 0", "--jobs: must be in [1, 256]"),
    ("compare --config {demo} --out {new} --reference asam", "--reference"),
    ("compare --config {demo} --out {new} --grid sam.rho=", "--grid"),
    ("compare --config {demo} --out {new} --grid sam.rhoo=0.1,0.2", "did you mean sam.rho"),
    ("compare --config {demo} --out {new} --grid asam.rho=0.1,0.2", "not in --methods"),
    ("compare --config {demo} --out {new} --grid sam:otmdr.rho=0.1,0.2", "does not apply to method sam"),
    ("compare --config {demo} --out {new} --search-set train.epochs=1", "--search-set"),
    ("compare --config {demo} --out {base}/afile", "is a file, not a folder"),
    ("compare --config {demo} --out {base}/nonempty", "already exists and is not empty"),
    ("compare --config {demo} --out {new} --set sam.rho=inf", "sam.rho"),
    # absurd numbers (issue 29 rows 6-8): every bound is declared once, next to its config field,
    # and the options that mirror a key use the same declaration; nothing is created
    ("train --config {demo} --out {new} --set data.crop_padding=1000000000000", "data.crop_padding: must be in [0, "),
    ("train --config {demo} --out {new} --set data.cutout=1000000000000", "data.cutout: must be in [0, "),
    ("train --config {demo} --out {new} --set train.threads=1000000000000", "train.threads: must be in [1, "),
    ("train --config {demo} --out {new} --set eval.ece_bins=1000000000000", "eval.ece_bins: must be in [1, 1000]"),
    ("train --config {demo} --out {new} --set model.options={{hidden:[-1]}}", "hidden[0] must be"),
    ("train --config {demo} --out {new} --set model.options={{hidden:[1000000000000]}}", "hidden[0] must be"),
    ("train --config {demo} --out {new} --set model.options={{hidden:[16,0]}}", "hidden[1] must be"),
    ("train --config {demo} --out {new} --set model.name=lenet --set model.options={{\"width\":0}}", "width must be"),
    ("train --config {demo} --out {new} --set model.name=lenet --set model.options={{\"width\":16000}}",
     "parameters, more than 2,147,483,648"),
    ("sharpness {run} --samples 0", "--samples: must be >= 1"),
    ("sharpness {run} --batch-size 0", "--batch-size: must be >= 1"),
    ("landscape {run} --out {new} --points 0", "--points: must be in [2, "),
    ("landscape {run} --out {new} --points 1", "--points: must be in [2, "),
    ("landscape {run} --out {new} --points 1000000000000", "--points: must be in [2, "),
    ("landscape {run} --out {new} --samples 0", "--samples: must be >= 1"),
    ("eval {run} --ece-bins 1000000000000", "--ece-bins: must be in [1, 1000]"),
    ("eval {run} --ece-bins 0", "--ece-bins: must be in [1, 1000]"),
    ("eval {run} --ece-bins 1e12", "--ece-bins: expected an integer"),
    ("compare --config {demo} --out {new} --seeds 1000000000000", "--seeds: must be in [1, "),
    ("compare --config {demo} --out {new} --jobs 1000000000000", "--jobs: must be in [1, "),
    ("compare --config {demo} --out {new} --set train.seed=4294967295", "--seeds"),
    # accepted without complaint before (issue 29)
    ("train --config {demo} --out {new} --set schedule.milestones=[-1]", "schedule.milestones[0]: must be > 0"),
    ("train --config {demo} --out {new} --set train.seed=-1", "train.seed: must be in [0, 4294967295]"),
    ("train --config {demo} --out {new} --seed -1", "--seed: must be in [0, 4294967295]"),
    ("train --config {demo} --out {new} --set train.seed=100000000000000000000", "train.seed: must be in [0, "),
    ("train --config {demo} --out {new} --set data.label_noise_seed=-1", "data.label_noise_seed: must be in [0, "),
    ("train --config {demo} --out {new} --set model.options={{hidden:[0]}}", "hidden[0] must be"),
    ("train --config {demo} --out {new} --set train.epochs=1000000", "train.epochs: must be in [1, 100000]"),
    ("train --config {demo} --out {new} --epochs 1000000", "--epochs: must be in [1, 100000]"),
    ("train --config {demo} --out {new} --set otmdr.particles=1000000", "otmdr.particles: must be in [1, 1024]"),
    ("train --config {demo} --out {new} --set bayes.test_samples=1000000", "bayes.test_samples: must be in [1, "),
    ("train --config {demo} --out {new} --set optim.momentum=1.5", "optim.momentum: must be in [0, 1)"),
    ("train --config {demo} --out {new} --set optim.max_grad_norm=0", "optim.max_grad_norm: must be > 0"),
    ("sharpness {run} --rho -1", "--rho: must be >= 0"),
    ("sharpness {run} --rho nan", "--rho: must be a finite number"),
    ("sharpness {run} --iterations 0", "--iterations: must be in [1, "),
    ("sharpness {run} --probes 0", "--probes: must be in [1, "),
    ("landscape {run} --out {new} --span nan", "--span: must be a finite number"),
    ("landscape {run} --out {new} --span 0", "--span: must be in (0, "),
    ("eval {run} --attack fgsm --eot 0", "--eot: must be in [1, "),
    ("eval {run} --attack pgd --eot 0", "--eot: must be in [1, "),
    ("eval {run} --attack pgd --steps 0", "--steps: must be in [1, "),
    ("eval {run} --corruptions all --corruption-seed -1", "--corruption-seed: must be in [0, "),
    ("corrupt --dataset digits --out {new} --seed -1", "--seed: must be in [0, "),
    ("compare --config {demo} --out {new} --dist-timeout 0", "--dist-timeout: must be > 0"),
]


def _snapshot(base: Path) -> dict[str, str]:
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(base.rglob("*")) if p.name != ".lock"}


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("command, message", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_clear_line(world, tmp_path, capsys, command, message):
    new = tmp_path / "new-output"
    args = command.format(demo=DEMO, base=world, run=world / "run", new=new).split()
    before = _snapshot(world)
    assert main(args) == 2  # an option refused while parsing too: main returns, never exits
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("otmdr: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert _snapshot(world) == before  # nothing that existed changed
    assert not new.exists()  # no partial artefact


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "No space left on device"), (errno.EACCES, "Permission denied"),
                                         (errno.EROFS, "Read-only file system")])
def test_filesystem_errors_while_writing_are_one_line(tmp_path, capsys, monkeypatch, code, words):
    """A full disk, a folder without write permission, a read-only file system (simulated: the
    tests run as root on some machines, where permissions do not bind)."""
    import otmdr._atomic as atomic

    def failing(path, write, **options):  # options: durable=
        raise OSError(code, words, str(path))

    monkeypatch.setattr(atomic, "atomic_write", failing)
    import otmdr.train.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "atomic_write", failing)
    out = tmp_path / "run"
    assert main(["train", "--config", DEMO, "--out", str(out)] + FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def test_resuming_with_another_runs_checkpoint_is_refused(world, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    assert main(["train", "--config", DEMO, "--out", str(other), "--set", "optim.method=sgd"] + FAST) == 0
    mine = tmp_path / "mine"
    shutil.copytree(world / "run", mine)
    (mine / "summary.json").unlink()
    shutil.copy(other / "checkpoints" / "last.pt", mine / "checkpoints" / "last.pt")
    before = _snapshot(mine)
    capsys.readouterr()
    assert main(["train", "--resume", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belongs to another run" in err[0]
    assert _snapshot(mine) == before


@pytest.mark.parametrize("layout", ["empty class", "one class"])
def test_image_folders_that_cannot_train_are_refused(tmp_path, capsys, layout):
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    root = tmp_path / "images"
    classes = ["cat", "dog"] if layout == "empty class" else ["cat"]
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            if layout == "empty class" and cls == "dog":
                continue
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    out = tmp_path / "run"
    args = ["train", "--config", DEMO, "--out", str(out), "--set", "data.name=imagefolder", "--set",
            f"data.dir={root}", "--set", f"data.cache_dir={tmp_path / 'cache'}"] + FAST
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("hold no" in err[0] if layout == "empty class" else "at least 2" in err[0])
    assert not out.exists()


@pytest.mark.parametrize("made_by_user", [False, True])
def test_compare_with_a_missing_data_directory_leaves_nothing_behind(tmp_path, capsys, made_by_user):
    """The data is first read by the first run, after the study folder exists: a failed start
    removes what it wrote (the folder itself only if this call created it)."""
    out = tmp_path / "study"
    if made_by_user:
        out.mkdir()
    code = main(["compare", "--config", str(ROOT / "configs" / "fashion-mnist-mlp.yaml"), "--data-dir",
                 str(tmp_path / "missing"), "--methods", "sgd", "--seeds", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]
    assert (out.is_dir() and not any(out.iterdir())) if made_by_user else not out.exists()
