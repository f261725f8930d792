#!/usr/bin/env bash
# BENCHMARKS.md's model table on one GPU. Every compiled (model, mode) cell is first compiled untimed, JOBS at a time,
# which fills inductor's cache; then bench_models.py times one cell at a time (its "compile s" are then cache hits).
# Usage: benchmarks/model_table.sh OUT.json MODEL...   (environment: BATCH, MODES, JOBS, REP_MS, STOP_AFTER_S;
# PHASE=warm or PHASE=time runs one phase only)
set -u
out=$1; shift
batch=${BATCH:-128}
modes=${MODES:-"ref ref+compile hub hub+compile ref+compile-cg hub+compile-cg timm timm+compile"}
[ "${PHASE:-}" = time ] || for m in "$@"; do
  for mode in $modes; do
    case $mode in *compile*) echo "$m $mode" ;; esac
  done
done | xargs -P "${JOBS:-8}" -L 1 sh -c \
  "python benchmarks/bench_models.py \"\$0\" --modes \"\$1\" --batch $batch --rep-ms 10 >/dev/null 2>&1"
[ "${PHASE:-}" = warm ] || python benchmarks/bench_models.py "$@" --modes $modes --batch $batch --rep-ms "${REP_MS:-600}" --json "$out" \
  ${STOP_AFTER_S:+--stop-after-s "$STOP_AFTER_S"}
