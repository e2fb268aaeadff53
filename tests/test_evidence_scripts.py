"""The issue-10 evidence scripts: the particles report's aggregation on hand-made summaries, the
robustness benchmark's choice of runs in a searched study, and the grids the shell scripts pass
(each must be a valid study for its methods). Nothing trains here."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from otmdr.config import config_to_dict, load_config
from otmdr.train.grid import parse_grid
from otmdr.train.study import Study, plan

ROOT = Path(__file__).resolve().parents[1]


def _module(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


particles = _module("benchmarks/evidence/particles.py")


def _summary(seed: int, acc: float, *, nll: float = 0.5, ece: float = 0.05, seconds: float = 2.0,
             passes: float = 2.0, epochs: int = 4, early_acc: float | None = None) -> dict:
    return {"method": "otmdr", "seed": seed, "test": {"accuracy": acc, "nll": nll, "ece": ece},
            "seconds_per_epoch": seconds, "passes_per_step": passes,
            "history": [{"epoch": e + 1, "seconds": seconds} for e in range(epochs)],
            "early_stopped": {"epoch": 2, "test": {"accuracy": acc if early_acc is None else early_acc,
                                                   "nll": nll, "ece": ece}}}


def test_particle_variants_are_equal_epochs_then_equal_compute():
    assert particles.variants([1, 2, 4], 40) == [(1, 40), (2, 40), (4, 40), (2, 20), (4, 10)]
    assert particles.variants([1, 2], 1) == [(1, 1), (2, 1)]  # no duplicate when E / K rounds to E


def test_particles_report_pairs_each_variant_with_k1_by_seed():
    results = {
        (1, 4): [_summary(0, 0.80), _summary(1, 0.82), _summary(2, 0.81)],
        (2, 4): [_summary(0, 0.81, passes=3.0, seconds=4.0), _summary(1, 0.83, passes=3.0, seconds=4.0),
                 _summary(2, 0.82, passes=3.0, seconds=4.0)],
        (2, 2): [_summary(2, 0.70, epochs=2), _summary(0, 0.70, epochs=2), _summary(1, 0.70, epochs=2)],
    }
    rows = {row["method"]: row for row in particles.paired_rows(results, (1, 4))}
    assert set(rows) == {"K=2, 4 ep", "K=2, 2 ep"}
    same = rows["K=2, 4 ep"]["accuracy (pp)"]  # +1 pp on every seed: a zero-width interval
    assert same.mean == pytest.approx(1.0) and same.n == 3 and same.verdict.startswith("better")
    paired = rows["K=2, 2 ep"]["accuracy (pp)"]  # paired by seed, not by list position
    assert paired.mean == pytest.approx(-11.0) and paired.low < paired.mean < paired.high
    assert paired.verdict == "worse"
    early = {row["method"]: row for row in particles.paired_rows(
        {(1, 4): [_summary(s, 0.8, early_acc=0.85) for s in range(3)],
         (4, 1): [_summary(s, 0.8, early_acc=0.8 + 0.01 * s) for s in range(3)]}, (1, 4), early=True)}
    assert early["K=4, 1 ep"]["accuracy (pp)"].mean == pytest.approx(-4.0)

    table = particles.variant_rows(results)
    assert table[0] == ["1", "4", "3", "81.00 ± 1.00", "0.5000 ± 0.0000", "5.00 ± 0.00", "2.00 ± 0.00",
                        "2.0 ± 0.0", "0.1 ± 0.0"]
    assert table[1][6:8] == ["4.00 ± 0.00", "3.0 ± 0.0"]
    report = particles.render_report({"noisy40": results}, (1, 4), rho=[0.025, 0.05],
                                     commands={"noisy40/K1-E4": ["otmdr", "compare", "--set", "otmdr.particles=1"]},
                                     invocation="python benchmarks/evidence/particles.py DATA", machine="Date: now")
    assert "## noisy40" in report and "K=2, 2 ep" in report and "worse" in report
    assert "Early-stopped" in report and "otmdr compare --set otmdr.particles=1" in report
    assert "best epoch per seed" in report and "95% CI" in report
    assert f"]({particles.figure_name('noisy40')})" in report


def test_particles_figure_draws_every_variant_at_its_compute(tmp_path):
    import matplotlib.image

    results = {(1, 4): [_summary(s, 0.80 + 0.01 * s) for s in range(3)],
               (2, 2): [_summary(s, 0.78, passes=3.0, epochs=2) for s in range(3)]}
    path = particles.plot_accuracy_against_compute(results, tmp_path / particles.figure_name("noisy40"))
    assert matplotlib.image.imread(path).shape[:2] == (456, 1140)  # 9.5 x 3.8 in at 120 dpi
    import matplotlib.pyplot as plt

    assert not plt.get_fignums()  # closed after saving


def test_particles_reads_the_committed_noisy_studys_radius():
    assert particles.study_rho() == [0.025, 0.05]


def _grids(script: str) -> tuple[str, list[str]]:
    """The --methods and --grid values of a shell script (GRID=(...) and METHODS=...)."""
    text = (ROOT / "benchmarks" / "evidence" / script).read_text()
    block = re.search(r"GRID=\((.*?)\)\n", text, re.S).group(1)
    words = shlex.split(block)
    grids = [words[i + 1] for i, w in enumerate(words) if w == "--grid"]
    methods = re.search(r"METHODS=(\S+)", text)
    return (methods.group(1) if methods else "sgd,sam,otmdr"), grids


@pytest.mark.parametrize("script, config", [("ensembles_fashion_mnist.sh", "ensemble-fashion-mnist-mlp-x3.yaml"),
                                            ("bnn_fashion_mnist.sh", "bnn-fashion-mnist.yaml")])
def test_the_evidence_grids_are_valid_studies(tmp_path, script, config):
    methods, specs = _grids(script)
    methods = methods.split(",")
    grid = parse_grid(specs, methods)
    study = Study(config_path=str(ROOT / "configs" / config), overrides=[], methods=methods, seeds=[0, 1, 2],
                  grid=grid, out=tmp_path, bn_policy="clean")
    search, _ = plan(study)  # builds every config
    sharp = [m for m in methods if not m.startswith("sgd")]
    assert all(len(grid[m]) >= 3 for m in sharp)
    assert len(search) == sum(len(points) for points in grid.values() if len(points) > 1)  # one point: no search
    assert {r.seed for r in search} == {1000}  # a search seed apart from the evaluation seeds
    if script.startswith("ensembles"):  # per-member gets its own, smaller radii
        assert grid["otmdr/per-member"] != grid["otmdr/joint"]
        assert min(r.config.otmdr.rho[0] for r in search if r.method == "otmdr/per-member") < \
            min(r.config.otmdr.rho[0] for r in search if r.method == "otmdr/joint")
        assert {r.config.ensemble.regime for r in search if r.method == "otmdr/per-member"} == {"per-member"}
    else:
        assert {r.config.otmdr.noise_std for r in search if r.method == "otmdr"} == {0.0, 1e-3, 3e-3}


def test_robustness_takes_the_chosen_search_run_as_the_first_seed(tmp_path):
    robustness = _module("benchmarks/robustness.py")
    study = tmp_path / "study"
    for name in ("search/sgd-joint-default", "search/otmdr-per-member-rho=0.01_0.02", "search/otmdr-per-member-rho=1_2",
                 "sgd-joint-seed1", "otmdr-per-member-seed1", "otmdr-per-member-seed2"):
        (study / name).mkdir(parents=True)
        (study / name / "summary.json").write_text("{}")
    points = [{"method": "sgd/joint", "setting": "default", "seed": 0, "chosen": True,
               "run_dir": "elsewhere/search/sgd-joint-default"},  # a path relative to another working directory
              {"method": "otmdr/per-member", "setting": "rho=[0.01,0.02]", "seed": 0, "chosen": True,
               "run_dir": str(study / "search" / "otmdr-per-member-rho=0.01_0.02")},
              {"method": "otmdr/per-member", "setting": "rho=[1,2]", "seed": 0, "chosen": False,
               "run_dir": str(study / "search" / "otmdr-per-member-rho=1_2")}]
    (study / "search" / "sam-joint-rho=1-seed1000").mkdir()  # searched apart from the evaluation seeds
    (study / "search" / "sam-joint-rho=1-seed1000" / "summary.json").write_text("{}")
    points.append({"method": "sam/joint", "setting": "rho=1", "seed": 1000, "chosen": True,
                   "run_dir": str(study / "search" / "sam-joint-rho=1-seed1000")})
    (study / "search.json").write_text(json.dumps(points))
    (study / "summaries.json").write_text(json.dumps({"sgd/joint": [{"seed": 0}, {"seed": 1}],
                                                      "otmdr/per-member": [{"seed": s} for s in (0, 1, 2)]}))
    groups = robustness._find_runs([str(study)])
    assert list(groups) == ["sgd-joint", "otmdr-per-member"]
    assert groups["sgd-joint"] == [study / "search" / "sgd-joint-default", study / "sgd-joint-seed1"]
    assert groups["otmdr-per-member"] == [study / "search" / "otmdr-per-member-rho=0.01_0.02",
                                          study / "otmdr-per-member-seed1", study / "otmdr-per-member-seed2"]


def test_robustness_refuses_a_folder_without_runs_in_one_line(tmp_path, capsys):
    robustness = _module("benchmarks/robustness.py")
    with pytest.raises(SystemExit) as stop:
        robustness._find_runs([str(tmp_path / "nothere")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_robustness_report_pairs_methods_by_seed():
    from otmdr.report.stats import paired_difference

    robustness = _module("benchmarks/robustness.py")

    def run(clean: float, mca: float, pgd: float) -> dict:
        return {"corruptions": {"clean": {"accuracy": clean}, "mean_corruption_accuracy": mca},
                "attack": {"robust_accuracy": {"0.031": pgd}}}

    evals = {"sgd": [run(0.80, 0.70, 0.10), run(0.82, 0.71, 0.12), run(0.81, 0.69, 0.11)],
             "sam": [run(0.85, 0.78, 0.50), run(0.86, 0.80, 0.49), run(0.87, 0.79, 0.52)]}
    sharp = {m: [{"top_hessian_eigenvalue": v} for v in values]
             for m, values in {"sgd": [20.0, 24.0, 22.0], "sam": [4.0, 3.0, 5.0]}.items()}
    lines = robustness._paired_section(evals, sharp, ["0.031"], with_mce=False)
    (row,) = [line for line in lines if line.startswith("| sam − sgd |")]
    expected = paired_difference([85.0, 86.0, 87.0], [80.0, 82.0, 81.0], higher_is_better=True)
    assert f"{expected.mean:+.2f} [{expected.low:+.2f}, {expected.high:+.2f}] better" in row
    assert row.count("better") == 4 and row.count("Holm: unchanged") == 3  # eigenvalue: lower is better
    assert "better; Holm: inconclusive with 3 seeds" in row  # clean accuracy: p 0.01-0.05 over 7 tests
    assert not any(line.startswith("| sgd − sam |") for line in lines)


def test_robustness_report_tests_equivalence_on_accuracy_and_adjusts_for_the_table():
    """The accuracy columns get TOST at the margin; mCE-free columns without a margin say "no
    difference detectable"; Holm over the table's tests can take back a raw verdict."""
    from otmdr.report.stats import paired_difference

    robustness = _module("benchmarks/robustness.py")

    def run(clean: float, pgd: float) -> dict:
        return {"corruptions": {"clean": {"accuracy": clean}, "mean_corruption_accuracy": clean - 0.1},
                "attack": {"robust_accuracy": {"0.031": pgd}}}

    clean = [0.800, 0.810, 0.820, 0.805, 0.815]
    evals = {"sgd": [run(c, 0.30) for c in clean],
             "sam": [run(c + d, 0.30 + e) for c, d, e in zip(clean, [0.0005, -0.0005, 0.0, 0.0003, -0.0002],
                                                                [0.004, 0.013, 0.0, 0.008, 0.006])]}
    sharp = {m: [{"top_hessian_eigenvalue": v} for v in [10.0, 12.0, 11.0, 9.0, 13.0]] for m in evals}
    lines = robustness._paired_section(evals, sharp, ["0.031"], with_mce=False, margin=0.5)
    (row,) = [line for line in lines if line.startswith("| sam − sgd |")]
    clean_cell, corruption_cell, pgd_cell, eigen_cell = row.strip("| ").split(" | ")[1:]
    assert "equivalent within ±0.50; Holm: unchanged" in clean_cell and "equivalent within ±0.50" in corruption_cell
    pgd = paired_difference([100 * (0.30 + e) for e in [0.004, 0.013, 0.0, 0.008, 0.006]], [30.0] * 5,
                            higher_is_better=True, margin=0.5)
    assert pgd.p_difference is not None and 0.01 < pgd.p_difference < 0.05  # raw "better" that 5 tests take back
    assert pgd_cell.startswith(f"{pgd.mean:+.2f} [") and "better; Holm: inconclusive with 5 seeds" in pgd_cell
    assert eigen_cell == "+0.00 [+0.00, +0.00] no difference detectable with 5 seeds; Holm: unchanged"
    assert any("Holm's correction over this table's 7 tests" in line for line in lines)


