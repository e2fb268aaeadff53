"""A comparison of methods over seeds, optionally after a hyper-parameter search per method.

Plan, then run:

1. **Search** (only with a grid): every grid point of every method trains at the **search seeds**
   and is scored on the **validation split only** (``select``: a ``val_*`` metric of the final
   epoch, averaged over the search seeds). The test split plays no part in the choice. The search
   seeds are apart from the evaluation seeds by default (``train.seed + 1000`` upwards, past any
   evaluation seed): a point that won the search partly by the luck of its seed would otherwise
   carry that luck into the comparison, and only for the searched methods.
2. **Final runs**: each method's chosen point trains over all evaluation seeds, fresh runs, and is
   evaluated on the test split. A search seed that is also an evaluation seed (only when given
   explicitly) reuses its search run there, and the report says so.

``budget="compute"`` (or a method named ``METHOD@compute``) scales a method's epochs, and its
schedule with them, so that its gradient evaluations match the most expensive method's: SGD at
twice the epochs against SAM, the comparison a user paying for the extra passes needs.

Every run has a fixed folder under ``out``; a finished run (``summary.json``) is reused, a
stopped one resumes from its last checkpoint, and one killed before its first checkpoint starts
again, so the whole study resumes after a kill without redoing finished work. ``jobs > 1`` trains
independent runs in parallel processes, the CPU threads split between them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from .. import _signals
from .._lock import folder_lock
from ..config import (
    SEED,
    ConfigError,
    ExperimentConfig,
    comparable_config,
    config_from_dict,
    config_to_dict,
    load_config,
)
from . import distributed
from .compute import gradient_evaluations_per_step
from .grid import GridPoint, beyond_edges
from .loop import Preempted, TrainingError, train
from .run_dir import RunDirError, prepare_run_dir

__all__ = ["Run", "Study", "plan", "run_study", "select_points", "search_points", "close_calls", "final_scores",
           "SELECT_METRICS", "SEARCH_SEED_OFFSET", "BUDGETS", "split_method", "method_variant", "VARIANTS",
           "variant_overrides"]

#: validation metrics a search may select on, and whether higher is better
SELECT_METRICS = {"val_accuracy": True, "val_nll": False, "val_brier": False, "val_ece": False}
#: default search seeds start this far above train.seed: past every evaluation seed (--seeds <= 1000)
SEARCH_SEED_OFFSET = 1000
#: "epochs": every method trains train.epochs; "compute": each method's epochs scaled so that its
#: gradient evaluations match the most expensive method's
BUDGETS = ("epochs", "compute")


#: ``METHOD+VARIANT`` in a comparison's methods (``sam+reuse``, ``otmdr+late/joint@compute``): the
#: efficient variant's config overrides, applied after the study's own and before the grid point's
#: (so a grid can tune the variant's knob: ``--grid otmdr+reuse:efficiency.interval=2,5,10``).
#: Methods sam, asam and otmdr only: plain SGD has no sharpness-aware step to make cheaper.
VARIANTS: dict[str, list[str]] = {
    "interval": ["efficiency.interval=5"],  # the sharpness-aware step every 5th step, plain steps between
    "reuse": ["efficiency.interval=5", "efficiency.reuse=true"],  # LookSAM: reusing steps between
    "late": ["efficiency.phase_start=0.8"],  # plain steps for the first 80% of the steps
    "trigger": ["efficiency.trigger=[-1.0,1.0]"],  # AE-SAM's adaptive trigger, c from -1 to 1
    "momentum": ["efficiency.momentum_ascent=all"],  # MSAM: every ascent step along the momentum buffer
    "momentum1": ["efficiency.momentum_ascent=first"],  # the first ascent step along the momentum buffer
}


def split_method(method: str) -> tuple[str, str, str]:
    """``otmdr+reuse/joint@compute`` -> (``otmdr``, ``joint``, ``compute``): the optimizer, the
    ensemble regime and the budget a compared method names (empty strings where absent). The
    variant (``reuse``) is :func:`method_variant`'s."""
    head, _, budget = method.partition("@")
    head, _, regime = head.partition("/")
    name = head.partition("+")[0]
    return name, regime, budget


def method_variant(method: str) -> str:
    """``otmdr+reuse/joint@compute`` -> ``reuse``: the efficient variant a compared method names
    (a key of :data:`VARIANTS`; empty when none)."""
    return method.partition("@")[0].partition("/")[0].partition("+")[2]


