#!/usr/bin/env bash
# What docs/scaling.md reports for very large bases: the compiled memory plans (prefix_jax.bench.plan,
# no weights) and the real Llama-3.2-1B-shaped run on this CPU (random bf16 weights, a few prefix
# steps on E2E) with its peak RSS, each output kept in $OUT.
#   bash scripts/scaling.sh [plans|run_1b|all]     (uses .venv/ or $PYTHON; OUT=runs/scaling)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/scaling}
mkdir -p "$OUT"
export JAX_PLATFORMS=cpu
unset XLA_FLAGS  # the plan sets its own simulated device count

plan() {  # plan MODEL DEVICES FLAGS...: one table, with the tool's wall time and peak RSS
  local file="$OUT/plan_$1_$2.txt"
  { echo "\$ python -m prefix_jax.bench.plan --model=$1 --devices=$2 ${*:3}"
    /usr/bin/time -f "wall %e s, max RSS %M KB" "$PY" -m prefix_jax.bench.plan --model="$1" \
      --devices="$2" "${@:3}"; } > "$file" 2>&1 || { cat "$file"; return 1; }
  cat "$file"
}

plans() {
  plan llama-3.2-1b 1 --seq_lens=128 --remats=dots --dtype=float32  # what run_1b runs
  plan llama-3.2-1b 8 --seq_lens=2048 --remats=none,full
  plan llama-3.1-8b 64 --seq_lens=2048 --remats=full
  plan llama-3.1-70b 64 --seq_lens=2048 --remats=full
  plan llama-3.1-70b 256 --seq_lens=2048 --remats=full
  plan llama-3.1-8b 8 --seq_lens=2048 --remats=full
  plan smollm2-1.7b 8 --seq_lens=2048 --remats=full
}

run_1b() {  # 16 prefix steps over 8 E2E pairs (batch 2 x 128 tokens: each pair every 4th step),
            # float32 activations on the bf16 base
  rm -rf "$OUT/llama1b"
  /usr/bin/time -v "$PY" -m prefix_jax.main --config=experiments/e2e_smollm2.py \
    --workdir="$OUT/llama1b" --config.model.path=random:llama-3.2-1b \
    --config.model.param_dtype=bfloat16 --config.model.dtype=float32 \
    --config.prefix.init=random --config.data.train_examples=8 \
    --config.data.bucket_multiple=128 --config.train.num_steps=16 --config.train.batch_size=2 \
    --config.train.log_every=1 --config.train.checkpoint_every=16 \
    --config.optim.lr=0.05 --config.optim.warmup_steps=2 --config.eval.num_examples=0 \
    --config.eval.eval_untuned=False 2> "$OUT/llama1b.err"
  grep -E "Maximum resident|Elapsed" "$OUT/llama1b.err"
  cat "$OUT/llama1b/metrics.jsonl"
}

case ${1:-all} in
  plans) plans ;;
  run_1b) run_1b ;;
  all) run_1b; plans ;;
  *) echo "usage: bash scripts/scaling.sh [plans|run_1b|all]" >&2; exit 2 ;;
esac