def test_robustness_report_tests_pgd_at_every_radius_so_a_floor_at_the_largest_hides_nothing():
    """At 8/255 both methods sit at 0% (as noisy CIFAR-10's ResNet-20s do): that column can only
    call them equivalent, while at 1/255 SAM is ahead; both columns are tested and counted in the
    Holm family."""
    robustness = _module("benchmarks/robustness.py")
    small, large = "0.00392156862745098", "0.03137254901960784"

    def run(clean: float, pgd_small: float) -> dict:
        return {"corruptions": {"clean": {"accuracy": clean}, "mean_corruption_accuracy": clean - 0.1},
                "attack": {"robust_accuracy": {small: pgd_small, large: 0.0}}}

    evals = {"sgd": [run(0.50, p) for p in (0.05, 0.06, 0.04, 0.05, 0.07)],
             "sam": [run(0.55, p) for p in (0.20, 0.23, 0.18, 0.21, 0.22)]}
    sharp = {m: [{"top_hessian_eigenvalue": v} for v in [10.0, 12.0, 11.0, 9.0, 13.0]] for m in evals}
    lines = robustness._paired_section(evals, sharp, [small, large], with_mce=False, margin=0.5)
    header = next(line for line in lines if line.startswith("| difference |"))
    assert header.split(" | ")[3:5] == ["PGD 1/255 (pp)", "PGD 8/255 (pp)"]
    (row,) = [line for line in lines if line.startswith("| sam − sgd |")]
    pgd_small, pgd_large = row.strip("| ").split(" | ")[3:5]
    assert pgd_small.startswith("+15.40 [") and "better; Holm: unchanged" in pgd_small
    assert pgd_large.startswith("+0.00 [+0.00, +0.00] equivalent within ±0.50")
    assert any("Holm's correction over this table's 9 tests" in line for line in lines)


