#!/usr/bin/env bash
# The headline digits study under the review protocol (issue 24): SGD, SGD at equal compute, SAM
# and OT-MDR on scikit-learn's digits with 40% symmetric label noise (configs/demo-label-noise.yaml),
# at 40 epochs and at 150. Every method is searched on validation at 3 search seeds apart from the
# 10 evaluation seeds (SGD's learning rate and weight decay, 4 values each; radii past every earlier edge), and
# `sgd@compute` trains SGD at the gradient evaluations of the most expensive method (its epochs and
# schedule scaled). Paired t intervals, TOST verdicts at +-0.5 points, Holm over each report.
# Minutes on 2 cores. Resumable: rerun the same command after a kill.
#   benchmarks/evidence/digits.sh [JOBS]
set -euo pipefail
cd "$(dirname "$0")/../.."
JOBS=${1:-2}
OTMDR=${OTMDR:-.venv/bin/otmdr}
PYTHON=${PYTHON:-.venv/bin/python}
EVIDENCE_DIR=${EVIDENCE_DIR:-runs/evidence}
SEEDS=10; SEARCH_SEEDS=3; SMOKE_SET=()
if [ "${SMOKE:-0}" = 1 ]; then  # a check of the script, not evidence
  SEEDS=2; SEARCH_SEEDS=1; SMOKE_SET=(--set data.train_limit=300); EVIDENCE_DIR=/tmp/otmdr-evidence-smoke
fi
SGD_GRID=(optim.lr=0.01,0.025,0.05,0.1 optim.weight_decay=5e-4,5e-3,2e-2,5e-2)
GRID=(--grid sam.rho=0.02,0.05,0.1,0.2,0.5,1.0
      --grid 'otmdr.rho=[0.01,0.02],[0.025,0.05],[0.05,0.1],[0.1,0.2],[0.25,0.5],[0.5,1.0]')
for method in sgd sgd@compute; do
  for key in "${SGD_GRID[@]}"; do GRID+=(--grid "$method:$key"); done
done
names=()
for epochs in 40 150; do
  [ "${SMOKE:-0}" = 1 ] && epochs=$((epochs / 20))
  name="digits-mlp-noisy40-e$epochs"
  "$OTMDR" compare --config configs/demo-label-noise.yaml --methods sgd,sgd@compute,sam,otmdr \
    --seeds "$SEEDS" --search-seeds "$SEARCH_SEEDS" "${GRID[@]}" --set "train.epochs=$epochs" \
    ${SMOKE_SET[@]+"${SMOKE_SET[@]}"} --reference sgd,sgd@compute,sam --jobs "$JOBS" --resume --quiet \
    --out "$EVIDENCE_DIR/$name"
  names+=("$name")
done
echo
echo "Commit the reports with:"
for name in "${names[@]}"; do echo "  $PYTHON benchmarks/collect_report.py $EVIDENCE_DIR/$name $name"; done
