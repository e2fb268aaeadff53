"""``otmdr sharpness`` and ``otmdr landscape``: the loss surface around a trained model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import UsageError, load_trained
from .evaluate import refuse_existing


def cmd_sharpness(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from ..eval.sharpness import average_sharpness, hessian_trace, top_hessian_eigenvalue, worst_case_sharpness
    from ..eval.subsets import PassProgress, fixed_training_subset
    from ..models.bayes import is_bayesian, posterior_mean
    from ..train.checkpoint import atomic_write_text

    refuse_existing(args, [("--json", args.json)])
    _, model, data = load_trained(args)
    # passes over the subset: 2 per power iteration and per probe (a Hessian-vector product reads
    # the batches twice), 27 for the rest (set-up, worst-case and average sharpness); measured
    batches = PassProgress(fixed_training_subset(data, args.samples, args.batch_size),
                            2 * (args.iterations + args.probes) + 27, "sharpness")
    with posterior_mean(model):  # a BNN: the network of its posterior means
        result = {
            "path": str(args.path), "samples": sum(len(y) for _, y in batches), "rho": args.rho,
            "bayesian_posterior_mean": is_bayesian(model),
            "top_hessian_eigenvalue": top_hessian_eigenvalue(model, batches, F.cross_entropy,
                                                             iterations=args.iterations),
            "hessian_trace": hessian_trace(model, batches, F.cross_entropy, probes=args.probes),
            "worst_case_sharpness": worst_case_sharpness(model, batches, F.cross_entropy, rho=args.rho),
            "average_sharpness": average_sharpness(model, batches, F.cross_entropy, rho=args.rho),
        }
    # the power iteration stops once it converges, before --iterations: the passes it skipped are
    # done too, so the bar ends at 100 % (it stopped at 60 % before)
    batches.bar.update(max(0, batches.bar.total - batches.bar.n))
    batches.close()
    for key, value in result.items():
        print(f"  {key:24s} {value}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


def cmd_landscape(args: argparse.Namespace) -> int:
    """Loss along filter-normalised directions around RUN_A (1-D curve, 2-D contour and surface),
    and along the line from RUN_A to RUN_B when given; plots and JSON in --out."""
    import torch.nn.functional as F

    from ..eval.landscape import landscape_evaluation
    from ..eval.subsets import PassProgress, fixed_training_subset
    from ..report.plots import plot_interpolation, plot_landscape
    from ..train.checkpoint import atomic_write_text

    args.path = args.run_a
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: name a folder for landscape.png and landscape.json")
    written = ["landscape.png", "landscape.json"] + (["interpolation.png"] if args.run_b else [])
    refuse_existing(args, [(f"--out {out}", out / name) for name in written])
    cfg, model, data = load_trained(args)
    other = other_cfg = None
    if args.run_b:  # checked before the grid is computed
        from ..train import load_run

        other_cfg, other, _ = load_run(args.run_b, device=args.device, which=args.checkpoint)
        mine, theirs = model.state_dict(), other.state_dict()
        if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
            raise UsageError(f"{args.run_a} and {args.run_b} are different architectures; interpolation needs two "
                              "runs of the same model")
    surfaces = 2 if args.run_b else 1  # RUN_B's surface too, drawn beside RUN_A's
    batches = PassProgress(fixed_training_subset(data, args.samples, 512),
                            2 * (surfaces * args.points * (args.points + 1) + (args.points if args.run_b else 0)),
                            "landscape")  # 2 iterations per loss: the losses, then the sample count
    n = sum(len(y) for _, y in list.__iter__(batches))
    result = {"run": str(args.run_a), "samples": n,
              **landscape_evaluation(model, batches, F.cross_entropy, points=args.points, span=args.span, other=other)}
    batches.close()
    out.mkdir(parents=True, exist_ok=True)  # after the computation: a failed one leaves no folder behind
    title = f"{cfg.model.name}, filter-normalised directions, {n} training images"
    if other_cfg is not None:
        result["other"] = {"run": str(args.run_b), **result["other"]}
        _plot_side_by_side(result, out / "landscape.png", title=title, labels=(
            f"{Path(args.run_a).name} ({cfg.optim.method})", f"{Path(args.run_b).name} ({other_cfg.optim.method})"))
    else:
        plot_landscape(result, out / "landscape.png", title=title.replace(",", f" ({cfg.optim.method}),", 1))
    if other is not None:
        plot_interpolation(result, out / "interpolation.png", start=Path(args.run_a).name, end=Path(args.run_b).name)
    atomic_write_text(out / "landscape.json", json.dumps(result))
    print(f"written: {out / 'landscape.png'}" + (f", {out / 'interpolation.png'}" if args.run_b else ""))
    return 0



def _plot_side_by_side(result: dict, path: Path, *, title: str, labels: tuple[str, str]) -> Path:
    """RUN_A and RUN_B side by side, one column each: the 1-D slice, the 2-D contour and the surface,
    on one loss scale (shared limits and contour levels), so the flatter of the two shows."""
    import matplotlib.pyplot as plt  # the Agg backend: otmdr.report.plots, imported by the command, chose it
    import numpy as np

    alphas = np.asarray(result["alphas"])
    runs = [(labels[0], result), (labels[1], result["other"])]
    surfaces = [np.asarray(run["surface_2d"]) for _, run in runs]
    low = min(float(s.min()) for s in surfaces)
    high = max(float(s.max()) for s in surfaces)
    levels = np.linspace(low, high, 16) if high > low else 15
    grid_a, grid_b = np.meshgrid(alphas, alphas, indexing="ij")
    fig = plt.figure(figsize=(9, 10))
    for column, ((label, run), surface) in enumerate(zip(runs, surfaces)):
        ax = fig.add_subplot(3, 2, 1 + column)
        ax.plot(alphas, run["slice_1d"])
        ax.set(xlabel="alpha", ylabel="training loss", title=f"{label}: 1-D slice", ylim=(low, high)
               if high > low else None)
        ax = fig.add_subplot(3, 2, 3 + column)
        contour = ax.contour(grid_a, grid_b, surface, levels=levels)
        ax.clabel(contour, fontsize=6)
        ax.set(xlabel="alpha", ylabel="beta", title=f"{label}: 2-D slice")
        ax = fig.add_subplot(3, 2, 5 + column, projection="3d")
        ax.plot_surface(grid_a, grid_b, surface, cmap="viridis", vmin=low, vmax=high)
        ax.set(xlabel="alpha", ylabel="beta", zlabel="training loss")
        if high > low:
            ax.set_zlim(low, high)
        ax.set_title(f"{label}: surface")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