def variant_overrides(method: str) -> list[str]:
    """The config overrides of the variant ``method`` names (none without one). A variant that
    is not in :data:`VARIANTS`, or one given to plain SGD, is a one-line ConfigError."""
    variant = method_variant(method)
    if "+" not in method.partition("@")[0].partition("/")[0]:
        return []
    if variant not in VARIANTS:
        raise ConfigError(f"method {method}: {variant!r} is not a variant; choose from {', '.join(VARIANTS)} "
                          f"(METHOD+VARIANT, e.g. sam+reuse)")
    if split_method(method)[0] == "sgd":
        raise ConfigError(f"method {method}: plain SGD has no sharpness-aware step to make cheaper; the variants "
                          "(+" + ", +".join(VARIANTS) + ") apply to sam, asam and otmdr")
    return list(VARIANTS[variant])


@dataclass
class Run:
    """One training run of the study: its config, its folder, and (once done) its summary."""

    method: str
    point: GridPoint
    seed: int
    config: ExperimentConfig
    run_dir: Path
    phase: str  # "search" or "final"
    summary: dict[str, Any] | None = None
    error: str | None = None  # a run that diverged (search runs only)
    seconds: float = 0.0
    reused: bool = False  #: finished by an earlier invocation (--resume), not trained now
    #: evaluate the test split at the end (False: a search run, scored on validation only)
    evaluate_test: bool = True
    #: final runs: the configs of the method's other grid points at this seed. A folder holding one
    #: of them is the final run of an earlier choice (the grid was extended and validation now picks
    #: another point): it is set aside, not refused, so that ``--resume`` with a longer grid works.
    superseded: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.method} [{self.point.label}] seed {self.seed}"


@dataclass
class Study:
    config_path: str | None
    overrides: list[str]
    methods: list[str]
    seeds: list[int]
    grid: dict[str, list[GridPoint]]
    out: Path
    search_overrides: list[str] = field(default_factory=list)
    select: str = "val_accuracy"
    #: one batch-norm policy for every method, so that runs differ in the method only; None keeps
    #: each method's own (``sam.bn_policy``, ``otmdr.bn_policy``: "clean" by default, "ascent" with
    #: ``otmdr.preset=release``)
    bn_policy: str | None = None
    #: the seeds every grid point trains at (None: ``search_seed_count`` seeds from
    #: ``seeds[0] + SEARCH_SEED_OFFSET``, never an evaluation seed)
    search_seeds: list[int] | None = None
    search_seed_count: int = 1
    budget: str = "epochs"  #: one of BUDGETS, for every method (``METHOD@compute`` for one)
    #: rounds of stepping past a grid edge the choice sits at (:func:`otmdr.train.grid.beyond_edges`)
    extend_edges: int = 0

    @property
    def searching(self) -> bool:
        return any(len(points) > 1 for points in self.grid.values())

    @property
    def seeds_for_search(self) -> list[int]:
        if self.search_seeds is not None:
            return list(self.search_seeds)
        first = self.seeds[0] + SEARCH_SEED_OFFSET
        return list(range(first, first + self.search_seed_count))

    def budget_of(self, method: str) -> str:
        return split_method(method)[2] or self.budget


def _not_overridden(overrides: list[str], later: tuple[str, ...] | list[str]) -> list[str]:
    """``overrides`` without those whose key ``later`` sets again (a grid point tuning a variant's knob)."""
    keys = {o.partition("=")[0].strip() for o in later}
    return [o for o in overrides if o.partition("=")[0].strip() not in keys]


def _slug(text: str) -> str:
    text = text.replace("/", "-").replace("[", "").replace("]", "").replace(",", "_").replace(" ", "_")
    return re.sub(r"[^A-Za-z0-9.=_+-]+", "_", text).strip("_") or "default"


def _config(study: Study, point: GridPoint, seed: int, extra: list[str], budget: float | None = None
            ) -> ExperimentConfig:
    """The run's config; with ``budget`` (SGD-epoch equivalents: the most expensive method's
    gradient evaluations per step times its epochs), its epochs and schedule scaled to spend it."""
    name, regime, _ = split_method(point.method)
    fixed = [f"optim.method={name}", f"train.seed={seed}", "train.progress=false"]
    if study.bn_policy is not None:
        fixed += [f"{section}.bn_policy={study.bn_policy}" for section in ("sam", "asam", "otmdr")]
    fixed += [f"ensemble.regime={regime}"] if regime else []
    fixed += variant_overrides(point.method)  # before the grid point's: a grid may tune the variant's knob
    where = f"grid point {point.method} [{point.label}]" if point.overrides else f"method {point.method}"
    try:
        cfg = load_config(study.config_path, study.overrides + fixed + list(point.overrides) + extra)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    if budget is not None and study.budget_of(point.method) == "compute":
        epochs = max(1, round(budget / gradient_evaluations_per_step(cfg)))
        scale = epochs / cfg.train.epochs  # the schedule follows the epochs actually trained
        try:
            cfg = load_config(study.config_path, study.overrides + fixed + list(point.overrides) + extra + [
                f"train.epochs={epochs}", f"schedule.warmup_epochs={cfg.schedule.warmup_epochs * scale}",
                f"schedule.milestones={[m * scale for m in cfg.schedule.milestones]}"])
        except ConfigError as error:
            raise ConfigError(f"{where} at equal compute ({epochs} epochs): {error}") from None
    return cfg


