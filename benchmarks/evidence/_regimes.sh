# Sourced by the issue-10 evidence scripts: one `otmdr compare` per label regime (clean, then 40%
# symmetric noise) into $EVIDENCE_DIR/<prefix>-<regime>, then the commands that commit the results.
#   run_regimes PREFIX COMPARE_ARGUMENTS...   (uses OTMDR, PYTHON, DATA, JOBS, EVIDENCE_DIR)
# REGIMES (default "clean noisy40") runs a part only, e.g. REGIMES=noisy40 when the clean study is
# already committed and this machine does not hold its runs.
run_regimes() {
  local prefix=$1 regime name noise
  shift
  local names=()
  for regime in ${REGIMES:-clean noisy40}; do
    if [ "$regime" != clean ] && [ "$regime" != noisy40 ]; then
      echo "error: REGIMES: unknown regime '$regime'; use clean, noisy40 or both (\"clean noisy40\")" >&2
      exit 2
    fi
  done
  for regime in ${REGIMES:-clean noisy40}; do
    noise=(); [ "$regime" = noisy40 ] && noise=(--set data.label_noise=0.4)
    name="$prefix-$regime"
    "$OTMDR" compare --data-dir "$DATA" "$@" ${noise[@]+"${noise[@]}"} --jobs "$JOBS" --resume --quiet \
      --out "$EVIDENCE_DIR/$name"
    names+=("$name")
  done
  echo
  local folders=""
  for name in "${names[@]}"; do folders+=" $EVIDENCE_DIR/$name"; done
  echo "done. Robustness of the selected runs: benchmarks/evidence/robustness_of_selected.sh $DATA $JOBS$folders"
  echo "Commit the reports with:"
  for name in "${names[@]}"; do
    echo "  $PYTHON benchmarks/collect_report.py $EVIDENCE_DIR/$name $name"
  done
}
