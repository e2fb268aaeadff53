#!/usr/bin/env bash
# Tuned SGD vs SAM vs OT-MDR on full Fashion-MNIST with a 2x512 MLP: 40% symmetric label noise,
# then clean labels. Each method's radius is chosen on the validation split (5 values each), the
# chosen settings then train over 5 seeds; then the matched-radius runs (first 3 seeds, to fit the budget). Resumable: rerun the same command after a kill.
#   benchmarks/evidence/fashion_mnist_mlp.sh DATA_DIR [JOBS]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:?usage: $0 DATA_DIR_WITH_FASHION_MNIST_IDX_FILES [JOBS]}
JOBS=${2:-2}
OTMDR=${OTMDR:-.venv/bin/otmdr}
GRID=(--grid sam.rho=0.02,0.05,0.1,0.2,0.5 --grid 'otmdr.rho=[0.005,0.01],[0.01,0.02],[0.025,0.05],[0.05,0.1],[0.1,0.2]')
for regime in noisy40 clean; do  # (the label-noise run first: the regime where flat minima are expected to matter)
  noise=(); [ "$regime" = noisy40 ] && noise=(--set data.label_noise=0.4)
  "$OTMDR" compare --config configs/fashion-mnist-mlp.yaml --data-dir "$DATA" --methods sgd,sam,otmdr \
    --seeds 5 "${GRID[@]}" "${noise[@]}" --reference sgd,sam --jobs "$JOBS" --resume --out "runs/evidence/fashion-mnist-mlp-$regime"
  .venv/bin/python benchmarks/evidence/matched_radius.py "runs/evidence/fashion-mnist-mlp-$regime" --jobs "$JOBS" --seeds 3 \
    --otmdr "$OTMDR"
done
