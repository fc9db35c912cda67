#!/usr/bin/env bash
# Kill a runlocal training run at random moments N times (SIGKILL, every third one SIGTERM),
# then once during an evaluation and once during a checkpoint save (SIGKILL), rerun the same
# command after each kill, and check that the final prefix is bitwise equal to that of an
# uninterrupted run. While that uninterrupted run trains, a second run is started on its workdir:
# it must fail at once naming the first (the workdir lock) and leave the first unharmed.
#   bash scripts/chaos.sh [N=5] [SEED=0]      (uses .venv/ or $PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5}
RANDOM=${2:-0}
PY=${PYTHON:-.venv/bin/python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
FLAGS=(--config=experiments/e2e_smollm2.py:runlocal --config.eval.num_examples=4
       --config.eval.eval_untuned=False --config.train.num_steps=80
       --config.train.checkpoint_every=4 --config.train.eval_every=16)

latest_step() {
  ls "$1/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1 || true
}

echo "reference: uninterrupted run, and a second run started on its workdir meanwhile"
"$PY" -m prefix_jax.main "${FLAGS[@]}" --workdir="$TMP/reference" >"$TMP/reference.log" 2>&1 &
first=$!
while kill -0 "$first" 2>/dev/null && [ ! -e "$TMP/reference/run.lock" ]; do sleep 0.05; done
"$PY" -m prefix_jax.main "${FLAGS[@]}" --workdir="$TMP/reference" >"$TMP/second.log" 2>&1 \
  && second=0 || second=$?
first_alive=no; kill -0 "$first" 2>/dev/null && first_alive=yes
echo "second run on the same workdir: exit status $second (first still running: $first_alive)"
grep -m1 "^error:" "$TMP/second.log" | sed 's/^/  /' || true
wait "$first"  # set -e: the reference run must succeed
if [ "$second" -ne 2 ] || [ "$first_alive" != yes ] \
   || ! grep -q "in use by a running training run" "$TMP/second.log"; then
  echo "FAIL: the second run on a live workdir was not refused at once"; exit 1
fi

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

# During an evaluation: the dev evaluation runs right after the save of every 16th step and
# writes generations/dev_stepN.jsonl when it ends; the kill comes 0.5 s after that step's
# checkpoint appears, and counts as "during the evaluation" only if that file is not there yet.
W="$TMP/chaos"
eval_step=$(( ($(latest_step "$W") / 16 + 1) * 16 ))
if [ "$eval_step" -lt 80 ]; then
  "$PY" -m prefix_jax.main "${FLAGS[@]}" --workdir="$W" >"$TMP/chaos_eval.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [ ! -d "$W/checkpoints/$eval_step" ]; do sleep 0.05; done
  sleep 0.5
  during=no; ls "$W"/generations/dev_step"$eval_step".jsonl >/dev/null 2>&1 || during=yes
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null && status=0 || status=$?
  echo "kill during evaluation of step $eval_step: SIGKILL (evaluation unfinished: $during);" \
       "exit status $status"
fi

# During a checkpoint save: orbax writes each checkpoint into a temporary directory and renames
# it when complete; the kill comes as soon as such a directory is seen.
"$PY" -m prefix_jax.main "${FLAGS[@]}" --workdir="$W" >"$TMP/chaos_save.log" 2>&1 &
pid=$!
tmp_dir=""
while kill -0 "$pid" 2>/dev/null && [ -z "$tmp_dir" ]; do
  tmp_dir=$(ls "$W/checkpoints" 2>/dev/null | grep -m1 tmp || true)
done
kill -KILL "$pid" 2>/dev/null && killed=yes || killed=no
wait "$pid" 2>/dev/null && status=0 || status=$?
echo "kill during a checkpoint save: SIGKILL while $W/checkpoints/${tmp_dir:-?} existed" \
     "(killed: $killed); exit status $status"

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
