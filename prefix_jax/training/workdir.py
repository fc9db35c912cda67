"""The workdir on disk: checked before anything is written, JSON files written by the loop."""

from __future__ import annotations

import json
import os

from prefix_jax.errors import UserError


def check(workdir: str) -> None:
    """The workdir is a writable directory, or can be created as one."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--workdir={workdir} is a file, not a directory; pick another path")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--workdir={workdir} cannot be created or written ({existing} is not a "
                        "writable directory); pick a writable path")


def write_json(workdir: str, name: str, value: object) -> None:
    with open(os.path.join(workdir, name), "w") as f:
        json.dump(value, f, indent=2)


def write_text(workdir: str, name: str, text: str) -> None:
    with open(os.path.join(workdir, name), "w") as f:
        f.write(text)
