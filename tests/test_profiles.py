"""The per-op profilers (bench.step_profile, bench.decode_profile) run end to end and account
for their ops: every class row, and the slowest ops with how often each ran."""

import pytest

from tests.helpers import run_tool

CLASSES = ("matmul", "softmax/reduce", "gather/scatter/slice", "layout", "elementwise")


def _rows(out: str) -> dict[str, list[str]]:
    """Table rows by their first cell."""
    return {cells[0]: cells[1:] for line in out.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_step_profile_on_the_tiny_model(capsys):
    status, out, err = run_tool("bench.step_profile", "--model=tiny", "--steps=1", "--top=5",
                                capsys=capsys)
    assert status == 0, err
    rows = _rows(out)
    assert float(rows["matmul"][0]) > 0
    shares = [int(rows[c][1].rstrip("%")) for c in CLASSES if c in rows]
    assert 98 <= sum(shares) <= 102  # the classes partition the traced op time
    ops = [r for r in rows.values() if len(r) == 4 and r[0] in CLASSES]
    assert len(ops) == 5 and all(float(r[2]) >= 1 for r in ops)  # each op ran at least once


@pytest.mark.real_model
def test_decode_profile_counts_loop_ops_once_per_step(smollm2, capsys):
    """A beam-2 batch of 2 prompts, 4 new tokens: the ops of the decoding loop body run a few
    times per batch (once per generated token, or per token and layer inside the layer scan)."""
    status, out, err = run_tool("bench.decode_profile", "--batch_size=2", "--num_beams=2",
                                "--max_new_tokens=4", "--top=8", capsys=capsys)
    assert status == 0, err
    assert "batch of 2 prompts x 2 beams" in out
    rows = _rows(out)
    assert float(rows["matmul"][0]) > 0
    runs = [float(r[2]) for r in rows.values() if len(r) == 4 and r[0] in CLASSES]
    assert len(runs) == 8 and max(runs) >= 4  # a loop op ran at least once per new token