def _compute_budget(study: Study, extra: list[str]) -> float | None:
    """The SGD-epoch equivalents every ``compute``-budget run spends: those of the most expensive
    grid point of any method at ``train.epochs`` (None when no method needs it).
    Fixed by the plan, not by the search's outcome, so every folder's config is known up front."""
    if all(study.budget_of(m) != "compute" for m in study.methods):
        return None
    seed = study.seeds[0]
    configs = [_config(study, point, seed, extra) for points in study.grid.values() for point in points]
    return max(gradient_evaluations_per_step(cfg) * cfg.train.epochs for cfg in configs)


def _search_runs(study: Study, point: GridPoint, budget: float | None) -> list[Run]:
    """``point``'s run at each search seed, scored on validation only (the finals evaluate the one
    they reuse, :func:`plan`)."""
    return [Run(point.method, point, seed, _config(study, point, seed, study.search_overrides, budget),
                study.out / "search" / _slug(f"{point.method}-{point.label}-seed{seed}"), "search",
                evaluate_test=False)
            for seed in study.seeds_for_search]


def _beyond_edges(study: Study, chosen: dict[str, GridPoint], budget: float | None,
                  log: Callable[[str], None]) -> list[Run]:
    """Search runs one step past each chosen point that sits at an edge of its method's grid; the
    new points join ``study.grid`` (so that the final runs know them). A step whose config is
    invalid (a phase past 1, ...) is logged and left out. ``budget`` stays the one the grid as
    given fixed, so that equal-compute runs keep their planned epochs."""
    runs = []
    for method, point in chosen.items():
        for step in beyond_edges(study.grid[method], point):
            try:
                new = _search_runs(study, step, budget)
            except ConfigError as error:
                log(f"  {method}: not stepping past the edge to {step.label}: {error}")
                continue
            log(f"  {method}: chosen {point.label}, at an edge of its grid: also searching {step.label}")
            study.grid[method].append(step)
            runs += new
    return runs


def plan(study: Study) -> tuple[list[Run], Callable[[dict[str, GridPoint]], list[Run]]]:
    """The search runs, and a function from the chosen point of each method to the final runs.
    Builds (and so validates) every config first: a bad grid fails before anything trains."""
    if study.select not in SELECT_METRICS:
        raise ConfigError(f"--select: {study.select!r} is not one of {', '.join(SELECT_METRICS)}")
    if not study.searching and study.search_overrides:
        raise ConfigError("--search-set applies to the grid search only: give a --grid with at least two values")
    unknown = {b for b in (study.budget, *(study.budget_of(m) for m in study.methods)) if b not in BUDGETS}
    if unknown:
        raise ConfigError(f"budget {sorted(unknown)[0]!r} is not one of {', '.join(BUDGETS)} "
                          "(--budget, or METHOD@compute in --methods)")
    for method in study.methods:  # an unknown variant, or one given to sgd: one line, before any config
        variant_overrides(method)
    search_seeds = study.seeds_for_search
    if not search_seeds or len(set(search_seeds)) != len(search_seeds):
        raise ConfigError(f"search seeds {search_seeds}: give at least one, none twice")
    if SEED.high is not None and max(search_seeds) > SEED.high:
        raise ConfigError(f"search seed {max(search_seeds)} is past the last seed {int(SEED.high)}: lower train.seed")
    budget = _compute_budget(study, [])
    search_budget = _compute_budget(study, study.search_overrides) if study.search_overrides else budget
    search: list[Run] = []
    if study.searching:
        for points in study.grid.values():
            for point in points if len(points) > 1 else []:  # a method without a grid has nothing to choose
                search += _search_runs(study, point, search_budget)
    else:
        for points in study.grid.values():  # configs are checked before training either way
            _config(study, points[0], study.seeds[0], [], budget)

    def finals(chosen: dict[str, GridPoint]) -> list[Run]:
        runs = []
        for method in study.methods:
            for seed in study.seeds:
                reused = [r for r in search if r.method == method and r.point == chosen[method] and r.seed == seed]
                if reused and not study.search_overrides:  # a search seed given as an evaluation seed too
                    reused[0].evaluate_test = True  # resumed at its last epoch for its test evaluation
                    runs.append(reused[0])
                    continue
                cfg = _config(study, chosen[method], seed, [], budget)
                others = [comparable_config(config_to_dict(_config(study, point, seed, [], budget)))
                          for point in study.grid[method] if point != chosen[method]]
                runs.append(Run(method, chosen[method], seed, cfg, study.out / f"{_slug(method)}-seed{seed}", "final",
                                superseded=others))
        return runs

    return search, finals


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The comparable config of the run a folder holds (None: no readable config.yaml)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    try:
        return comparable_config(yaml.safe_load(saved.read_text()))
    except (ConfigError, yaml.YAMLError, AttributeError, TypeError):
        return None


