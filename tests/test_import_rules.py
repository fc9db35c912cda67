"""The package's import rules (the layers of docs/architecture.md), checked over the source:
the loop never imports a task, metric or decoder; a model never imports tasks, data, training
or tools; the data pipeline imports no task; serving never imports the loop; the task registry
imports a task's module only when that task is asked for."""

import ast
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

PACKAGE = os.path.join(REPO, "prefix_jax")
TOOLS = ("prefix_jax.main", "prefix_jax.train", "prefix_jax.cli", "prefix_jax.export",
         "prefix_jax.eject", "prefix_jax.sweep", "prefix_jax.compare")
TASK_INTERFACE = ("prefix_jax.tasks", "prefix_jax.tasks.base", "prefix_jax.tasks.evals")


def imports_of(path: str) -> set[str]:
    """Every module a file imports, at the top or inside a function ('from a import b' counts
    as a.b too, since b may be a module)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("prefix_jax")}


def modules_under(folder: str) -> list[str]:
    out = []
    for root, _, files in os.walk(os.path.join(PACKAGE, folder)):
        out += [os.path.join(root, f) for f in files if f.endswith(".py")]
    return sorted(out)


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_loop_imports_no_task_metric_or_decoder():
    bad = {name for name in imports_of(os.path.join(PACKAGE, "train.py"))
           if (under(name, "prefix_jax.tasks") and name not in TASK_INTERFACE
               and not name.startswith("prefix_jax.tasks.base."))
           or under(name, "prefix_jax.serving.decoding", "prefix_jax.serving.evaluation")}
    assert not bad, f"train.py imports {sorted(bad)}"


@pytest.mark.parametrize("folder, banned", [
    ("models", ("prefix_jax.tasks", "prefix_jax.data", "prefix_jax.training", *TOOLS)),
    ("data", ("prefix_jax.tasks", *TOOLS)),
    ("serving", ("prefix_jax.train", "prefix_jax.tasks")),
])
def test_layers_import_only_downwards(folder, banned):
    bad = {(os.path.relpath(path, REPO), name) for path in modules_under(folder)
           for name in imports_of(path) if under(name, *banned)}
    assert not bad, sorted(bad)


def test_the_task_registry_imports_task_modules_lazily():
    code = ("import sys, prefix_jax.tasks, prefix_jax.train; "
            "print(sorted(m for m in sys.modules if m.startswith('prefix_jax.tasks.') "
            "or m in ('prefix_jax.serving.decoding', 'prefix_jax.serving.evaluation')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True).stdout
    assert out.strip() == "['prefix_jax.tasks.base', 'prefix_jax.tasks.evals']", out