def test_robustness_refuses_a_margin_that_is_not_positive_in_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/robustness.py"), str(tmp_path / "study"),
                             "--out", str(tmp_path / "out"), "--margin", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: --margin 0.0: an equivalence margin must be a positive number of points "
                             "(e.g. --margin 0.5)\n")
    assert not (tmp_path / "out").exists()
    not_a_number = subprocess.run([sys.executable, str(ROOT / "benchmarks/robustness.py"), str(tmp_path / "study"),
                                   "--out", str(tmp_path / "out"), "--margin", "half"], capture_output=True, text=True)
    assert not_a_number.returncode == 2 and not_a_number.stderr.count("\n") == 1
    assert "--margin: invalid float value: 'half'" in not_a_number.stderr
    assert not (tmp_path / "out").exists()


def test_committed_bnn_robustness_report_rebuilds_from_its_json_and_names_the_methods(tmp_path):
    """The committed Bayesian robustness report's paired verdict (quoted in docs/results.md) follows
    from its committed per-run JSON, and the report says that `sgd` there is SGVB."""
    import argparse
    import shutil

    robustness = _module("benchmarks/robustness.py")
    committed = ROOT / "benchmarks/results/bnn-fashion-mnist-lenet-clean/robustness"
    shutil.copytree(committed / "runs", tmp_path / "runs", ignore=shutil.ignore_patterns("*.log"))
    groups = {method: sorted((tmp_path / "runs").glob(f"{method}-*"), key=lambda r: "-seed" in r.name)
              for method in ("sgd", "sam", "otmdr")}
    args = argparse.Namespace(compare_dirs=["bnn-fashion-mnist-lenet-clean"], baseline_method="sgd", landscape=False,
                              margin=0.5)
    text = robustness.report(args, groups, tmp_path).read_text()
    assert "`sgd` is SGVB" in text and "`sam` is flat SGVB" in text and "the mean over 30 weight samples" in text
    assert "no second set was drawn" in text  # its Monte-Carlo error is not measured here: said so
    assert "## Sharpness of the posterior mean" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| otmdr − sgd |")]
    assert "+2.10 [+1.85, +2.35] better" in row and "-43.52 [-70.21, -16.84] better" in row
    assert "+2.10 [+1.85, +2.35]" in (ROOT / "docs/results.md").read_text()


