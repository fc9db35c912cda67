#!/usr/bin/env bash
# The E2E ablation on SmolLM2-135M at a CPU budget (docs/ablations.md): prefix length 1/5/10,
# prompt tuning (input embeddings only), full fine-tuning, infix, prefix + MLP; 150 steps of
# batch 8 each, greedy dev BLEU on the first 100 dev MRs. Then the table and figures:
#   python -m prefix_jax.compare --workdir='runs/ablation/*' --out=docs/ablations
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
ROOT=${ROOT:-runs/ablation}
# positions=auto: real tokens from 0 on SmolLM2 (after the prompt for prompt tuning), the
# convention these runs were made with before new configs defaulted to PEFT's (README)
common=(--config.train.num_steps=150 --config.train.checkpoint_every=1000
        --config.eval.num_examples=100 --config.eval.eval_untuned=False
        --config.prefix.positions=auto)
run() {  # name config [overrides...]
  local name=$1 config=$2; shift 2
  [ -f "$ROOT/$name/results.json" ] && { echo "skip $name"; return; }
  echo "== $name $(date +%T)"
  "$PY" -m prefix_jax.main --config="$config" --workdir="$ROOT/$name" "${common[@]}" "$@"
}
run prefix_len10 experiments/e2e_smollm2.py:prefix_len=10 --config.eval.eval_untuned=True
run prefix_len1 experiments/e2e_smollm2.py:prefix_len=1
run prefix_len5 experiments/e2e_smollm2.py:prefix_len=5
run prompt_len10 experiments/e2e_prompt.py:prefix_len=10
run finetune experiments/e2e_finetune.py
run infix_len10 experiments/e2e_infix.py:prefix_len=10
run prefix_mlp_len10 experiments/e2e_prefix_mlp.py:prefix_len=10
