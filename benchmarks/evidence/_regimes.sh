# Sourced by the issue-10 evidence scripts: one `otmdr compare` per label regime (clean, then 40%
# symmetric noise) into $EVIDENCE_DIR/<prefix>-<regime>, then the commands that commit the results.
#   run_regimes PREFIX COMPARE_ARGUMENTS...   (uses OTMDR, PYTHON, DATA, JOBS, EVIDENCE_DIR)
run_regimes() {
  local prefix=$1 regime name noise
  shift
  local names=()
  for regime in clean noisy40; do
    noise=(); [ "$regime" = noisy40 ] && noise=(--set data.label_noise=0.4)
    name="$prefix-$regime"
    "$OTMDR" compare --data-dir "$DATA" "$@" ${noise[@]+"${noise[@]}"} --jobs "$JOBS" --resume --quiet \
      --out "$EVIDENCE_DIR/$name"
    names+=("$name")
  done
  echo
  echo "done. Robustness of the selected runs: benchmarks/evidence/robustness_of_selected.sh $DATA $EVIDENCE_DIR/${names[0]} ..."
  echo "Commit the reports with:"
  for name in "${names[@]}"; do
    echo "  $PYTHON benchmarks/collect_report.py $EVIDENCE_DIR/$name $name"
  done
}
