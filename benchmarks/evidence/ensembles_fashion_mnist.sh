#!/usr/bin/env bash
# Tuned ensembles (issue 10): 3 MLPs (2x512 each) on a 10,000-image Fashion-MNIST subset (8,000
# train / 2,000 validation, full test set), 30 epochs (SGD's validation accuracy has levelled off
# by then: see benchmarks/results/README.md), clean labels, then 40% symmetric label noise.
# Methods: SGD (and SGD at equal compute, sgd/joint@compute: twice the epochs), SAM and OT-MDR on
# the joint ensemble, OT-MDR per member, and the deep ensemble (sgd/per-member); paired 95%
# intervals, TOST at +-0.5 points and Holm against sgd/joint, sgd/per-member and sam/joint (the
# paper's question: does OT-MDR beat SAM on an ensemble?) over 10 seeds (issue 24 asks for 10
# wherever a run costs under a few minutes: here 0.5-2 min on one core).
# Each method's setting is chosen on the validation split from its own grid, at a search seed
# apart from the evaluation seeds (review protocol, issue 24; grids extended past the first
# study's edges):
#   sgd/joint(@compute) lr 0.025, 0.05, 0.1
#   sgd/per-member     lr 0.025, 0.05, 0.1                      (the deep ensemble, a reference too)
#   sam/joint          rho 0.02, 0.05, 0.1, 0.2, 0.4            (one norm over all 3 members)
#   otmdr/joint        rho [0.00625,0.0125] ... [0.2,0.4]       (measured radius ~ SAM's range)
#   otmdr/per-member   rho [0.0025,0.005] ... [0.2,0.4]         (each member its own norm: the total
#                      radius is sqrt(3) times a member's; [0.05,0.1] is the paper's radius, at
#                      which per-member LeNets sat at chance; [0.1,0.2] and [0.2,0.4] were added
#                      after the noisy search chose [0.05,0.1], the end of the first grid: the
#                      search table and figures/search_radius.png show the score against radius)
# The search runs train the full 30 epochs at search seed 1000; every evaluation run is fresh. A
# choice at an edge of its grid is searched past it (--extend-edges 2).
# Resumable: rerun the same command after a kill (finished runs are reused).
#
#   benchmarks/evidence/ensembles_fashion_mnist.sh DATA_DIR [JOBS]
#
# Environment: OTMDR (the otmdr command, default .venv/bin/otmdr), PYTHON (default
# .venv/bin/python), EVIDENCE_DIR (default runs/evidence), REGIMES (default "clean noisy40"; one of
# them runs that half only), SMOKE=1: the same grids and commands at a
# toy size (1 epoch, 500 training / 200 test images, 2 seeds) into ${TMPDIR:-/tmp}/otmdr-evidence-smoke,
# to check the script end to end in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:?usage: $0 DATA_DIR_WITH_FASHION_MNIST_IDX_FILES [JOBS]}
JOBS=${2:-2}
OTMDR=${OTMDR:-.venv/bin/otmdr}
PYTHON=${PYTHON:-.venv/bin/python}
SEEDS=10
SIZE=()
if [ "${SMOKE:-0}" = 1 ]; then
  SEEDS=2
  SIZE=(--set train.epochs=1 --set data.train_limit=500 --set data.test_limit=200)
  EVIDENCE_DIR=${EVIDENCE_DIR:-${TMPDIR:-/tmp}/otmdr-evidence-smoke}
fi
EVIDENCE_DIR=${EVIDENCE_DIR:-runs/evidence}
METHODS=sgd/joint,sgd/joint@compute,sam/joint,otmdr/joint,otmdr/per-member,sgd/per-member
GRID=(--grid 'sam/joint:sam.rho=0.02,0.05,0.1,0.2,0.4'
      --grid 'otmdr/joint:otmdr.rho=[0.00625,0.0125],[0.0125,0.025],[0.025,0.05],[0.05,0.1],[0.1,0.2],[0.2,0.4]'
      --grid 'sgd/joint:optim.lr=0.025,0.05,0.1' --grid 'sgd/joint@compute:optim.lr=0.025,0.05,0.1'
      --grid 'sgd/per-member:optim.lr=0.025,0.05,0.1'
      --grid 'otmdr/per-member:otmdr.rho=[0.0025,0.005],[0.00625,0.0125],[0.0125,0.025],[0.025,0.05],[0.05,0.1],[0.1,0.2],[0.2,0.4]')
source benchmarks/evidence/_regimes.sh
run_regimes ensembles-fashion-mnist-mlp-x3 --config configs/ensemble-fashion-mnist-mlp-x3.yaml --methods "$METHODS" \
  --seeds "$SEEDS" "${GRID[@]}" --extend-edges 2 ${SIZE[@]+"${SIZE[@]}"} --reference sgd/joint,sgd/per-member,sam/joint
