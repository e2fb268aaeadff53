"""The argument parser of every command; each command's function lives in its own module.

A numeric option is parsed by :func:`number` against a :class:`~otmdr.config.Bound`: the one
declared next to the config field it mirrors (``--epochs`` is ``train.epochs``), or its own,
declared below. A value outside it is refused while parsing, before anything is read or created,
in one ``otmdr: error: ...`` line, as every other otmdr error.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Callable
from typing import Any, NoReturn

from .._version import __version__
from ..config import BOUNDS, SEED, Bound, parse_number
from .compare import cmd_compare
from .evaluate import cmd_corrupt, cmd_eval
from .geometry import cmd_landscape, cmd_sharpness
from .info import cmd_config, cmd_datasets, cmd_models
from .train import cmd_train


# The ranges of the options that mirror no config key; the upper ends stop a typo from running for
# days or from allocating terabytes (Bound.why says which).
AT_LEAST_1 = Bound(1)
STEPS = Bound(1, 10000, why="each step is a forward and backward pass over every evaluated image")
EOT = Bound(1, 1000, why="each sample is one more forward and backward pass per attack step")
SEEDS = Bound(1, 1000, why="each seed trains every method once more")
SEARCH_SEEDS = Bound(1, 20, why="each search seed trains every grid point once more")
EXTENSIONS = Bound(0, 20, why="each step past an edge trains one more grid point per method and search seed")
JOBS = Bound(1, 256, why="each job is a process of its own")
PASSES = Bound(1, 10000, why="each costs two passes over --samples images")
POINTS = Bound(2, 401, why="points x points losses, each a pass over --samples images: 401 is 160,801 passes")
SPAN = Bound(0, 100, low_open=True, why="a span of 1 already moves each filter by its own norm")
SECONDS = Bound(0, low_open=True)


def number(kind: type, bound: Bound | str) -> Callable[[str], Any]:
    """An argparse ``type``: the text as ``kind`` (int or float, which may be written ``8/255``)
    within ``bound``, a Bound or the config key whose Bound the option shares."""
    allowed = BOUNDS[bound] if isinstance(bound, str) else bound

    def parse(text: str) -> int | float:
        try:
            value: int | float = int(text) if kind is int else parse_number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        problem = allowed.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    parse.bound = allowed  # type: ignore[attr-defined]  # shown by --help
    return parse


class _HelpFormatter(argparse.HelpFormatter):
    """Every default shown once in --help, and every numeric option's range. An option whose help
    already names its default (``%(default)s``, or in words: "default runs/<config>-...") gets no
    second one; one without a default (None), a flag and an empty list get none at all."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" not in text.lower() and action.option_strings and default is not argparse.SUPPRESS
                and default is not None and default != [] and not isinstance(default, bool)):
            text += " (default: %(default)s)"
        bound = getattr(action.type, "bound", None)
        return f"{text} (allowed: {bound.text()})" if isinstance(bound, Bound) else text