def _set_aside_superseded(run: Run) -> Path | None:
    """Move a final run of a no longer chosen grid point to ``<out>/superseded/`` (kept, not
    deleted: it is still a finished run of that setting) and say where it went."""
    if not run.superseded or _saved_config(run.run_dir) not in run.superseded:
        return None
    aside = run.run_dir.parent / "superseded"
    aside.mkdir(exist_ok=True)
    target = aside / run.run_dir.name
    count = 1
    while target.exists():
        count += 1
        target = aside / f"{run.run_dir.name}-{count}"
    os.replace(run.run_dir, target)  # one rename: the folder is either here or there
    return target


def _state(run: Run) -> tuple[str, dict[str, Any] | None]:
    """'done' (with the run's summary), 'resume' or 'new' (with None); a folder holding another
    config is refused; a folder killed before its first checkpoint (config.yaml only) is cleared,
    since the study created it. A search run scored on validation only that is now an evaluation
    run too (its seed an evaluation seed) is resumed at its last epoch, which evaluates it without
    training again, or, without its checkpoints (a carried run), trained again: the same config
    gives the same run."""
    summary = run.run_dir / "summary.json"
    if ((run.run_dir / "config.yaml").is_file()  # an unreadable one counts as another config
            and _saved_config(run.run_dir) != comparable_config(config_to_dict(run.config))):
        raise RunDirError(f"{run.run_dir} holds a run with another config than {run.name} now asks for "
                          "(the config, --set or --grid changed): use a new --out")
    done = json.loads(summary.read_text()) if summary.is_file() else None
    if done is not None and not (run.evaluate_test and done.get("validation_only")):
        return "done", done
    if (run.run_dir / "checkpoints" / "last.pt").is_file():
        return "resume", None
    if run.run_dir.exists():
        shutil.rmtree(run.run_dir)
    return "new", None


def _train_one(config: dict[str, Any], run_dir: str, resume: bool, threads: int | None,
               name: str = "", echo: bool = False, test: bool = True) -> tuple[dict | None, str | None]:
    """Train one run (in this process or a worker); its lines go to ``run_dir/train.log`` and,
    with ``echo``, its epoch lines to stdout prefixed by the run's name (which run is where);
    ``test=False``: validation only (:func:`otmdr.train.loop.train`)."""
    if _STOP is not None and (_STOP.is_set() or _signals.requested() is not None):  # queued, then stopped
        raise Preempted(f"{_signals.stopped_by()} before {name or run_dir} started")
    cfg = config_from_dict(config)
    if threads is not None:
        cfg.train.threads = threads
    path = Path(run_dir)
    distributed.from_rank0(lambda: prepare_run_dir(path, resume=resume))
    main = distributed.current().is_main
    with open(path / "train.log", "a") if main else contextlib.nullcontext() as log_file:
        def log(line: str) -> None:
            if log_file is None:  # torchrun: rank 0 writes the log
                return
            log_file.write(line + "\n")
            log_file.flush()
            if echo and line.startswith(("epoch ", "warning:")):
                print(f"    {name}: {line}", flush=True)

        try:
            return train(cfg, path, resume=resume, log=log, test=test), None
        except TrainingError as error:
            log(f"stopped: {error}")
            return None, str(error)
        except Preempted as error:
            log(str(error))
            if _PARENT is not None and os.getppid() != _PARENT:  # the study is gone: so is this worker
                os._exit(143)
            raise


_PARENT: int | None = None  # in a worker: the study's process
_STOP: Any = None  # in a worker: the study's stop event (set when the study was asked to stop)