def test_robustness_mce_from_the_baselines_own_evaluation_matches_eval_baseline(tmp_path):
    """The script no longer asks `otmdr eval --baseline` to evaluate the SGD run's corruptions again
    inside every run's evaluation; it divides by the SGD run's own eval.json. On the committed noisy
    Fashion-MNIST study (an MLP: deterministic), whose eval.json files were written with --baseline,
    the mCE and relative mCE rebuilt without their stored values are the committed report's."""
    import argparse
    import shutil

    robustness = _module("benchmarks/robustness.py")
    committed = ROOT / "benchmarks/results/fashion-mnist-mlp-noisy40-rerun/robustness"
    shutil.copytree(committed / "runs", tmp_path / "runs", ignore=shutil.ignore_patterns("*.log"))
    stripped = 0
    for path in (tmp_path / "runs").glob("*/eval.json"):
        result = json.loads(path.read_text())
        stripped += result["corruptions"].pop("mce", None) is not None
        path.write_text(json.dumps(result))
    assert stripped == 15  # every run but the five SGD baselines had one
    groups = {method: sorted((tmp_path / "runs").glob(f"{method}-seed*"))
              for method in ("sgd", "sam", "otmdr", "sgd_compute")}
    args = argparse.Namespace(compare_dirs=["fashion-mnist-mlp-noisy40"], baseline_method="sgd", landscape=False,
                              margin=0.5)
    rebuilt = robustness.report(args, groups, tmp_path).read_text()

    def mce_cells(text: str) -> list[list[str]]:  # the mCE and relative mCE columns of the first table
        return [line.split(" | ")[5:7] for line in text.splitlines()
                if line.startswith(("| sgd |", "| sam |", "| otmdr |", "| sgd_compute |"))][:4]
    assert mce_cells(rebuilt) == mce_cells((committed / "robustness.md").read_text())
    assert mce_cells(rebuilt)[1] == ["85.4 ± 1.4", "78.2 ± 12.7"]
    assert not any("--baseline" in command for command, *_ in robustness._tasks(
        argparse.Namespace(data_dir=None, test_limit=10, corruptions="all", severities="1-5", eps="8/255", pgd_steps=1,
                           eot=1, corrupted_dir=None, sharpness_samples=8, sharpness_iterations=1,
                           sharpness_probes=1, landscape=False, baseline_method="sgd", predictive_samples=None),
        {m: [tmp_path / "nowhere" / f"{m}-seed0"] for m in ("sgd", "sam")}, tmp_path / "out"))


def test_compare_report_names_the_bayesian_methods_only_for_a_bayesian_network(tmp_path):
    from otmdr.report import write_compare_report

    for study, bayesian in (("bnn-fashion-mnist-lenet-clean", True), ("ensembles-fashion-mnist-mlp-x3-clean", False)):
        summaries = json.loads((ROOT / "benchmarks/results" / study / "summaries.json").read_text())
        report = write_compare_report(tmp_path / study, summaries, command="otmdr compare", config_text="")
        assert ("`sgd` is SGVB" in report.read_text()) is bayesian


def test_regimes_select_part_of_a_study_and_refuse_unknown_ones(tmp_path):
    """REGIMES=noisy40 runs only the noisy compare (a clean study committed on another machine
    need not retrain); an unknown regime stops before any compare, with one line and exit 2."""
    import subprocess

    def run(regimes: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "OTMDR": "echo", "EVIDENCE_DIR": str(tmp_path), "REGIMES": regimes}
        return subprocess.run(["bash", str(ROOT / "benchmarks/evidence/bnn_fashion_mnist.sh"), "DATA", "2"],
                              env=env, capture_output=True, text=True)

    noisy = run("noisy40")
    compares = [line for line in noisy.stdout.splitlines() if line.startswith("compare ")]
    assert noisy.returncode == 0 and len(compares) == 1
    assert "--set data.label_noise=0.4" in compares[0]
    assert compares[0].endswith(f"{tmp_path}/bnn-fashion-mnist-lenet-noisy40")
    assert f"robustness_of_selected.sh DATA 2 {tmp_path}/bnn-fashion-mnist-lenet-noisy40" in noisy.stdout
    both = run("clean noisy40")
    assert sum(line.startswith("compare ") for line in both.stdout.splitlines()) == 2
    bad = run("noisy")
    assert bad.returncode == 2 and "compare" not in bad.stdout
    assert bad.stderr.strip().splitlines() == [
        "error: REGIMES: unknown regime 'noisy'; use clean, noisy40 or both (\"clean noisy40\")"]


@pytest.mark.parametrize("bad, named", [
    (["--data", "nothere"], "data directory"), (["--rho", "0.05,0.1"], "--rho"), (["--rho", "[0.05,"], "--rho"),
    (["--rho", "[-0.05,0.1]"], "--rho"), (["--rho", "[.nan]"], "--rho"), (["--particles", "2,4"], "--particles"),
    (["--particles", "1,two"], "--particles"), (["--particles", "0,1"], "--particles"), (["--jobs", "0"], "--jobs"),
    (["--seeds", "0"], "--seeds"), (["--epochs", "0"], "--epochs")])
def test_particles_refuses_bad_input_in_one_line_before_making_anything(tmp_path, monkeypatch, capsys, bad, named):
    """Each used to run 5 failing compares (or stop with a traceback / exit 1) and leave their logs."""
    out = tmp_path / "out"
    data = tmp_path / "data"
    if bad[0] == "--data":
        data, bad = tmp_path / bad[1], []
    else:
        data.mkdir()
    monkeypatch.setattr("sys.argv", ["particles.py", str(data), "--out", str(out), *bad])
    assert particles.main() == 2
    err = capsys.readouterr().err
    assert not out.exists() and err.count("\n") == 1 and err.startswith("error: ") and named in err


