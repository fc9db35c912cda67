"""Scalars to `workdir/metrics.jsonl` (one JSON object per line, with `step`) and TensorBoard.

After a resume the file holds each row once: rows logged after the restored step (the steps the
resumed run trains again) are dropped when the writer opens, and a row written again for a step
at or before it (the final evaluation of a finished run rerun, the untuned baseline recomputed)
replaces the earlier one. TensorBoard gets the same cut through its `purge_step`.
"""

from __future__ import annotations

import json
import os

from etils import epath
from tensorboardX import SummaryWriter

from prefix_jax.training import workdir as workdir_io

FILE = "metrics.jsonl"


def _row_key(row: dict) -> tuple[int, frozenset[str]]:
    return int(row.get("step", 0)), frozenset(row)


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
        """`resume_step`: the step the run starts from (0 for a fresh one); rows logged after it
        by an earlier attempt are dropped. None keeps every row."""
        self.enabled = enabled
        if not enabled:
            return
        self._workdir = workdir
        self._path = os.path.join(workdir, FILE)
        # A torn last line (an append cut off by a kill) is dropped here too, before the next
        # append would bury it in the middle of the file.
        rows = workdir_io.read_jsonl(workdir, FILE)
        if resume_step is not None:
            rows = [r for r in rows if int(r.get("step", 0)) <= resume_step]
        self._earlier = {_row_key(r) for r in rows}  # written before this run started
        self._local = workdir_io.is_local(workdir)
        self._rows = rows if not self._local else None  # an object store has no append
        if self._render(rows) != self._current_text():
            workdir_io.write_jsonl(workdir, FILE, rows)
        self._jsonl = open(self._path, "a") if self._local else None  # noqa: SIM115
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    @staticmethod
    def _render(rows: list[dict]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    def _current_text(self) -> str:
        path = epath.Path(self._workdir) / FILE
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        key = _row_key(row)
        if key in self._earlier:
            self._supersede(row)
            self._earlier.discard(key)
        elif self._local:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        else:
            self._rows.append(row)
            workdir_io.write_jsonl(self._workdir, FILE, self._rows)
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))
        self._tb.flush()

    def _supersede(self, row: dict) -> None:
        """Replace the earlier attempt's row of the same step and keys (rewritten atomically)."""
        key = _row_key(row)
        if self._local:
            self._jsonl.close()
            rows = workdir_io.read_jsonl(self._workdir, FILE)
        else:
            rows = self._rows
        rows = [row if _row_key(r) == key else r for r in rows]
        workdir_io.write_jsonl(self._workdir, FILE, rows)
        if self._local:
            self._jsonl = open(self._path, "a")  # noqa: SIM115
        else:
            self._rows = rows

    def close(self) -> None:
        if self.enabled:
            if self._jsonl is not None:
                self._jsonl.close()
            self._tb.close()