def _worker_init(parent: int, stop: Any = None, ready: Any = None) -> None:
    """Workers must not outlive the study (they would go on training into folders a restart
    reuses). When the parent dies the worker gets SIGTERM: from the kernel on Linux
    (PR_SET_PDEATHSIG, which fires when the parent's *thread* ends) and, everywhere, from a
    watchdog thread that polls the parent; training then checkpoints at the next step boundary
    and the worker exits. It starts with SIGTERM and SIGINT ignored and blocked
    (:func:`_workers_ignore_signals`: a Ctrl-C to the process group while it imports is pending, no
    traceback); from here on it treats them as a stop request (otmdr._signals), as the study does,
    a pending one included; once that holds it reports its pid on ``ready``, and
    only then does a stopping study signal it (a worker still starting would die of the default
    handler). ``stop``, set by the study, stops the runs a worker takes from the queue after."""
    global _PARENT, _STOP
    _PARENT, _STOP = parent, stop
    _WORKER_SIGNALS.enter_context(_signals.deferred())
    if hasattr(signal, "pthread_sigmask"):  # blocked since the spawn: one that came meanwhile is a stop request now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if ready is not None:
        ready.put(os.getpid())
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    def watchdog() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watchdog, daemon=True, name="otmdr-parent-watchdog").start()


_WORKER_SIGNALS = contextlib.ExitStack()  # a worker's stop-request handlers, held until it exits


def _stop_requested() -> bool:
    """Whether this study was asked to stop (a collective under torchrun: every rank decides alike)."""
    return distributed.any_rank(_signals.requested() is not None)


def _stopped(done: int, total: int) -> Preempted:
    return Preempted(f"{_signals.stopped_by()} with {done} of {total} run(s) of this phase finished")


def execute(runs: list[Run], *, jobs: int = 1, log: Callable[[str], None] = print, echo: bool = False) -> None:
    """Train every run that is not finished yet (``jobs`` at a time) and fill in its summary;
    ``echo`` prints every epoch line, prefixed by its run, as it happens."""
    pending = []
    for run in runs:
        def look(run: Run = run) -> tuple[str, dict | None, str | None]:  # torchrun: rank 0 looks, every rank follows
            moved = _set_aside_superseded(run)
            state, summary = _state(run)
            return state, summary, None if moved is None else str(moved)

        state, summary, moved = distributed.from_rank0(look)
        if moved is not None:
            log(f"  {run.run_dir} held the final run of a setting no longer chosen: moved to {moved}")
        if state == "done":
            run.reused = run.reused or run.summary is None  # not a search run trained moments ago
            run.summary = summary
        else:
            pending.append((run, state == "resume"))
    reused = len(runs) - len(pending)
    if reused:
        log(f"  {reused} run(s) finished earlier, reused")
    total = len(pending)
    if not total:
        return
    threads = None
    if jobs > 1:
        available = pending[0][0].config.train.threads or os.cpu_count() or 1
        threads = max(1, available // jobs)

    began = time.perf_counter()

    def finish(index: int, run: Run, result: tuple[dict | None, str | None], started: float) -> None:
        run.summary, run.error = result
        # its own training time (in parallel, the time since submission would include the queue)
        run.seconds = (sum(row.get("seconds", 0.0) for row in run.summary.get("history", []))
                       if run.summary else time.perf_counter() - started)
        left = (time.perf_counter() - began) / index * (total - index)  # runs finish at this pace so far
        eta = f"; about {left / 60:.0f} min left for this phase" if index < total else ""
        if run.error is not None:
            if run.phase == "final":
                raise TrainingError(f"{run.name}: {run.error}")
            log(f"  [{index}/{total}] {run.name}: diverged ({run.seconds:.0f}s{eta}); see {run.run_dir / 'train.log'}")
            return
        log(f"  [{index}/{total}] {run.name}: {_describe(run)} ({run.seconds:.0f}s{eta})")

    done = 0
    if jobs <= 1:
        for run, resume in pending:
            _signals.pause_point("compare-run")  # test-only
            if _stop_requested():  # between runs: a safe point
                raise _stopped(done, total)
            started = time.perf_counter()
            log(f"  training {run.name} -> {run.run_dir}" + (" (resuming)" if resume else ""))
            result = _train_one(config_to_dict(run.config), str(run.run_dir), resume, threads, run.name, echo,
                                run.evaluate_test)
            done += 1
            finish(done, run, result, started)
        if _stop_requested():  # during the last run's final evaluation: it finished, the study stops here
            raise _stopped(done, total)
        return
    _execute_parallel(pending, jobs=jobs, threads=threads, log=log, echo=echo, finish=finish)


def _execute_parallel(pending: list[tuple[Run, bool]], *, jobs: int, threads: int | None, log: Callable[[str], None],
                      echo: bool, finish: Callable[[int, Run, tuple[dict | None, str | None], float], None]) -> None:
    """``pending`` in ``jobs`` worker processes. A stop request to the study (SIGTERM, Ctrl-C)
    reaches every worker: queued runs are cancelled or refuse to start, running ones checkpoint
    at their next step; then the study raises :class:`Preempted`."""
    context = get_context("spawn")
    stop, ready = context.Event(), context.SimpleQueue()
    total, done, stopping = len(pending), 0, False
    workers: set[int] = set()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                             initargs=(os.getpid(), stop, ready)) as pool:
        futures = {}
        with _workers_ignore_signals():  # the workers start (submit spawns them) deaf to Ctrl-C until _worker_init
            for run, resume in pending:
                future = pool.submit(_train_one, config_to_dict(run.config), str(run.run_dir), resume, threads,
                                     run.name, echo, run.evaluate_test)
                futures[future] = (run, time.perf_counter())
        _signals.pause_point("compare-workers")  # test-only: the workers are starting (importing)
        log(f"  {total} run(s) in {jobs} parallel processes, {threads} thread(s) each; per-epoch logs in "
            "<run>/train.log")
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, timeout=0.1, return_when=FIRST_COMPLETED)
            if not stopping and _signals.requested() is not None:
                stopping = True
                stop.set()  # before the pids are read: a worker ready after this sees the event
                # no future.cancel(): queued runs may already sit in a worker's call queue, where a cancel
                # does nothing, and a cancelled future crashes the pool's manager thread if a worker then
                # dies (Python 3.11: InvalidStateError in terminate_broken; the study waited forever). Every
                # queued run reaches a worker that sees ``stop`` and refuses it at once (_train_one).
                while not ready.empty():
                    workers.add(ready.get())
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            for future in finished:
                run, started = futures[future]
                if future.cancelled():
                    continue
                try:
                    result = future.result()
                except Preempted:
                    continue
                except BrokenProcessPool:
                    if stopping:  # a worker still starting died of the signal: it held no run
                        continue
                    raise
                done += 1
                finish(done, run, result, started)
    if stopping:
        raise _stopped(done, total)