def _confound(tmp_path: Path, *extra: str, folders: dict[str, dict[str, list[dict]]] | None = None,
              data: str | None = None) -> subprocess.CompletedProcess:
    """schedule_confound.py with a stand-in otmdr that records its arguments and writes the
    summaries of the folder it trains into (step/ or cosine/) as `otmdr compare` would:
    ``folders[<folder>]`` where given, else every method at test accuracy 80% + seed / 10."""
    (tmp_path / "template.json").write_text(json.dumps(_template()))
    (tmp_path / "folders.json").write_text(json.dumps(folders or {}))
    fake = tmp_path / "otmdr"
    fake.write_text(f"""#!{sys.executable}
import json, sys, pathlib
args = sys.argv[1:]
pathlib.Path({str(tmp_path / 'args')!r}).write_text(json.dumps(args))
out = pathlib.Path(args[args.index("--out") + 1]); out.mkdir(parents=True, exist_ok=True)
template = json.loads(pathlib.Path({str(tmp_path / 'template.json')!r}).read_text())
folders = json.loads(pathlib.Path({str(tmp_path / 'folders.json')!r}).read_text())
runs = [dict(template, seed=s, test=dict(template["test"], accuracy=0.80 + s / 1000))
        for s in range(int(args[args.index("--seeds") + 1]))]
summaries = folders.get(out.name) or {{m: runs for m in args[args.index("--methods") + 1].split(",")}}
(out / "summaries.json").write_text(json.dumps(summaries))
""")
    fake.chmod(0o755)
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/evidence/schedule_confound.py"),
                           data or str(tmp_path), "--otmdr", str(fake), "--out", str(tmp_path / "confound"), *extra],
                          capture_output=True, text=True)


def _template() -> dict:
    """A committed run's summary, whose seed and test accuracy the stand-ins replace."""
    return json.loads((ROOT / "benchmarks/results/fashion-mnist-mlp-clean/summaries.json").read_text())["sam"][0]


def _runs(accuracy: list[float]) -> list[dict]:
    """Summaries of seeds 0, 1, ... at these test accuracies (the rest from a committed run)."""
    template = _template()
    return [dict(template, seed=s, test=dict(template["test"], accuracy=a)) for s, a in enumerate(accuracy)]


def test_the_schedule_confound_reuses_a_tuned_studys_cosine_runs(tmp_path):
    """--from-study: only SAM-step trains, with the study's SAM config and the step schedule at
    30/60/80% of its epochs; the cosine side is the study's own runs, paired by seed."""
    template = json.loads((ROOT / "benchmarks/results/fashion-mnist-mlp-clean/summaries.json").read_text())["sam"][0]
    study = tmp_path / "study"
    (study / "sam-seed0").mkdir(parents=True)
    config = config_to_dict(load_config(str(ROOT / "configs/cifar10-resnet20-study.yaml"), ["optim.lr=0.8",
                                                                                          "sam.rho=0.01"]))
    (study / "sam-seed0" / "config.yaml").write_text(yaml.safe_dump(config))
    runs = {m: [dict(template, seed=s, test=dict(template["test"], accuracy=base + s / 1000)) for s in (4, 2, 1, 0, 3)]
            for m, base in (("sam", 0.81), ("otmdr", 0.82), ("sgd", 0.5))}
    (study / "summaries.json").write_text(json.dumps(runs))
    result = _confound(tmp_path, "--from-study", str(study), "--seeds", "3")
    assert result.returncode == 0, result.stderr
    args = json.loads((tmp_path / "args").read_text())  # the last (and only) compare: SAM-step
    assert args[args.index("--config") + 1] == str(study / "sam-seed0" / "config.yaml")
    assert args[args.index("--methods") + 1] == "sam" and args[args.index("--seeds") + 1] == "3"
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert sets == ["schedule.name=step", "schedule.milestones=[9.0, 18.0, 24.0]", "schedule.gamma=0.2"]
    report = (tmp_path / "confound" / "report.md").read_text()
    assert "Gap OT-MDR-cosine − SAM-step: +2.00 [" in report  # 82 + s/10 against 80 + s/10, seeds 0-2
    assert "SAM-cosine − SAM-step (the schedule alone): +1.00" in report and "50%" in report


def test_the_schedule_confound_without_a_study_shows_what_seed_0_contributes(tmp_path):
    """Without --from-study all three train at the old study's radii, whose search chose them at
    seed 0; a seed-0 cosine run that carried that search's luck (here +6 points) must show in the
    verdict without seed 0."""
    lucky = {"step": {"sam": _runs([0.800, 0.801, 0.802, 0.803])},
             "cosine": {"sam": _runs([0.870, 0.811, 0.812, 0.813]), "otmdr": _runs([0.880, 0.821, 0.823, 0.823])}}
    result = _confound(tmp_path, "--seeds", "4", folders=lucky)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "confound" / "report.md").read_text()
    assert "sam.rho=0.02" in json.loads((tmp_path / "args").read_text())  # the last compare: the cosine side
    assert "Gap OT-MDR-cosine − SAM-step: +3.52 [" in report  # (2 x 4 + 6 + 0.1) / 4
    assert "SAM-cosine − SAM-step (the schedule alone): +2.50" in report
    assert "OT-MDR-cosine − SAM-cosine (the method at the same schedule): +1.02" in report
    assert "Paired differences against sam-cosine, final model" in report
    assert "Without seed 0 (" in report and "gap +2.03 [" in report and "schedule alone +1.00 [" in report
    assert "method at the same schedule +1.03 [" in report


