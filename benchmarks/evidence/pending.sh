#!/usr/bin/env bash
# The evidence still to run for issue 24, in order, on 2 cores: each step resumes, and the
# runs an earlier session carried with `collect_report.py --partial` are restored first, so a new
# machine starts where the last one stopped instead of retraining hours of runs.
#   benchmarks/evidence/pending.sh            restore what was carried, then run every step (days on 2 cores)
#   benchmarks/evidence/pending.sh --carry    before a session ends: collect each unfinished study's finished
#                                             runs into benchmarks/results/<name>/ (then commit them)
# Each step's output goes to runs/evidence/<step>.log. The data paths are relative (../shared/...),
# as the carried configs record them: a run is reused only if its config matches as written. When a
# study finishes, collect it (the scripts print the command), and delete its step and its line
# in STUDIES here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
export OTMDR=${OTMDR:-.venv/bin/otmdr}
export EVIDENCE_DIR=${EVIDENCE_DIR:-runs/evidence}
RESULTS=${RESULTS:-benchmarks/results}
CIFAR=../shared/datasets/cifar10-jpeg.tar.gz
FMNIST=../shared/datasets/fashion-mnist
# study folder under runs/evidence -> its folder under benchmarks/results
STUDIES="bnn-fashion-mnist-lenet-noisy40:bnn-fashion-mnist-lenet-noisy40-rerun
cifar10-resnet20-clean:cifar10-resnet20-clean-rerun
cifar10-resnet20-clean-matched-sam:cifar10-resnet20-clean-rerun-matched-sam
cifar10-resnet20-clean-matched-otmdr:cifar10-resnet20-clean-rerun-matched-otmdr"

if [ ! -x "$OTMDR" ] || [ ! -x "$PYTHON" ]; then
  echo "pending.sh: $OTMDR or $PYTHON not found: run make setup first" >&2
  exit 2
fi
if [ "${1:-}" = --carry ]; then
  for pair in $STUDIES; do
    study=$EVIDENCE_DIR/${pair%%:*}
    # not started here, or collected whole already (a study's own report.md says nothing: a two-stage
    # study writes one after its first stage)
    [ -d "$study" ] && [ ! -f "$RESULTS/${pair#*:}/report.md" ] || continue
    [ -n "$(find "$study" -mindepth 2 -name summary.json -print -quit)" ] || continue  # nothing finished yet
    evaluated=()  # a BNN study's robustness is evaluated before it is collected: its final runs travel with it
    case ${pair%%:*} in bnn-*) evaluated=(--with-robustness);; esac
    "$PYTHON" benchmarks/collect_report.py --partial ${evaluated[@]+"${evaluated[@]}"} "$study" "${pair#*:}"
  done
  exit 0
fi
for pair in $STUDIES; do
  # a study still training, or one finished whose runs a later step reads (its step then only re-renders it)
  if [ -f "$RESULTS/${pair#*:}/IN-PROGRESS.md" ] || { [ -f "$RESULTS/${pair#*:}/report.md" ] && [ ! -d "$EVIDENCE_DIR/${pair%%:*}" ]; }; then
    "$PYTHON" benchmarks/restore_runs.py "$RESULTS/${pair#*:}" "$EVIDENCE_DIR/${pair%%:*}"
  fi
done
mkdir -p "$EVIDENCE_DIR"
# one step, logged; a step that fails is logged and the queue goes on (a later one may not need it)
step() {
  local name=$1 log=$EVIDENCE_DIR/$1.log; shift
  echo "$(date -u +%FT%TZ) $*" >> "$log"
  local code=0
  nice "$@" >> "$log" 2>&1 || code=$?
  [ "$code" = 0 ] || echo "$(date -u +%FT%TZ) step $name failed with exit code $code (see $log)" | tee -a "$log" >&2
}
# the noisy BNN study (the clean one is collected), its robustness right after it: its final runs'
# checkpoints do not travel, so a final run is carried only once evaluated (--carry) and trains
# again on a new machine until it is
step bnn-noisy40 env REGIMES=noisy40 bash benchmarks/evidence/bnn_fashion_mnist.sh "$FMNIST" 2
step bnn-noisy40-robustness bash benchmarks/evidence/robustness_of_selected.sh "$FMNIST" 2 \
  "$EVIDENCE_DIR/bnn-fashion-mnist-lenet-noisy40"
step cifar10-resnet20-clean env REGIMES=clean bash benchmarks/evidence/cifar10_resnet20.sh "$CIFAR" 2