@contextlib.contextmanager
def _workers_ignore_signals() -> Any:
    """Worker processes spawned within start with SIGINT and SIGTERM ignored and blocked (both
    survive exec), until :func:`_worker_init` installs the stop-request handlers and unblocks them:
    a Ctrl-C, which the terminal sends to the whole process group, would otherwise kill a worker
    still importing torch (a traceback each, a broken pool); now it stays pending and becomes the
    worker's stop request, so it starts no run. This process loses no signal either: blocked
    meanwhile (pending), it is handled when the mask is restored."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield  # signals reach the main thread only; Windows has neither process groups nor these calls
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # started now: starting it unblocks (and so loses) a pending signal
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a signal that came meanwhile is handled now


def _describe(run: Run) -> str:
    s = run.summary
    assert s is not None
    last = s["history"][-1] if s.get("history") else {}
    parts = [f"val acc {100 * last['val_accuracy']:.2f}%"] if "val_accuracy" in last else []
    if run.phase == "final":
        parts.append(f"test acc {100 * s['test']['accuracy']:.2f}%")
    parts.append(f"radius {s['perturbation_norm']:.3f}")
    return ", ".join(parts)


def score(run: Run, metric: str) -> float | None:
    """The run's validation ``metric`` at its final epoch (None for a run that diverged)."""
    return _final_value(run.summary, metric)


def _final_value(summary: dict[str, Any] | None, metric: str) -> float | None:
    if summary is None or not summary.get("history"):
        return None
    value = summary["history"][-1].get(metric)
    return None if value is None or not math.isfinite(value) else float(value)


def search_points(search: list[Run], metric: str) -> list[dict[str, Any]]:
    """One row per grid point: its validation score averaged over the search seeds (None if it
    diverged at any of them), each seed's score, the mean measured radius, and the standard
    error of the score (over the seeds with two or more; with one, the binomial error of an
    accuracy on the validation split when its size is known, else None)."""
    rows: dict[tuple[str, GridPoint], dict[str, Any]] = {}
    for run in search:
        row = rows.setdefault((run.method, run.point), {
            "method": run.method, "setting": run.point.label, "point": run.point, "seeds": [], "scores": [],
            "radii": [], "val_examples": None})
        row["seeds"].append(run.seed)
        row["scores"].append(score(run, metric))
        if run.summary is not None:
            row["radii"].append(run.summary["perturbation_norm"])
            row["val_examples"] = run.summary.get("data_sizes", {}).get("val")
    out = []
    for row in rows.values():
        scores = row.pop("scores")
        finite = [v for v in scores if v is not None]
        mean = se = None
        if len(finite) == len(scores):  # a point that diverged at any search seed is out
            mean = statistics.fmean(finite)
            if len(finite) > 1:
                se = statistics.stdev(finite) / math.sqrt(len(finite))
            elif metric == "val_accuracy" and row["val_examples"]:
                se = math.sqrt(max(mean * (1 - mean), 0.0) / row["val_examples"])
        radii = row.pop("radii")
        out.append({**row, "score": mean, "seed_scores": scores, "standard_error": se,
                    "radius": sum(radii) / len(radii) if radii else None})
    return out


