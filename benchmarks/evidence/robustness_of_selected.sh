#!/usr/bin/env bash
# Corruption, PGD and sharpness evaluation (benchmarks/robustness.py) of the tuned studies of
# issue 10, so the robustness claims rest on tuned runs: every run of each method's chosen setting
# (all evaluation seeds: under the review protocol none is a search run, under the old one the
# first seed's was), on a fixed 1,000-image test subset and its corrupted copy (written once by
# otmdr corrupt), PGD-10 at eps 1-8/255, sharpness on 256 training images, and loss landscapes
# of the first seed with the interpolation from the baseline's run (the first method: sgd/joint for ensembles, SGVB for BNNs, SGD for single models)
# to each other method's run. Each report goes to STUDY/robustness/robustness.md. A study's
# matched-radius studies (STUDY-matched-sam, STUDY-matched-otmdr) are evaluated after it, copying
# its evaluations of the runs they share with it (robustness.py --reuse).
#
#   benchmarks/evidence/robustness_of_selected.sh DATA_DIR [JOBS] [STUDY_DIR ...]
#
# Without STUDY_DIRs: every finished study (one with a report.md) among
#   $EVIDENCE_DIR/ensembles-fashion-mnist-mlp-x3-{clean,noisy40}  (ensembles_fashion_mnist.sh)
#   $EVIDENCE_DIR/bnn-fashion-mnist-lenet-{clean,noisy40}          (bnn_fashion_mnist.sh)
#   $EVIDENCE_DIR/fashion-mnist-mlp-{noisy40,clean}                (fashion_mnist_mlp.sh)
# Unfinished ones are skipped with a note. Resumable: finished evaluations are reused.
#
# Environment: OTMDR (default .venv/bin/otmdr), PYTHON (default .venv/bin/python), EVIDENCE_DIR
# (default runs/evidence), DATASET (the studies' dataset as `otmdr datasets` names it, default
# fashion-mnist; cifar10-jpeg for the CIFAR-10 studies), BNN_SAMPLES (below), SMOKE=1: 100 test images, two corruptions at
# severities 1 and 5, eps 8/255 only, tiny sharpness and landscape settings (studies from
# ${TMPDIR:-/tmp}/otmdr-evidence-smoke).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:?usage: [DATASET=NAME] $0 DATA_DIR [JOBS] [STUDY_DIR ...]}
JOBS=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
OTMDR=${OTMDR:-.venv/bin/otmdr}
PYTHON=${PYTHON:-.venv/bin/python}
DATASET=${DATASET:-fashion-mnist}
LIMIT=1000
# Bayesian networks through a BNN_SAMPLES-draw predictive (default 30, as the first BNN study's
# evaluation), whatever their study tested with (100 in bnn_fashion_mnist.sh): each draw is a
# forward pass per image and condition, and the 20 models of a study take about 8 h with 2 jobs
# here at 100 draws, about 2.5 h at 30
BNN_SAMPLES=${BNN_SAMPLES:-30}
EVAL=(--sharpness-samples 256 --sharpness-iterations 20 --sharpness-probes 10
      --landscape --landscape-samples 512 --landscape-points 11)
CORRUPT=()
if [ "${SMOKE:-0}" = 1 ]; then
  LIMIT=100
  EVAL=(--corruptions gaussian_noise,contrast --severities 1,5 --eps 8/255 --pgd-steps 2
        --sharpness-samples 32 --sharpness-iterations 2 --sharpness-probes 2
        --landscape --landscape-samples 32 --landscape-points 3)
  CORRUPT=(--corruptions gaussian_noise,contrast)
  EVIDENCE_DIR=${EVIDENCE_DIR:-${TMPDIR:-/tmp}/otmdr-evidence-smoke}
fi
EVIDENCE_DIR=${EVIDENCE_DIR:-runs/evidence}
studies=("$@")
if [ ${#studies[@]} -eq 0 ]; then
  for name in ensembles-fashion-mnist-mlp-x3-{clean,noisy40} bnn-fashion-mnist-lenet-{clean,noisy40} \
              fashion-mnist-mlp-{noisy40,clean}; do
    studies+=("$EVIDENCE_DIR/$name")
  done
fi
# the matched-radius comparisons of a study too (SAM at OT-MDR's radius and the reverse): is a
# robustness gap between the methods one of radius or of method?
for study in "${studies[@]}"; do
  for matched in "$study-matched-sam" "$study-matched-otmdr"; do
    [ -d "$matched" ] && studies+=("$matched")
  done
done
CORRUPTED="$EVIDENCE_DIR/$DATASET-c$LIMIT"
"$OTMDR" corrupt --dataset "$DATASET" --data-dir "$DATA" --limit "$LIMIT" ${CORRUPT[@]+"${CORRUPT[@]}"} --out "$CORRUPTED"
done_studies=()
for study in "${studies[@]}"; do
  if [ ! -f "$study/report.md" ]; then
    echo "skipped $study: not finished (no report.md)"
    continue
  fi
  echo "== $study"
  draws=(); case $(basename "$study") in bnn-*) draws=(--predictive-samples "$BNN_SAMPLES");; esac
  reuse=(); case $study in *-matched-sam|*-matched-otmdr) reuse=(--reuse "${study%-matched-*}/robustness");; esac
  "$PYTHON" benchmarks/robustness.py "$study" --data-dir "$DATA" --corrupted-dir "$CORRUPTED" \
    --out "$study/robustness" --test-limit "$LIMIT" "${EVAL[@]}" ${draws[@]+"${draws[@]}"} \
    ${reuse[@]+"${reuse[@]}"} --jobs "$JOBS"
  done_studies+=("$study")
done
echo
echo "Commit the robustness reports with (RESULTS: the folder collect_report.py copied the study to, e.g. a"
echo "rerun's NAME-rerun; benchmarks/evidence/pending.sh lists them):"
for study in ${done_studies[@]+"${done_studies[@]}"}; do
  echo "  cp -r $study/robustness benchmarks/results/RESULTS/  # RESULTS for $(basename "$study")"
done
echo "  $PYTHON benchmarks/results_policy.py --apply  # logs packed, unembedded figures dropped (benchmarks/results/README.md)"
