"""OT-MDR with K = 1, 2, 4 particles, at equal epochs and at equal compute (issue 10).

Each particle costs one more set of forward/backward passes per step, and the authors' own logs
show more particles costing more without helping. This runs, on the fast Fashion-MNIST MLP
(configs/fashion-mnist-mlp.yaml: full 54,000 / 6,000 / 10,000 split, 2x512 MLP), OT-MDR at the
radius the committed 40%-noise study chose on validation (benchmarks/results/fashion-mnist-mlp-noisy40,
read from its search.json unless --rho is given):

- equal epochs: K = 1, 2, 4 for E epochs (default 40, the study's budget);
- equal compute: K = 2 for E/2 epochs and K = 4 for E/4 (the cosine schedule spans each budget),

over 3 seeds, with 40% symmetric label noise (and clean labels with --clean). The K particles'
final gradients are averaged (``otmdr.particle_reduce=mean``, the release's multi-particle mode
1.1), so the step size does not grow with K; K = 1 is unaffected by it. Every variant is one
``otmdr compare --methods otmdr --set otmdr.particles=K --set train.epochs=E ... --resume`` into its
own folder, ``--jobs`` of them at a time (one torch thread each on a 2-core machine), so a rerun of
the same command after a kill reuses finished runs. Then ``report.md`` in --out: per variant the
test accuracy, NLL and ECE (mean ± std over seeds), seconds per epoch, passes per step, training
time, and the paired difference against K = 1 at E epochs with 95% t intervals and verdicts, for the
final and the early-stopped (best validation accuracy) models; and a figure per regime of test
accuracy against training compute (passes per step x epochs).

    python benchmarks/evidence/particles.py DATA_DIR [--jobs 2] [--out runs/evidence/particles]

``--smoke`` (or SMOKE=1): the same commands at a toy size (4 epochs, 500 training / 200 test
images, 2 seeds) into ${TMPDIR:-/tmp}/otmdr-evidence-smoke/particles, to check the script end to end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's otmdr, also without an editable install

from otmdr.report.stats import CI_METHOD, format_paired, paired_table, t_half_width  # noqa: E402

CONFIG = "configs/fashion-mnist-mlp.yaml"
NOISY_STUDY = ROOT / "benchmarks" / "results" / "fashion-mnist-mlp-noisy40"


class BadInput(ValueError):
    """Bad command-line input: one line and exit 2, before any folder or log is made."""


def study_rho(study: Path = NOISY_STUDY) -> list[float]:
    """The OT-MDR radius a committed study chose on validation (its search.json)."""
    points = json.loads((study / "search.json").read_text())
    chosen = [p for p in points if p["method"] == "otmdr" and p["chosen"]]
    if not chosen:
        raise BadInput(f"{study}/search.json has no chosen otmdr point: give --rho")
    key, _, value = chosen[0]["setting"].partition("=")
    if key != "rho":
        raise BadInput(f"{study}: the chosen otmdr setting {chosen[0]['setting']!r} is not a radius: give --rho")
    return [float(v) for v in yaml.safe_load(value)]


def checked_inputs(args: argparse.Namespace) -> tuple[list[float], list[int]]:
    """(rho, particles) from the command line, or BadInput naming the argument and the fix."""
    if not Path(args.data_dir).is_dir():
        raise BadInput(f"data directory {args.data_dir} not found: name the folder with the Fashion-MNIST IDX files")
    for name in ("jobs", "seeds", "epochs"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name} must be at least 1, not {getattr(args, name)}")
    try:
        particles = [int(k) for k in args.particles.split(",")]
    except ValueError:
        raise BadInput(f"--particles {args.particles!r}: give whole numbers separated by commas, e.g. 1,2,4") from None
    if 1 not in particles or min(particles) < 1:
        raise BadInput(f"--particles {args.particles!r}: give counts of at least 1, including 1 (the reference)")
    if not args.rho:
        return study_rho(), particles
    try:
        rho = yaml.safe_load(args.rho)
        rho = [float(r) for r in rho] if isinstance(rho, list) and rho else None
    except (yaml.YAMLError, TypeError, ValueError):
        rho = None
    if rho is None or not all(r >= 0 for r in rho):  # NaN fails too
        raise BadInput(f"--rho {args.rho!r}: give OT-MDR's radii per ascent step as a list, e.g. '[0.025,0.05]'")
    return rho, particles


def variants(particles: list[int], epochs: int) -> list[tuple[int, int]]:
    """(K, epochs): every K at full epochs, then every K > 1 at epochs / K (equal compute)."""
    out = [(k, epochs) for k in particles]
    out += [(k, max(1, epochs // k)) for k in particles if k > 1 and max(1, epochs // k) != epochs]
    return out


def label(k: int, epochs: int) -> str:
    return f"K={k}, {epochs} ep"


def folder(k: int, epochs: int) -> str:
    return f"K{k}-E{epochs}"


def figure_name(regime: str) -> str:
    return f"accuracy-vs-compute-{regime}.png"


def _mean_std(values: list[float], digits: int, scale: float = 1.0) -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _early(runs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    if not all(s.get("early_stopped") for s in runs):
        return None
    return [{**s, "test": s["early_stopped"]["test"]} for s in runs]


def variant_rows(results: dict[tuple[int, int], list[dict[str, Any]]], early: bool = False) -> list[list[str]]:
    """One table row per variant: K, epochs, seeds, test accuracy / NLL / ECE (mean ± std), and
    the cost: median seconds per epoch, passes per step, training minutes per run."""
    rows = []
    for (k, epochs), runs in results.items():
        shown = _early(runs) if early else runs
        if not shown:
            continue
        minutes = [sum(h["seconds"] for h in s.get("history", [])) / 60 for s in runs]
        row = [str(k), str(epochs), str(len(runs)),
               _mean_std([s["test"]["accuracy"] for s in shown], 2, 100),
               _mean_std([s["test"]["nll"] for s in shown], 4),
               _mean_std([s["test"]["ece"] for s in shown], 2, 100),
               _mean_std([s["seconds_per_epoch"] for s in runs], 2),
               _mean_std([s["passes_per_step"] for s in runs], 1),
               _mean_std(minutes, 1)]
        if early:
            row.insert(3, ", ".join(str(s["early_stopped"]["epoch"]) for s in runs))
        rows.append(row)
    return rows


def paired_rows(results: dict[tuple[int, int], list[dict[str, Any]]], reference: tuple[int, int],
                early: bool = False) -> list[dict[str, Any]]:
    """Each variant minus the reference variant, paired by seed (otmdr.report.stats)."""
    summaries = {label(*key): (_early(runs) if early else runs) for key, runs in results.items()}
    summaries = {name: runs for name, runs in summaries.items() if runs}
    if label(*reference) not in summaries:
        return []
    return paired_table(summaries, label(*reference))


def plot_accuracy_against_compute(results: dict[tuple[int, int], list[dict[str, Any]]], path: Path) -> Path:
    """Test accuracy (mean with its 95% t interval; dots: seeds) against training compute, counted
    as forward/backward passes over the training set (passes per step x epochs), for the final and
    the early-stopped models: equal-compute variants share an x, so a gain bought by compute shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), sharey=True)
    colours = {k: f"C{i}" for i, k in enumerate(sorted({k for k, _ in results}))}
    full = max(e for _, e in results)
    compute = {key: statistics.median(s["passes_per_step"] for s in runs) * key[1] for key, runs in results.items()}
    sharing = {x: [key for key in results if compute[key] == x] for x in compute.values()}
    for ax, early, title in ((axes[0], False, "final model"), (axes[1], True, "early-stopped model")):
        for (k, epochs), runs in results.items():
            shown = _early(runs) if early else runs
            if not shown:
                continue
            values = np.array([100 * s["test"]["accuracy"] for s in shown])
            x = compute[(k, epochs)]
            group = sharing[x]  # variants of equal compute side by side, not on top of each other
            x_shown = x * 2 ** (0.07 * (group.index((k, epochs)) - (len(group) - 1) / 2))
            half = t_half_width(values.tolist())
            equal_epochs = epochs == full
            ax.errorbar(x_shown, values.mean(), yerr=half, fmt="o" if equal_epochs else "s", capsize=5, markersize=7,
                        color=colours[k], markerfacecolor=colours[k] if equal_epochs else "white",
                        label=label(k, epochs), zorder=2)
            ax.scatter(np.full(len(values), x_shown), values, color="black", s=8, zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(compute.values())), [f"{x:g}" for x in sorted(set(compute.values()))])
        ax.minorticks_off()
        ax.set_xlabel("training compute: passes per step x epochs")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    low, high = axes[0].get_ylim()  # at least 10 points, as the comparison reports' figure: a truncated
    middle, span = (low + high) / 2, max(10.0, high - low)  # axis would make 0.3 points look large
    axes[0].set_ylim(max(0.0, middle - span / 2), min(100.0, max(0.0, middle - span / 2) + span))
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("filled: equal epochs; hollow: equal compute (K particles for 1/K of the epochs); "
                 "mean with 95% t interval, dots: seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _table(titles: list[str], rows: list[list[str]]) -> list[str]:
    aligned = ["---" if i < 3 else "---:" for i in range(len(titles))]
    return (["| " + " | ".join(titles) + " |", "|" + "|".join(aligned) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def render_report(regimes: dict[str, dict[tuple[int, int], list[dict[str, Any]]]], reference: tuple[int, int], *,
                  rho: list[float], commands: dict[str, list[str]], invocation: str, machine: str,
                  smoke: bool = False) -> str:
    """The Markdown report: per regime, the variant tables and the paired differences against
    ``reference`` (K = 1 at full epochs), final and early-stopped models."""
    cost = ["s / epoch (median)", "passes / step", "training min / run"]
    lines = ["# OT-MDR particles: K = 1, 2, 4 at equal epochs and at equal compute", "",
             f"Command: `{invocation}`  ", machine, "",
             f"Config `{CONFIG}` (2x512 MLP, full Fashion-MNIST: 54,000 train / 6,000 validation / 10,000 test), "
             f"OT-MDR rho {rho} (the radius the committed 40%-noise study chose on validation), the K particles' "
             "final gradients averaged (`otmdr.particle_reduce=mean`, the release's multi-particle mode 1.1). "
             f"Equal compute: K particles for 1/K of the epochs. Reference: {label(*reference)}. {CI_METHOD}.", ""]
    if smoke:
        lines += ["**Smoke run** (`--smoke`): a toy size (see the commands) that checks the script, not evidence.", ""]
    for regime, results in regimes.items():
        lines += [f"## {regime}", "", f"![Test accuracy against training compute]({figure_name(regime)})", ""]
        for early, title in ((False, "Final model (last epoch)"),
                             (True, "Early-stopped model (checkpoint of the best validation accuracy)")):
            rows = variant_rows(results, early)
            if not rows:
                continue
            titles = ["K", "epochs", "seeds"] + (["best epoch per seed"] if early else []) + \
                     ["test acc (%)", "test NLL", "ECE (%)"] + cost
            lines += [f"**{title}, mean ± std over seeds**", ""] + _table(titles, rows) + [""]
            paired = paired_rows(results, reference, early)
            if paired:
                lines += [f"Paired differences against {label(*reference)} ({title.split(' (')[0].lower()}; "
                          "variant − reference):", "", format_paired(paired, markdown=True), ""]
        lines += ["Commands:", "", "```"] + [" ".join(shlex.quote(a) for a in commands[f"{regime}/{folder(*key)}"])
                                             for key in results if f"{regime}/{folder(*key)}" in commands] + ["```", ""]
    return "\n".join(lines)


def _machine() -> str:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = "?"
    return (f"Date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; commit {commit}; torch {torch_version}, Python "
            f"{platform.python_version()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at a time (default 2)")
    parser.add_argument("--out", type=Path, help="default runs/evidence/particles")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40, help="the full budget E (default 40)")
    parser.add_argument("--particles", default="1,2,4")
    parser.add_argument("--rho", help="OT-MDR rho, e.g. '[0.025,0.05]' (default: the committed noisy study's choice)")
    parser.add_argument("--particle-reduce", default="mean", choices=("mean", "sum"))
    parser.add_argument("--clean", action="store_true", help="also run with clean labels")
    parser.add_argument("--otmdr", default=os.environ.get("OTMDR", ".venv/bin/otmdr"),
                        help="the otmdr command (default $OTMDR or .venv/bin/otmdr)")
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1",
                        help="toy size (4 epochs, 500 / 200 images, 2 seeds) to check the script")
    args = parser.parse_args()
    try:
        rho, particles = checked_inputs(args)
    except BadInput as error:  # before any folder or log is made: one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        return 2
    # paths given relative to where the command runs, written relative to the repository root
    args.data_dir = os.path.relpath(os.path.abspath(args.data_dir), ROOT)
    if args.out:
        args.out = Path(os.path.relpath(args.out.absolute(), ROOT))
    os.chdir(ROOT)
    size: list[str] = []
    if args.smoke:
        args.epochs, args.seeds = min(args.epochs, 4), min(args.seeds, 2)
        size = ["--set", "data.train_limit=500", "--set", "data.test_limit=200"]
    out = args.out or (Path(os.environ.get("TMPDIR", "/tmp")) / "otmdr-evidence-smoke" / "particles" if args.smoke
                       else Path("runs/evidence/particles"))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    regimes = ["noisy40"] + (["clean"] if args.clean else [])
    todo: dict[str, list[str]] = {}
    plan = variants(particles, args.epochs)
    for regime in regimes:
        for k, epochs in sorted(plan, key=lambda v: -v[0] * v[1]):  # the longest first: they pack better
            command = [*shlex.split(args.otmdr), "compare", "--config", CONFIG, "--data-dir", args.data_dir,
                       "--methods", "otmdr", "--seeds", str(args.seeds),
                       "--set", f"otmdr.rho=[{','.join(f'{r:g}' for r in rho)}]", "--set", f"otmdr.particles={k}",
                       "--set", f"otmdr.particle_reduce={args.particle_reduce}", "--set", f"train.epochs={epochs}",
                       "--set", f"train.threads={threads}", *size,
                       *(["--set", "data.label_noise=0.4"] if regime == "noisy40" else []),
                       "--jobs", "1", "--resume", "--quiet", "--out", str(out / regime / folder(k, epochs))]
            todo[f"{regime}/{folder(k, epochs)}"] = command
    out.mkdir(parents=True, exist_ok=True)

    def run(key: str) -> None:
        log = out / f"{key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        print(f"start {key}: {shlex.join(todo[key])}", flush=True)
        with open(log, "a") as handle:
            code = subprocess.call(todo[key], stdout=handle, stderr=subprocess.STDOUT)
        if code:
            raise RuntimeError(f"{key} failed (exit {code}); see {log}")
        print(f"done  {key} in {(time.perf_counter() - started) / 60:.1f} min", flush=True)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run, key) for key in todo]
        failed = [f.exception() for f in concurrent.futures.as_completed(futures) if f.exception()]
    if failed:
        for error in failed:
            print(f"error: {error}", file=sys.stderr)
        return 1
    results = {regime: {(k, e): json.loads((out / regime / folder(k, e) / "summaries.json").read_text())["otmdr"]
                        for k, e in plan} for regime in regimes}
    invocation = "python benchmarks/evidence/particles.py " + shlex.join(sys.argv[1:])
    report = render_report(results, (1, args.epochs), rho=rho, commands=todo, invocation=invocation,
                           machine=_machine(), smoke=args.smoke)
    for regime, regime_results in results.items():
        plot_accuracy_against_compute(regime_results, out / figure_name(regime))
    (out / "report.md").write_text(report)
    print(f"report: {out / 'report.md'}")
    name = "particles-fashion-mnist-mlp"
    print("commit the results with:")
    figures = " ".join(str(out / figure_name(regime)) for regime in regimes)
    print(f"  mkdir -p benchmarks/results/{name} && cp {out / 'report.md'} {figures} benchmarks/results/{name}/")
    for regime in regimes:
        for k, epochs in plan:
            print(f"  python benchmarks/collect_report.py {out / regime / folder(k, epochs)} "
                  f"{name}/{regime}-{folder(k, epochs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