def select_points(search: list[Run], methods: list[str], metric: str) -> dict[str, GridPoint]:
    """Each method's best grid point by validation ``metric``, averaged over the search seeds
    (ties: the first in grid order)."""
    higher = SELECT_METRICS[metric]
    chosen = {}
    points = search_points(search, metric)
    for method in methods:
        if not any(p["method"] == method for p in points):  # nothing searched: its one point
            continue
        valid = [p for p in points if p["method"] == method and p["score"] is not None]
        if not valid:
            raise TrainingError(f"every grid point of {method} diverged: nothing to select; try smaller radii or lr")
        best = max(valid, key=lambda p: p["score"]) if higher else min(valid, key=lambda p: p["score"])
        chosen[method] = best["point"]
    return chosen


def close_calls(points: list[dict[str, Any]], metric: str, *, higher: bool | None = None,
                more_seeds: str = "--search-seeds {n}",
                final_scores: dict[str, list[float | None]] | None = None) -> list[str]:
    """Methods whose best and second-best grid points differ by less than one standard error of
    the validation score: the choice between them is within noise (more search seeds, or a
    larger validation split, would be needed to tell them apart). ``higher``: whether a higher
    score is better (default: what :data:`SELECT_METRICS` says of ``metric``); ``more_seeds``: how
    the caller asks for more search seeds, ``{n}`` standing for a count above the one used (3
    after one seed, then twice as many).

    With one search seed the only error known before the finals is the validation split's
    binomial one, blind to how much a run's score moves with its training seed. ``final_scores``
    (the validation score of each final run, per method) measures that: the chosen point's
    evaluation runs are runs of one setting at other seeds, so two single runs differ by about
    sqrt(2) times their score's standard deviation from the seed alone, and a gap below that is
    within noise too."""
    higher = SELECT_METRICS[metric] if higher is None else higher
    notes = []
    for method in dict.fromkeys(p["method"] for p in points):
        ranked = sorted((p for p in points if p["method"] == method and p["score"] is not None),
                        key=lambda p: p["score"], reverse=higher)
        if len(ranked) < 2:
            continue
        best, second = ranked[:2]
        gap = abs(best["score"] - second["score"])
        se = _gap_error(best, second)
        spread = _seed_spread((final_scores or {}).get(method, [])) if len(best["seeds"]) == 1 else None
        scale = 100.0 if metric.endswith(("accuracy", "ece")) else 1.0  # fractions, shown in points
        digits = 2 if scale == 100.0 else 4
        if spread is not None and (se is None or math.sqrt(2) * spread[0] > se):
            se = math.sqrt(2) * spread[0]
            error = (f"the {scale * se:.{digits}f} by which two runs of one setting differ from their training seed "
                     f"alone (sqrt(2) x the standard deviation of {metric} over its {spread[1]} evaluation runs)")
        else:
            error = f"one standard error ({scale * se:.{digits}f})" if se is not None else ""
        if se is not None and gap < se:
            notes.append(f"{method}: the chosen point ({best['setting']}) beats the next ({second['setting']}) by "
                         f"{scale * gap:.{digits}f} on {metric}, less than {error}: the choice is within noise; "
                         f"average the search over more seeds ({more_seeds.format(n=max(3, 2 * len(best['seeds'])))})")
    return notes


def _seed_spread(scores: list[float | None]) -> tuple[float, int] | None:
    """The standard deviation of a method's final runs' scores (one setting, different seeds) and
    their count; None with fewer than two finite scores."""
    finite = [float(v) for v in scores if v is not None and math.isfinite(v)]
    return (statistics.stdev(finite), len(finite)) if len(finite) > 1 else None


def final_scores(summaries: dict[str, list[dict[str, Any]]], metric: str) -> dict[str, list[float | None]]:
    """Each final run's validation ``metric`` at its last epoch, per method, as the search scores
    its runs (:func:`score`)."""
    return {method: [_final_value(s, metric) for s in runs] for method, runs in summaries.items()}