def test_the_committed_schedule_confound_report_follows_from_its_runs(tmp_path):
    """The README and docs/results.md quote this report: rebuilt from the committed runs'
    summaries, every line but the command is the committed one."""
    committed = ROOT / "benchmarks/results/schedule-confound-cifar10-resnet20"
    folders = {name: json.loads((committed / name / "summaries.json").read_text()) for name in ("step", "cosine")}
    result = _confound(tmp_path, "--seeds", "5", folders=folders)
    assert result.returncode == 0, result.stderr
    rebuilt = (tmp_path / "confound" / "report.md").read_text().splitlines()
    expected = (committed / "report.md").read_text().splitlines()
    assert len(rebuilt) == len(expected) and rebuilt[3:] == expected[3:]
    assert "SAM-cosine − SAM-step (the schedule alone): +3.55 [+2.55, +4.55] (better)" in rebuilt[-3]


def test_the_schedule_confound_refuses_an_unfinished_study_in_one_line(tmp_path):
    (tmp_path / "study").mkdir()
    result = _confound(tmp_path, "--from-study", str(tmp_path / "study"))
    assert result.returncode == 2 and "summaries.json does not exist" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "confound").exists()


@pytest.mark.parametrize("bad, named", [(["--seeds", "0"], "--seeds"), (["--seed", "3"], "did you mean --seeds"),
                                        (["--data-missing"], "does not exist")])
def test_the_schedule_confound_refuses_bad_input_in_one_line_before_making_anything(tmp_path, bad, named):
    data = str(tmp_path / "cifar10-jpeg.tar.gz") if bad == ["--data-missing"] else None
    result = _confound(tmp_path, *[a for a in bad if a != "--data-missing"], data=data)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and named in result.stderr, result.stderr
    assert not (tmp_path / "confound").exists() and not (tmp_path / "args").exists()  # otmdr never ran
    if named.startswith("did you mean"):  # argparse's own error names the script, not otmdr
        assert result.stderr.startswith("schedule_confound.py: error: unrecognized option --seed ")


def test_the_schedule_confound_stops_without_a_traceback_when_otmdr_compare_fails(tmp_path):
    fake = tmp_path / "otmdr"  # fails as otmdr does: one line, exit 2
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('otmdr: error: a bad key', file=sys.stderr)\nsys.exit(2)\n")
    fake.chmod(0o755)
    failed = subprocess.run([sys.executable, str(ROOT / "benchmarks/evidence/schedule_confound.py"), str(tmp_path),
                             "--otmdr", str(fake), "--out", str(tmp_path / "confound")], capture_output=True, text=True)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.splitlines() == ["otmdr: error: a bad key", "error: otmdr compare stopped with exit code 2 "
                                          "(its message is above); rerun the same command to continue"]


def _robustness_of_selected(tmp_path: Path, studies: list[Path], **extra: str) -> list[str]:
    """Run robustness_of_selected.sh on finished stand-in studies with otmdr and python faked:
    the command lines they were called with."""
    import os

    record, fake = tmp_path / "calls", tmp_path / "fake"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {record}\n')
    fake.chmod(0o755)
    for study in studies:
        study.mkdir(parents=True, exist_ok=True)
        (study / "report.md").write_text("finished\n")
    record.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("SMOKE", "BNN_SAMPLES", "DATASET")}
    env.update(OTMDR=str(fake), PYTHON=str(fake), EVIDENCE_DIR=str(tmp_path / "runs"), **extra)
    subprocess.run(["bash", str(ROOT / "benchmarks/evidence/robustness_of_selected.sh"), "DATA", "2",
                    *map(str, studies)], env=env, check=True, capture_output=True, text=True)
    return record.read_text().splitlines()


def test_robustness_of_selected_evaluates_bayesian_studies_through_fewer_draws(tmp_path):
    """robustness_of_selected.sh: a Bayesian study (bnn-*) is evaluated through BNN_SAMPLES draws
    (default 30; its 100-draw predictive would take 3.3 times as long), any other study through its
    own (deterministic) prediction, without the option."""
    studies = [tmp_path / "runs" / name for name in ("bnn-fashion-mnist-lenet-noisy40", "fashion-mnist-mlp-clean")]
    for extra, draws in (({}, "30"), ({"BNN_SAMPLES": "100"}, "100")):
        calls = _robustness_of_selected(tmp_path, studies, **extra)
        bnn, mlp = [line for line in calls if "benchmarks/robustness.py" in line]
        assert f"{studies[0]} " in bnn and f"--predictive-samples {draws} " in bnn
        assert f"{studies[1]} " in mlp and "--predictive-samples" not in mlp


def test_robustness_of_selected_evaluates_matched_studies_after_their_study_reusing_its_evaluations(tmp_path):
    """A study's matched-radius studies are evaluated after it, with --reuse of its robustness
    folder, and the corrupted copy is made of the dataset DATASET names (default fashion-mnist)."""
    study = tmp_path / "runs" / "cifar10-resnet20-noisy40"
    for matched in (Path(f"{study}-matched-sam"), Path(f"{study}-matched-otmdr")):
        matched.mkdir(parents=True)
        (matched / "report.md").write_text("finished\n")
    for extra, dataset in (({}, "fashion-mnist"), ({"DATASET": "cifar10-jpeg"}, "cifar10-jpeg")):
        calls = _robustness_of_selected(tmp_path, [study], **extra)
        assert calls[0].startswith(f"corrupt --dataset {dataset} --data-dir DATA --limit 1000 ")
        assert calls[0].endswith(f"--out {tmp_path}/runs/{dataset}-c1000")
        evaluated = [c for c in calls if "benchmarks/robustness.py" in c]
        assert [c.split()[1] for c in evaluated] == [str(study), f"{study}-matched-sam", f"{study}-matched-otmdr"]
        assert "--reuse" not in evaluated[0]
        assert all(f"--reuse {study}/robustness " in c for c in evaluated[1:])