def _suggest(word: str, choices: list[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or nothing. Options are compared without
    their leading dashes, which every option shares: with them ``--bogus`` was "close" to ``--out``."""
    bare = {choice.lstrip("-"): choice for choice in choices}
    close = difflib.get_close_matches(word.lstrip("-"), list(bare), n=1, cutoff=0.6)
    return f" (did you mean {bare[close[0]]}?)" if close else ""


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors in one line, like every other otmdr error (the usage is in --help), with a
    did-you-mean for a misspelt option, command or choice. Options are never abbreviated
    (``allow_abbrev=False``): ``otmdr compare --seed 3`` meant ``--seeds 3`` silently, three
    evaluation seeds where the user asked for ``train.seed=3``; now it is refused with
    "did you mean --seeds?"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unrecognized(parsed, extras))
        return parsed

    def _unrecognized(self, parsed: argparse.Namespace, extras: list[str]) -> str:
        """Name the first unknown option of the command and the option it most likely meant."""
        command = self
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest or "", None):
                command = action.choices[getattr(parsed, action.dest)]
        options = [option for action in command._actions for option in action.option_strings
                   if action.help is not argparse.SUPPRESS]
        unknown = next((extra for extra in extras if extra.startswith("-")), None)
        where = f"{command.prog}: " if command is not self else ""  # error() names the program already
        if unknown is None:
            return f"{where}unrecognized arguments: {' '.join(extras)}"
        name = unknown.split("=", 1)[0]
        return (f"{where}unrecognized option {name}{_suggest(name, options)}; `{command.prog} --help` "
                "lists them")

    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '?([^'(]*?)'? \(choose from (.*)\)$", message)
        if choice:
            options = [c.strip().strip("'\"") for c in choice.group(2).split(",")]
            message += _suggest(choice.group(1), options)
            if message.startswith("argument command:"):  # a misspelt command
                message = (f"unknown command {choice.group(1)!r}{_suggest(choice.group(1), options)}; "
                           f"`{self.prog} --help` lists them")
        # named after the program, not its subcommand ("otmdr: error: ..."); a script that uses this
        # parser names itself, not otmdr
        self.exit(2, f"{self.prog.split()[0]}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="otmdr", description="OT-MDR, SAM and SGD: train, evaluate, compare")
    parser.add_argument("--version", action="version", version=f"otmdr {__version__}")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    def sub(name: str, **kwargs: Any) -> argparse.ArgumentParser:  # every default shown in --help
        return commands.add_parser(name, formatter_class=_HelpFormatter, **kwargs)

    def config_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML experiment config (see configs/)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=0.05")
        p.add_argument("--data-dir", help="directory (or archive) holding the dataset (= --set data.dir=...)")

    def distributed_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dist-timeout", type=number(float, SECONDS), default=600.0, metavar="SECONDS",
                       help="under torchrun (docs/distributed.md): how long a process waits for the others in a "
                            "collective before it stops with an error (a peer that died or hangs)")

    def trained_run_options(p: argparse.ArgumentParser) -> None:  # commands that read a trained run
        p.add_argument("--data-dir", help="where the dataset is now, if it moved")
        p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
        p.add_argument("--checkpoint", choices=("last", "best"), default="last",
                       help="for a run directory: the final model (as in summary.json) or the best on validation")

    p = sub("train", help="train one model")
    config_options(p)
    p.add_argument("--method", choices=("sgd", "sam", "asam", "otmdr"), help="= --set optim.method=...")
    p.add_argument("--epochs", type=number(int, "train.epochs"), help="= --set train.epochs=...")
    p.add_argument("--seed", type=number(int, "train.seed"), help="= --set train.seed=...")
    p.add_argument("--out", help="run directory (default runs/<config>-<method>-s<seed>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run exactly")
    distributed_options(p)
    p.set_defaults(func=cmd_train)

    p = sub("eval", help="evaluate a run directory or checkpoint on the test split")
    p.add_argument("path", help="run directory or checkpoint file")
    trained_run_options(p)
    p.add_argument("--ece-bins", type=number(int, "eval.ece_bins"), default=None,
                   help="ECE bins (default: the run's eval.ece_bins)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--predictive-samples", type=number(int, "bayes.test_samples"), default=None, metavar="N",
                   help="a Bayesian network's Monte-Carlo weight draws per prediction, clean, corrupted and "
                        "attacked (default: the run's bayes.test_samples)")
    p.add_argument("--no-temperature-scaling", action="store_true", help="skip fitting T on the validation split")
    p.add_argument("--attack", choices=("fgsm", "pgd", "autoattack"),
                   help="also report robust accuracy under this attack "
                        "(autoattack needs: pip install 'otmdr[autoattack]')")
    p.add_argument("--autoattack-version", choices=("standard", "rand"),
                   help="AutoAttack suite (default: rand for Bayesian networks, standard otherwise)")
    p.add_argument("--eps", default="1/255,2/255,4/255,8/255", help="comma-separated radii on [0,1] pixels")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf", help="PGD and AutoAttack threat model")
    p.add_argument("--steps", type=number(int, STEPS), default=10, help="PGD steps")
    p.add_argument("--eot", type=number(int, EOT), default=1,
                   help="gradient samples per step (expectation over transformation)")
    p.add_argument("--plot", help="write the robust-accuracy curve to this PNG")
    p.add_argument("--test-limit", type=number(int, "data.test_limit"),
                   help="evaluate on a fixed random subset of N test images "
                   "(the same for every run; faster attacks)")
    p.add_argument("--corruptions", metavar="all|benchmark|NAMES",
                   help="also evaluate under common corruptions: 'all' (the 19 of CIFAR-10-C), 'benchmark' (its 15 "
                        "of the mCE) or comma-separated names; see docs/corruptions.md")
    p.add_argument("--baseline", metavar="RUN_DIR", help="also report each corruption's error relative to this run's "
                                                         "(CE), their mean (mCE) and the relative mCE")
    p.add_argument("--severities", default="1-5", help="corruption severities, e.g. 1-5, 3 or 1,3,5")
    p.add_argument("--corrupted-dir", help="read the corrupted test set from this official-layout folder "
                                           "(CIFAR-10-C style, or written by `otmdr corrupt`) instead of generating it")
    p.add_argument("--corruption-seed", type=number(int, SEED), default=0, help="seed of the on-the-fly corruptions")
    p.add_argument("--heatmap", help="write the corruption x severity accuracy heat map to this PNG")
    p.add_argument("--force", action="store_true", help="replace existing result files (never done silently)")
    p.set_defaults(func=cmd_eval)

    p = sub("compare", help="train several methods x seeds (after an optional grid search on "
                                            "validation) and report mean ± std and paired differences")
    config_options(p)
    p.add_argument("--methods", default="sgd,sam,otmdr",
                   help="comma-separated: sgd, sam, asam, otmdr; for ensembles optionally METHOD/joint or "
                        "METHOD/per-member (sgd/per-member = a deep ensemble); METHOD@compute trains that method "
                        "at the most expensive method's gradient evaluations (e.g. sgd@compute: SGD at 2x epochs "
                        "against SAM)")
    p.add_argument("--seeds", type=number(int, SEEDS), default=3,
                   help="number of evaluation seeds (from train.seed upwards)")
    p.add_argument("--search-seeds", type=number(int, SEARCH_SEEDS), default=1,
                   help="seeds every grid point trains at, its validation score averaged over them; they are "
                        "train.seed+1000 upwards, never an evaluation seed, so no evaluation run carries the luck "
                        "that won the search (default: %(default)s)")
    p.add_argument("--extend-edges", type=number(int, EXTENSIONS), default=0, metavar="N",
                   help="when a method's chosen point sits at the smallest or largest value of a grid key, also "
                        "search one step past it (as large as the grid's last step: lr 0.1,0.2,0.4 -> 0.8), up to N "
                        "times, so that the choice is not capped by the grid (default: %(default)s)")
    p.add_argument("--budget", default="epochs", choices=("epochs", "compute"),
                   help="epochs: every method trains train.epochs; compute: each method's epochs (and schedule) "
                        "scaled to the most expensive method's gradient evaluations (default: %(default)s)")
    p.add_argument("--margin", default="0.5", metavar="M | accuracy=M,nll=M,ece=M",
                   help="equivalence margin of the two one-sided tests (TOST), in the metric's units: a number "
                        "sets accuracy's (percentage points; NLL 0.02 and ECE 0.5 points unless named) "
                        "(default: %(default)s)")
    p.add_argument("--out", help="output directory (default runs/compare-<config>-<time>)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs in --out and resume stopped ones")
    p.add_argument("--grid", action="append", metavar="[METHOD:]KEY=V1,V2,...",
                   help="search these values on the validation split before the final runs, e.g. sam.rho=0.02,0.05,0.1 "
                        "or otmdr.rho=[0.01,0.02],[0.05,0.1] (sam/asam/otmdr keys apply to that method, others "
                        "to every method or to METHOD: only); repeat for more keys (Cartesian product)")
    p.add_argument("--select", default="val_accuracy", choices=("val_accuracy", "val_nll", "val_brier", "val_ece"),
                   help="validation metric (last epoch) that chooses each method's grid point")
    p.add_argument("--search-set", action="append", metavar="KEY=VALUE",
                   help="override for the search runs only, e.g. train.epochs=10 (a shorter search budget)")
    p.add_argument("--reference", help="method(s) the paired differences are taken against, comma-separated "
                                       "(default: the first listed)")
    p.add_argument("--bn-policy", default="clean", choices=("clean", "ascent", "all", "none", "per-method"),
                   help="batch-norm statistics policy for every method, so that runs differ in the method only "
                        "(default: %(default)s, what SAM and OT-MDR use unless configured; per-method: each "
                        "method's config, e.g. the ascent passes of otmdr.preset=release)")
    p.add_argument("--jobs", type=number(int, JOBS), default=1,
                   help="independent runs trained in parallel processes, the CPU "
                                                       "threads split between them")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines (they are in each run's train.log)")
    p.add_argument("--command-line", help=argparse.SUPPRESS)
    distributed_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub("sharpness", help="Hessian and rho-ball sharpness of a trained model (eval-mode BN)")
    p.add_argument("path", help="run directory or checkpoint file")
    trained_run_options(p)
    p.add_argument("--samples", type=number(int, AT_LEAST_1), default=1024,
                   help="a fixed random subset of N training images")
    p.add_argument("--batch-size", type=number(int, AT_LEAST_1), default=256, help="images per Hessian-vector product")
    p.add_argument("--rho", type=number(float, "sam.rho"), default=0.05,
                   help="radius for worst-case and average sharpness")
    p.add_argument("--iterations", type=number(int, PASSES), default=50, help="power iterations for the top eigenvalue")
    p.add_argument("--probes", type=number(int, PASSES), default=20, help="Hutchinson probes for the trace")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--force", action="store_true", help="replace existing result files (never done silently)")
    p.set_defaults(func=cmd_sharpness)

    p = sub("landscape", help="loss-landscape slices around a run (and the line to another)")
    p.add_argument("run_a", help="run directory or checkpoint")
    p.add_argument("run_b", nargs="?", help="second run of the same architecture, for interpolation")
    p.add_argument("--out", required=True, help="folder for landscape.png, interpolation.png, landscape.json")
    p.add_argument("--force", action="store_true", help="replace existing result files (never done silently)")
    trained_run_options(p)
    p.add_argument("--samples", type=number(int, AT_LEAST_1), default=1024,
                   help="a fixed random subset of N training images")
    p.add_argument("--span", type=number(float, SPAN), default=1.0, help="alpha and beta range [-span, span]")
    p.add_argument("--points", type=number(int, POINTS), default=21, help="grid points per axis")
    p.set_defaults(func=cmd_landscape)

    p = sub("corrupt", help="write a corrupted copy of a test split in the CIFAR-10-C .npy layout")
    p.add_argument("--dataset", required=True, help="dataset name (see `otmdr datasets`)")
    p.add_argument("--data-dir", help="where the dataset is (not needed for digits)")
    p.add_argument("--out", required=True, help="new folder for <corruption>.npy files, labels.npy and meta.json")
    p.add_argument("--corruptions", default="all", metavar="all|benchmark|NAMES",
                   help="'all' (the 19 of CIFAR-10-C), 'benchmark' (its 15 of the mCE) or comma-separated names")
    p.add_argument("--seed", type=number(int, SEED), default=0, help="seed of the random corruptions")
    p.add_argument("--limit", type=number(int, "data.test_limit"),
                   help="only the fixed random subset of N test images that "
                                             "`otmdr eval --test-limit N` uses")
    p.set_defaults(func=cmd_corrupt)

    p = sub("config", help="print every config key with its value and meaning (the defaults, or a resolved config)")
    config_options(p)
    p.set_defaults(func=cmd_config)

    sub("models", help="list the registered models").set_defaults(func=cmd_models)
    sub("datasets", help="list the datasets and their expected layout").set_defaults(func=cmd_datasets)
    for command in commands.choices.values():  # global, and accepted after the command's name too
        command.add_argument("--import", dest="imports_here", action="append", default=[], metavar="MODULE",
                             help=IMPORT_HELP)
    return parser


IMPORT_HELP = ("import this Python module first (repeatable), e.g. one whose register_model / register_dataset "
               "decorators add your models and datasets; found from the current folder or PYTHONPATH; give it "
               "again to commands that read the run later (docs/your-model.md)")