def _gap_error(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Standard error of the difference of two points' scores: paired over the search seeds
    when there are two or more, else from the two points' own errors."""
    if len(a["seed_scores"]) > 1 and a["seeds"] == b["seeds"]:
        gaps = [x - y for x, y in zip(a["seed_scores"], b["seed_scores"])]
        return statistics.stdev(gaps) / math.sqrt(len(gaps))
    if a["standard_error"] is None or b["standard_error"] is None:
        return None
    return math.hypot(a["standard_error"], b["standard_error"])


def run_study(study: Study, *, jobs: int = 1, log: Callable[[str], None] = print, echo: bool = False) -> dict[str, Any]:
    """Search (if there is a grid), select on validation, run the finals. Returns the summaries of
    the final runs per method, the chosen point per method, the search runs and, for reports, one
    plain dict per grid point (``points``: setting, validation score, measured radius, chosen)."""
    search, finals = plan(study)
    with contextlib.ExitStack() as stack:
        distributed.from_rank0(lambda: stack.enter_context(folder_lock(study.out, "compare")))
        return _run(study, search, finals, jobs=jobs, log=log, echo=echo)


def _run(study: Study, search: list[Run], finals, *, jobs: int, log: Callable[[str], None],
         echo: bool) -> dict[str, Any]:
    started = time.perf_counter()
    search_seeds = study.seeds_for_search if search else []
    extended: set[GridPoint] = set()  # points added past an edge (--extend-edges)
    if search:
        seeds = ", ".join(map(str, search_seeds))
        log(f"search: {len(search)} run(s), every grid point at search seed(s) {seeds}, selected on {study.select} "
            "(validation split)")
        execute(search, jobs=jobs, log=log, echo=echo)
        chosen = {method: points[0] for method, points in study.grid.items()}
        chosen.update(select_points(search, study.methods, study.select))
        # the budget of the grid as given, before any step (computed again: plan() keeps it to itself)
        budget = _compute_budget(study, study.search_overrides) if study.extend_edges else None
        for _ in range(study.extend_edges):
            beyond = _beyond_edges(study, {m: chosen[m] for m in study.methods if len(study.grid[m]) > 1}, budget, log)
            if not beyond:
                break
            execute(beyond, jobs=jobs, log=log, echo=echo)
            search.extend(beyond)  # (the list plan() made: finals() reuses search runs from it)
            extended.update(run.point for run in beyond)
            chosen.update(select_points(search, study.methods, study.select))
        for method, point in chosen.items():
            log(f"  chosen for {method}: {point.label}")
    else:
        chosen = {method: points[0] for method, points in study.grid.items()}
    runs = finals(chosen)
    log(f"final runs: {len(study.methods)} method(s) x {len(study.seeds)} seed(s)")
    execute(runs, jobs=jobs, log=log, echo=echo)
    summaries: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        summaries.setdefault(run.method, []).append(run.summary)
    unique = {run.run_dir: run for run in search + runs if run.summary is not None}
    trained = sum(sum(row.get("seconds", 0.0) for row in run.summary.get("history", [])) for run in unique.values())
    records = [{"method": r.method, "setting": r.point.label, "seed": r.seed, "score": score(r, study.select),
                "radius": r.summary["perturbation_norm"] if r.summary else None,
                "chosen": r.point == chosen[r.method], "run_dir": str(r.run_dir), "error": r.error} for r in search]
    points = [{key: value for key, value in p.items() if key != "point"}
              | {"chosen": p["point"] == chosen[p["method"]], "extended": p["point"] in extended}
              for p in search_points(search, study.select)]
    settings = {}  # what each method ran, beyond the shared config: its chosen point and its epochs
    for run in runs:
        if run.method not in settings:
            name, regime, _ = split_method(run.method)
            epochs = [f"train.epochs={run.config.train.epochs}"] if study.budget_of(run.method) == "compute" else []
            settings[run.method] = [f"optim.method={name}", *([f"ensemble.regime={regime}"] if regime else []),
                                    *_not_overridden(variant_overrides(run.method), run.point.overrides),
                                    *run.point.overrides, *epochs]
    return {"summaries": summaries, "chosen": chosen, "search": search, "points": points, "search_runs": records,
            "settings": settings,
            "search_seeds": search_seeds, "seeds": list(study.seeds),
            "reused_search_seeds": sorted(set(search_seeds) & set(study.seeds)) if not study.search_overrides else [],
            "seconds": time.perf_counter() - started, "train_seconds": trained, "runs": len(unique),
            "reused": sum(run.reused for run in unique.values())}
