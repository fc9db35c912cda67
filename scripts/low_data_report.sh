#!/usr/bin/env bash
# The low-data experiment's committed results, regenerated from the sweep's workdirs:
#   bash scripts/low_data_report.sh [SWEEP_DIR] [OUT]
# (defaults runs/sweeps/e2e_low_data and docs/low_data). Copies each finished run's summary
# (config.json, params.json, results.json, metrics.jsonl; not its checkpoints) to OUT/runs/<run>/,
# then runs compare over every summary in OUT/runs (table.md and the one figure this experiment
# reads, metric_vs_train_examples.png; the checkpoint column is empty there, since no checkpoint
# is committed) and writes the paired differences to OUT/paired.md. Summaries already in
# OUT/runs stay, so runs whose workdirs are gone still count.
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP_DIR=${1:-runs/sweeps/e2e_low_data}
OUT=${2:-docs/low_data}
PYTHON=${PYTHON:-python}

[ -d "$SWEEP_DIR" ] || { echo "error: no sweep directory $SWEEP_DIR; give the sweep's root/<experiment> as the first argument" >&2; exit 2; }
mkdir -p "$OUT/runs"
copied=0
for workdir in "$SWEEP_DIR"/*/; do
  workdir=${workdir%/}
  [ -f "$workdir/results.json" ] || continue  # unfinished: nothing to report yet
  dest="$OUT/runs/$(basename "$workdir")"
  mkdir -p "$dest"
  for f in config.json params.json results.json metrics.jsonl; do
    [ -f "$workdir/$f" ] && cp "$workdir/$f" "$dest/"
  done
  copied=$((copied + 1))
done
echo "copied $copied finished runs into $OUT/runs ($(ls "$OUT/runs" | wc -l) summaries in all)"

workdirs=()
for summary in "$OUT"/runs/*/; do workdirs+=("--workdir=${summary%/}"); done
JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} "$PYTHON" -m prefix_jax.compare "${workdirs[@]}" --out="$OUT" --ignore='^name$' \
  --figures=metric_vs_train_examples
"$PYTHON" scripts/low_data_paired.py "$OUT/runs" > "$OUT/paired.md"
echo "wrote $OUT/table.md, $OUT/metric_vs_train_examples.png and $OUT/paired.md"