def test_robustness_refuses_a_reuse_folder_that_is_not_one_in_one_line(tmp_path):
    """--reuse of a folder without runs/ (a typo, or the study instead of its robustness folder)
    is refused in one line before anything is made, instead of silently copying nothing."""
    (tmp_path / "study").mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/robustness.py"), str(tmp_path / "study"),
                             "--out", str(tmp_path / "out"), "--reuse", str(tmp_path / "study")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--reuse" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_robustness_reuses_evaluations_of_byte_identical_runs_only(tmp_path):
    """robustness.py --reuse: an evaluation is copied for a run whose config and checkpoints equal
    the evaluated run's (recording where from), not for one whose checkpoint differs in one byte,
    and never over an evaluation already there."""
    robustness = _module("benchmarks/robustness.py")

    def run(folder: Path, weights: bytes) -> Path:
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "config.yaml").write_text("optim: {lr: 0.1}\n")
        (folder / "checkpoints" / "last.pt").write_bytes(weights)
        (folder / "checkpoints" / "best.pt").write_bytes(b"best")
        return folder

    parent = {name: run(tmp_path / "study" / name, b"weights") for name in ("otmdr-seed0", "otmdr-seed1")}
    other = tmp_path / "study" / "robustness"
    for name, folder in parent.items():
        (other / "runs" / name).mkdir(parents=True)
        for piece in ("eval", "sharpness"):
            (other / "runs" / name / f"{piece}.json").write_text(json.dumps({"path": str(folder), "piece": piece}))
        (other / "runs" / name / "eval.log").write_text("log\n")
    same = run(tmp_path / "matched" / "otmdr-seed0", b"weights")
    changed = run(tmp_path / "matched" / "otmdr-seed1", b"weightz")
    out = tmp_path / "matched" / "robustness"
    assert robustness.reuse_evaluations({"otmdr": [same, changed]}, out, other) == 1
    copied = json.loads((out / "runs" / "otmdr-seed0" / "eval.json").read_text())
    assert copied == {"path": str(parent["otmdr-seed0"]), "piece": "eval",
                      "copied_from": str(other / "runs" / "otmdr-seed0" / "eval.json")}
    assert (out / "runs" / "otmdr-seed0" / "sharpness.json").is_file()
    assert (out / "runs" / "otmdr-seed0" / "eval.log").read_text() == "log\n"
    assert not (out / "runs" / "otmdr-seed1").exists()
    (out / "runs" / "otmdr-seed0" / "eval.json").write_text("{}")  # an evaluation already made stays
    assert robustness.reuse_evaluations({"otmdr": [same]}, out, other) == 0
    assert (out / "runs" / "otmdr-seed0" / "eval.json").read_text() == "{}"


def test_robustness_report_measures_the_monte_carlo_error_from_each_half_of_the_draws(tmp_path):
    """A Bayesian study's evaluations record each half of their draws' accuracies: the report
    gives the mean |half A − half B| per column and names each paired accuracy verdict that the
    two halves disagree on (here SAM's clean-accuracy gain holds in half A only)."""
    import argparse
    import shutil

    robustness = _module("benchmarks/robustness.py")

    def run(clean: list[float], mca: float, pgd: float) -> dict:
        return {"corruptions": {"clean": {"accuracy": sum(clean) / 2}, "mean_corruption_accuracy": mca,
                                "monte_carlo": {"samples": 30, "halves": [15, 15], "clean_accuracy": clean,
                                                "mean_corruption_accuracy": [mca, mca]}},
                "attack": {"robust_accuracy": {"0.031": pgd},
                           "monte_carlo": {"robust_accuracy": {"0.031": [pgd - 0.01, pgd + 0.01]}}}}

    sgd = [0.80, 0.81, 0.82, 0.80, 0.81]
    gain_b = [0.01, -0.01, 0.02, -0.02, 0.0]
    evals = {"sgd": [run([c, c], 0.7, 0.3) for c in sgd],
             "sam": [run([c + 0.02, c + g], 0.75, 0.4) for c, g in zip(sgd, gain_b)]}
    sharp = {m: [{"top_hessian_eigenvalue": 10.0 + i} for i in range(5)] for m in evals}
    assert robustness._split_halves(evals)
    lines = robustness._monte_carlo_section(evals, sharp, ["0.031"], 0.5)
    text = "\n".join(lines)
    assert "drew 30 weight samples per image" in text and "(15 and 15 draws)" in text
    mean_clean = sum(abs(0.02 - g) for g in gain_b) / 10 * 100  # SGD's halves agree: 0 for its 5 runs
    assert f"clean {mean_clean:.2f}; mean corruption 0.00; PGD 0.031 2.00" in text
    assert "1 of 3 differ:" in text
    assert lines[-1].startswith("- sam − sgd, clean accuracy (pp): better (")
    assert lines[-1].endswith("from half A, inconclusive with 5 seeds from half B")
    assert not robustness._split_halves({"sgd": [{"corruptions": {}, "attack": {}}]})

    # report(): the section and the header's sentence appear once the evaluations carry halves
    committed = ROOT / "benchmarks/results/bnn-fashion-mnist-lenet-clean/robustness"
    shutil.copytree(committed / "runs", tmp_path / "runs", ignore=shutil.ignore_patterns("*.log"))
    for path in (tmp_path / "runs").glob("*/eval.json"):
        result = json.loads(path.read_text())
        c, a = result["corruptions"], result["attack"]
        c["monte_carlo"] = {"samples": 30, "halves": [15, 15], "clean_accuracy": [c["clean"]["accuracy"]] * 2,
                            "mean_corruption_accuracy": [c["mean_corruption_accuracy"]] * 2}
        a["monte_carlo"] = {"robust_accuracy": {k: [v, v] for k, v in a["robust_accuracy"].items()}}
        path.write_text(json.dumps(result))
    groups = {method: sorted((tmp_path / "runs").glob(f"{method}-*"), key=lambda r: "-seed" in r.name)
              for method in ("sgd", "sam", "otmdr")}
    args = argparse.Namespace(compare_dirs=["bnn"], baseline_method="sgd", landscape=False, margin=0.5)
    report = robustness.report(args, groups, tmp_path).read_text()
    assert "no second set was drawn" not in report and "## Monte Carlo error (split-half)" in report
    assert "0 of 18 differ (no accuracy verdict there depends on which weights were drawn)" in report  # 3 pairs x 6


