#!/usr/bin/env bash
# Tuned Bayesian networks (issue 10): mean-field Gaussian LeNet (configs/bnn-fashion-mnist.yaml:
# 10,000-image Fashion-MNIST subset, 9,500 train / 500 validation, 2,000 test images, Adam 1e-3,
# KL weight 5e-6, ECE with 20 bins; here a 100-sample predictive, since at the config's 30 a second
# sampling pass flipped two verdicts of the efficiency study's Bayesian MLP) for 20 epochs (in a
# 24-epoch SGVB probe the validation accuracy rose to 87-88% by epoch 19 and then stayed there, while
# the validation NLL still fell slowly: near, not at, convergence), clean labels, then 40% symmetric
# label noise. SGVB (sgd), SGVB at equal compute (sgd@compute: twice the epochs), flat SGVB (sam:
# SAM on the means) and OT-MDR on the means, paired 95% intervals, TOST at +-0.5 points and Holm
# against SGVB and flat SGVB over 5 evaluation seeds; accuracy, NLL and ECE of the 100-sample
# predictive, final and early-stopped. Chosen on the validation split, at a search seed apart
# from the evaluation seeds (review protocol, issue 24; the grids extend past both edges the first
# study's choices sat at):
#   sgd     Adam lr 5e-4, 1e-3, 2e-3 (likewise sgd@compute)
#   sam     rho 0.0005, 0.001, 0.005 (the release's), 0.02, 0.05
#   otmdr   rho [0.0005,0.001] ... [0.01,0.02] (5 values, [0.005,0.01] the release's)
#           x noise_std 0, 1e-3, 3e-3 (per coordinate: at the release's 0.01 the noise's norm is
#           ~5.5 on this network against rho1 + rho2 = 0.015, so it, not rho, sets the radius)
# Batch-norm statistics from the clean pass only (--bn-policy clean, the release's BNN step).
# The search runs train the full budget at search seed 1000; every evaluation run is a fresh run.
# A choice at an edge of its grid is searched past it (--extend-edges 2).
# Resumable: rerun the same command after a kill (finished runs are reused).
#
#   benchmarks/evidence/bnn_fashion_mnist.sh DATA_DIR [JOBS]
#
# Environment: OTMDR (the otmdr command, default .venv/bin/otmdr), PYTHON (default
# .venv/bin/python), EVIDENCE_DIR (default runs/evidence), REGIMES (default "clean noisy40"; one of
# them runs that half only), SMOKE=1: the same grids and commands at a
# toy size (1 epoch, 500 training / 200 test images, 2 seeds, 5-sample predictive) into
# ${TMPDIR:-/tmp}/otmdr-evidence-smoke, to check the script end to end in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:?usage: $0 DATA_DIR_WITH_FASHION_MNIST_IDX_FILES [JOBS]}
JOBS=${2:-2}
OTMDR=${OTMDR:-.venv/bin/otmdr}
PYTHON=${PYTHON:-.venv/bin/python}
EPOCHS=20
SEEDS=5
SIZE=()
if [ "${SMOKE:-0}" = 1 ]; then
  EPOCHS=1
  SEEDS=2
  SIZE=(--set data.train_limit=500 --set data.test_limit=200 --set bayes.test_samples=5)
  EVIDENCE_DIR=${EVIDENCE_DIR:-${TMPDIR:-/tmp}/otmdr-evidence-smoke}
fi
EVIDENCE_DIR=${EVIDENCE_DIR:-runs/evidence}
GRID=(--grid 'sam.rho=0.0005,0.001,0.005,0.02,0.05'
      --grid 'otmdr.rho=[0.0005,0.001],[0.001,0.002],[0.0025,0.005],[0.005,0.01],[0.01,0.02]'
      --grid 'otmdr.noise_std=0,1e-3,3e-3'
      --grid 'sgd:optim.lr=5e-4,1e-3,2e-3' --grid 'sgd@compute:optim.lr=5e-4,1e-3,2e-3')
source benchmarks/evidence/_regimes.sh
METHODS=sgd,sgd@compute,sam,otmdr
run_regimes bnn-fashion-mnist-lenet --config configs/bnn-fashion-mnist.yaml --methods "$METHODS" \
  --seeds "$SEEDS" "${GRID[@]}" --extend-edges 2 --set train.epochs="$EPOCHS" --set bayes.test_samples=100 \
  ${SIZE[@]+"${SIZE[@]}"} --bn-policy clean \
  --reference sgd,sam
