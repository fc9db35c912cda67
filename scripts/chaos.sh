#!/usr/bin/env bash
# Kill a runlocal training run at random moments N times (SIGKILL, every third one SIGTERM),
# rerun the same command after each kill, and check that the final prefix is bitwise equal to
# that of an uninterrupted run.
#   bash scripts/chaos.sh [N=5] [SEED=0]      (uses .venv/ or $PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5}
RANDOM=${2:-0}
PY=${PYTHON:-.venv/bin/python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
FLAGS=(--config=experiments/e2e_smollm2.py:runlocal --config.eval.num_examples=0
       --config.eval.eval_untuned=False --config.train.num_steps=80
       --config.train.checkpoint_every=4)

latest_step() {
  ls "$1/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1 || true
}

echo "reference: uninterrupted run"
"$PY" -m prefix_jax.main "${FLAGS[@]}" --workdir="$TMP/reference" >"$TMP/reference.log" 2>&1

# Each round: start the run, wait until it has written a checkpoint newer than the last round's
# (so every kill interrupts training, not start-up), then kill it 0 to 3 s later: at a random
# point of a step, an evaluation or a checkpoint write.
for i in $(seq 1 "$N"); do
  before=$(latest_step "$TMP/chaos")
  "$PY" -m prefix_jax.main "${FLAGS[@]}" --workdir="$TMP/chaos" >"$TMP/chaos_$i.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [ "$(latest_step "$TMP/chaos")" = "$before" ]; do
    sleep 0.1
  done
  delay=$(( RANDOM % 300 ))
  sleep "$((delay / 100)).$(printf %02d $((delay % 100)))"
  signal=KILL; [ $((i % 3)) -eq 0 ] && signal=TERM
  if kill -s "$signal" "$pid" 2>/dev/null; then
    wait "$pid" 2>/dev/null && status=0 || status=$?
    echo "kill $i: SIG$signal $((delay / 100)).$(printf %02d $((delay % 100))) s after" \
         "checkpoint $(latest_step "$TMP/chaos" | head -1) appeared; exit status $status"
  else
    wait "$pid" || true
    echo "kill $i: the run had already finished"
  fi
done

echo "final: rerun to completion"
"$PY" -m prefix_jax.main "${FLAGS[@]}" --workdir="$TMP/chaos" >"$TMP/final.log" 2>&1
grep -h "resumed from" "$TMP"/chaos_*.log "$TMP/final.log" | sed 's/^/  /' || true
"$PY" - "$TMP/reference" "$TMP/chaos" <<'PYEOF'
import sys

import jax
import numpy as np

from prefix_jax.training import checkpoint

want, got = (checkpoint.load_state_arrays(d)["trainable"]["prefix"] for d in sys.argv[1:])
same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)))
print("final prefix bitwise equal to the uninterrupted run:", same)
sys.exit(0 if same else 1)
PYEOF
