"""The import rules of docs/architecture.md, checked over the package's source.

The layer table is parsed from the doc itself, so the doc and the check cannot drift apart.
"""

import ast
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

DOC = os.path.join(REPO, "docs", "architecture.md")
PACKAGE = os.path.join(REPO, "prefix_jax")


def read_layers() -> list[tuple[str, list[str]]]:
    """(layer name, module patterns) from the table between the `layers:` markers, top first."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    table = text.split("<!-- layers: begin")[1].split("<!-- layers: end")[0]
    layers = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[1].startswith("`"):
            continue  # the header, its rule, the marker comment
        layers.append((cells[0], re.findall(r"`([\w.*]+)`", cells[1])))
    return layers


def module_names() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    names = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                names[".".join(parts)] = path
    return names


def layer_of(module: str, layers) -> int | None:
    for rank, (_, patterns) in enumerate(layers):
        for pattern in patterns:
            if pattern.endswith(".*"):
                if module == pattern[:-2] or module.startswith(pattern[:-1]):
                    return rank
            elif module == pattern:
                return rank
    return None


def imported_modules(path: str, known: set[str]) -> set[str]:
    """The package modules a file imports, at module level or inside functions."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("prefix_jax"))
        elif isinstance(node, ast.ImportFrom) and node.module \
                and node.module.startswith("prefix_jax"):
            for alias in node.names:  # `from pkg import module` names a module, else a symbol
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return found


def test_every_module_has_a_layer_and_every_listed_module_exists():
    layers = read_layers()
    assert [name for name, _ in layers][:2] == ["entry points", "the loop"], layers
    modules = module_names()
    assert [m for m in modules if layer_of(m, layers) is None] == []
    listed = [p for _, patterns in layers for p in patterns]
    missing = [p for p in listed if (p[:-2] if p.endswith(".*") else p) not in modules]
    assert missing == [], f"docs/architecture.md lists modules that do not exist: {missing}"


def test_imports_only_point_down():
    layers = read_layers()
    modules = module_names()
    upward = []
    for module, path in sorted(modules.items()):
        own = layer_of(module, layers)
        for target in sorted(imported_modules(path, set(modules))):
            rank = layer_of(target, layers)
            if rank is not None and rank < own:
                upward.append(f"{module} ({layers[own][0]}) imports {target} "
                              f"({layers[rank][0]})")
    assert upward == [], "imports that point up a layer:\n" + "\n".join(upward)


def test_the_loop_imports_no_task_metric_or_decoding_module():
    modules = module_names()
    direct = imported_modules(modules["prefix_jax.train"], set(modules))
    allowed_task_modules = {"prefix_jax.tasks", "prefix_jax.tasks.base", "prefix_jax.tasks.evals"}
    forbidden = sorted(m for m in direct
                       if (m.startswith("prefix_jax.tasks") and m not in allowed_task_modules)
                       or m in ("prefix_jax.serving.decoding", "prefix_jax.serving.evaluation"))
    assert forbidden == []
    # Nor indirectly, at import time: the registry imports a task only when asked for it.
    code = ("import json, sys, prefix_jax.train; print(json.dumps(sorted(m for m in sys.modules "
            "if m.startswith(('prefix_jax.tasks.', 'prefix_jax.serving.decoding', 'sacrebleu', "
            "'rouge_score')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True).stdout
    loaded = [m for m in json.loads(out) if m not in allowed_task_modules]
    assert loaded == [], f"importing prefix_jax.train loads {loaded}"


@pytest.mark.parametrize("rule", ["models", "data"])
def test_models_and_data_import_nothing_above_them(rule):
    """Stated separately in the doc: a model imports no task, data, training or tool module;
    the pipeline no task. (Implied by the table; kept as its own check for a clear message.)"""
    modules = module_names()
    forbidden_prefixes = {
        "models": ("prefix_jax.tasks", "prefix_jax.data", "prefix_jax.training",
                   "prefix_jax.serving", "prefix_jax.prefix", "prefix_jax.train"),
        "data": ("prefix_jax.tasks", "prefix_jax.models", "prefix_jax.serving",
                 "prefix_jax.prefix", "prefix_jax.train"),
    }[rule]
    bad = [f"{m} imports {t}" for m, path in modules.items()
           if m.startswith(f"prefix_jax.{rule}")
           for t in imported_modules(path, set(modules))
           if any(t == p or t.startswith(p + ".") for p in forbidden_prefixes)]
    assert bad == []
