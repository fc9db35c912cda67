"""The Python API (prefix_jax/api.py): README.md's "Python API" snippet runs as written (so the
docs cannot rot), and its functions give what the command-line tools give."""

import os
import re

import numpy as np
import pytest

from prefix_jax import api
from prefix_jax.errors import UserError
from tests.helpers import REPO, run_tool

SNIPPET = re.compile(r"<!-- api-snippet: begin -->\n```python\n(.*?)```\n<!-- api-snippet: end -->",
                     re.DOTALL)


def readme_snippet() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        found = SNIPPET.findall(f.read())
    assert len(found) == 1, "README.md must hold one api-snippet block"
    return found[0]


@pytest.fixture(scope="module")
def snippet_run(tmp_path_factory):
    """The README snippet, executed in a fresh directory (it writes runs/api_a, runs/api_b)."""
    where = tmp_path_factory.mktemp("snippet")
    namespace = {"__name__": "readme_snippet"}
    cwd = os.getcwd()
    os.chdir(where)
    try:
        exec(compile(readme_snippet(), "README.md:api-snippet", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return where, namespace


def test_readme_snippet_runs(snippet_run):
    where, ns = snippet_run
    run = ns["run"]
    assert run.num_rows == 2 and run.workdirs == ("runs/api_a", "runs/api_b")
    assert ns["scores"]["step"] == 4 and (where / "runs/api_a/results.json").is_file()
    for name in ("greedy", "mixed", "beams", "sampled"):
        assert len(ns[name]) == 2 and all(isinstance(t, str) for t in ns[name]), name
    assert len(ns["exact"]) == 1
    assert ns["mixed"][0] == ns["greedy"][0]  # row 0 either way
    cfg = run.base.config
    assert ns["kv"].k.shape == (cfg.n_layers, 10, cfg.n_kv_heads, cfg.head_dim)
    assert ns["kv"].k.dtype == np.float32
    np.testing.assert_array_equal(ns["kv"].v, np.asarray(run.prefixes.v[:, 1]))


def test_rows_of_a_mixed_batch_decode_as_alone(snippet_run):
    """A source decoded in a batch mixing prefixes gets what it gets alone with its prefix."""
    _, ns = snippet_run
    run, mrs = ns["run"], ns["mrs"]
    alone = api.generate(run, [mrs[1]], prefix_rows=[1], max_new_tokens=16)
    assert ns["mixed"][1] == alone[0]


def test_generate_equals_the_generate_tool(snippet_run, tmp_path, capsys):
    """The API and `python -m prefix_jax.generate` are one code path: the same text."""
    where, ns = snippet_run
    mrs = ns["mrs"]
    (tmp_path / "in.txt").write_text("".join(f"{k}\t{m}\n" for k, m in zip((0, 1), mrs)))
    status, _, err = run_tool("generate", f"--workdir={where / 'runs/api_a'}",
                              f"--workdir={where / 'runs/api_b'}",
                              f"--input={tmp_path / 'in.txt'}", f"--out={tmp_path / 'out.txt'}",
                              "--max_new_tokens=16", "--num_beams=4", capsys=capsys)
    assert status == 0, err
    want = api.generate(ns["run"], mrs, prefix_rows=[0, 1], num_beams=4, max_new_tokens=16)
    assert (tmp_path / "out.txt").read_text().splitlines() == [" ".join(t.splitlines())
                                                               for t in want]


def test_mistakes(snippet_run, tmp_path):
    _, ns = snippet_run
    run = ns["run"]
    with pytest.raises(UserError, match="prefix row 2 is out of range"):
        api.generate(run, ["x"], prefix_rows=[2])
    with pytest.raises(UserError, match="prefix row 5 is out of range"):
        api.prefix_kv(run, row=5)
    with pytest.raises(ValueError, match="prefix_rows"):
        api.generate(run, ["x", "y"], prefix_rows=[0])
    with pytest.raises(ValueError, match="sampling with num_beams > 1"):
        api.generate(run, ["x"], num_beams=2, do_sample=True)
    with pytest.raises(UserError, match=r"has no config\.json"):
        api.load(tmp_path)  # not a workdir