def test_pending_evidence_restores_carried_runs_runs_each_step_and_carries_unfinished_studies(tmp_path):
    """benchmarks/evidence/pending.sh: a study with an IN-PROGRESS.md under the results is restored
    before anything trains, then the steps run in order (fake otmdr and python record the calls);
    --carry collects the studies that have finished runs and are not collected whole yet (a study's
    own report.md does not mean it is finished: a two-stage study writes one after its first)."""
    import os

    record = tmp_path / "calls"
    fake = tmp_path / "fake"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {record}\n')
    fake.chmod(0o755)
    evidence, results = tmp_path / "runs", tmp_path / "results"
    (results / "bnn-fashion-mnist-lenet-noisy40-rerun").mkdir(parents=True)
    (results / "bnn-fashion-mnist-lenet-noisy40-rerun" / "IN-PROGRESS.md").write_text("carried\n")
    (results / "bnn-fashion-mnist-lenet-clean-rerun").mkdir()  # collected whole: no step of the queue any more
    (results / "bnn-fashion-mnist-lenet-clean-rerun" / "report.md").write_text("collected\n")
    (results / "cifar10-resnet20-clean-rerun").mkdir()  # a study's results without IN-PROGRESS.md: nothing to restore
    (evidence / "bnn-fashion-mnist-lenet-noisy40").mkdir(parents=True)  # what the restore (faked here) writes
    env = {k: v for k, v in os.environ.items() if k not in ("MATCHED", "REGIMES", "WARMUP", "BNN_SAMPLES")}
    env.update(OTMDR=str(fake), PYTHON=str(fake), EVIDENCE_DIR=str(evidence), RESULTS=str(results))
    script = str(ROOT / "benchmarks/evidence/pending.sh")
    subprocess.run(["bash", script], env=env, check=True, capture_output=True, text=True)
    calls = record.read_text().splitlines()
    assert calls[0] == (f"benchmarks/restore_runs.py {results}/bnn-fashion-mnist-lenet-noisy40-rerun "
                        f"{evidence}/bnn-fashion-mnist-lenet-noisy40")
    assert not any("restore_runs.py" in call for call in calls[1:])
    # the noisy BNN study, then its robustness, then CIFAR-10 clean: SGD's search, the three other
    # methods at its rate, the matched-radius runs; the clean BNN study (collected) is not run again
    order = ["--out runs/evidence/bnn-fashion-mnist-lenet-noisy40", "corrupt --dataset fashion-mnist",
             "cifar10-resnet20-clean sgd optim.lr",
             "compare --methods sgd,sgd@compute,sam,otmdr", "matched_radius.py"]
    calls = [call.replace(str(evidence), "runs/evidence") for call in calls]
    at = [next((i for i, call in enumerate(calls) if part in call), -1) for part in order]
    assert min(at) >= 0 and at == sorted(at), calls
    assert "compare --methods sgd --reference sgd" in calls[at[2] - 1]  # SGD alone searched first
    assert all("../shared/datasets/" in call for call in calls if " --data-dir " in call)
    assert all("label_noise" not in call for call in calls if "cifar10" in call)  # the clean regime only
    assert not any("bnn-fashion-mnist-lenet-clean" in call for call in calls)
    assert (evidence / "bnn-noisy40.log").is_file() and (evidence / "cifar10-resnet20-clean.log").is_file()
    assert "failed with exit code" not in "".join(p.read_text() for p in evidence.glob("*.log"))
    failing = tmp_path / "failing"  # a step that fails is logged with its code, and the queue goes on
    failing.write_text(f'#!/usr/bin/env bash\necho "$*" >> {record}\nexit 3\n')
    failing.chmod(0o755)
    record.unlink()
    result = subprocess.run(["bash", script], env={**env, "OTMDR": str(failing)}, capture_output=True, text=True)
    assert result.returncode == 0 and "failed with exit code 3" in result.stderr
    assert "cifar10-resnet20-study.yaml" in record.read_text()  # later steps still ran

    record.unlink()
    (results / "cifar10-resnet20-clean-rerun-matched-sam").mkdir()
    (results / "cifar10-resnet20-clean-rerun-matched-sam" / "report.md").write_text("collected\n")
    for study, files in (("cifar10-resnet20-clean", ["report.md", "search/sgd-lr=0.1-seed1000/summary.json"]),
                         ("cifar10-resnet20-clean-matched-sam", ["report.md", "sam-seed0/summary.json"]),
                         ("cifar10-resnet20-clean-matched-otmdr", ["otmdr-seed0/metrics.csv"]),
                         ("bnn-fashion-mnist-lenet-noisy40", ["search/x-seed1000/summary.json"])):
        for file in files:
            (evidence / study / file).parent.mkdir(parents=True, exist_ok=True)
            (evidence / study / file).write_text("{}")
    subprocess.run(["bash", script, "--carry"], env=env, check=True, capture_output=True, text=True)
    assert record.read_text().splitlines() == [
        f"benchmarks/collect_report.py --partial --with-robustness {evidence}/bnn-fashion-mnist-lenet-noisy40 "
        "bnn-fashion-mnist-lenet-noisy40-rerun",
        f"benchmarks/collect_report.py --partial {evidence}/cifar10-resnet20-clean cifar10-resnet20-clean-rerun"]
    missing = subprocess.run(["bash", script], env={**env, "OTMDR": str(tmp_path / "no-otmdr")}, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "run make setup first" in missing.stderr and missing.stderr.count("\n") == 1
