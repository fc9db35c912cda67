"""Every file the package writes, and the JSON files it reads back, go through here.

Paths are `etils.epath` paths, so a `gs://` workdir works without gcsfuse. Writes are atomic: a
reader (or a rerun after a kill) sees the old file or the new one, never a torn one.

- Local files: written to a temporary file in the same directory, flushed to disk, then renamed
  over the target (a rename within one file system is atomic on POSIX). A write killed before
  the rename leaves the old file intact and at most a `.<name>.tmp-*` file beside it.
- Object stores (`gs://`, `s3://`): a single object upload only becomes visible once complete,
  which is already atomic; a rename there would be a copy plus a delete, so none is done.

Readers: `read_json` turns a torn or invalid file into one UserError naming the file and the
fix; `read_jsonl` skips a torn LAST line (a writer killed mid-append) with a warning, but a bad
line in the middle is an error, since it cannot come from an interrupted append.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator

from absl import logging
from etils import epath

from prefix_jax.errors import UserError

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
    """False for object-store URLs (`gs://bucket/x`), whose single writes are atomic already."""
    return "://" not in os.fspath(path)


def check(workdir: str) -> None:
    """The workdir is a writable directory, or can be created as one."""
    if not is_local(workdir):
        return  # bucket permissions show at the first write, which is a one-line error too
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--workdir={workdir} is a file, not a directory; pick another path")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--workdir={workdir} cannot be created or written ({existing} is not a "
                        "writable directory); pick a writable path")


def _temp_sibling(target: epath.Path) -> epath.Path:
    # hidden, and unique per writer, so that two writers never share a temporary file
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_bytes(directory: PathLike, name: str, data: bytes) -> epath.Path:
    """`directory/name` (`name` may hold subdirectories, created) holds `data`, atomically."""
    target = epath.Path(directory) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(target):
        target.write_bytes(data)
        return target
    temp = _temp_sibling(target)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return target


def write_text(workdir: PathLike, name: str, text: str) -> epath.Path:
    """`workdir/name` holds `text` (UTF-8), atomically."""
    return write_bytes(workdir, name, text.encode("utf-8"))


def write_json(workdir: PathLike, name: str, value: object) -> epath.Path:
    """`workdir/name` holds `value` as indented JSON, atomically."""
    return write_text(workdir, name, json.dumps(value, indent=2) + "\n")


def write_jsonl(workdir: PathLike, name: str, rows: list[dict]) -> epath.Path:
    """`workdir/name` holds one JSON object per line, atomically."""
    return write_text(workdir, name, "".join(json.dumps(r) + "\n" for r in rows))


def read_json(workdir: PathLike, name: str, fix: str = "delete it and rerun") -> object:
    """The JSON value of `workdir/name`; a missing, torn or invalid file is one UserError naming
    the file and `fix`."""
    path = epath.Path(workdir) / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON (a write interrupted before files were "
                        f"written atomically?) ({e}); {fix}") from None


def read_json_if_valid(workdir: PathLike, name: str) -> object | None:
    """The JSON value of `workdir/name`, or None when it is missing or unreadable (warned):
    for files that are recomputed when they cannot be read."""
    path = epath.Path(workdir) / name
    if not path.exists():
        return None
    try:
        return read_json(workdir, name)
    except UserError as e:
        logging.warning("%s; it is recomputed", e)
        return None


def read_jsonl(workdir: PathLike, name: str, fix: str = "fix or delete that line") -> list:
    """The JSON value of each non-empty line of `workdir/name` ([] when the file is missing).

    A last line that does not parse is a write cut off by a kill: skipped, with a warning. A bad
    line before it is an error (one line: file:line and `fix`)."""
    path = epath.Path(workdir) / name
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); {fix}") from None
    lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                logging.warning("%s:%d: skipped a torn last line (%s): a write cut off by a "
                                "kill", path, n, e)
                break
            raise UserError(f"{path}:{n}: not valid JSON ({e}); {fix}") from None
    return rows


@contextlib.contextmanager
def new_directory(out: PathLike) -> Iterator[epath.Path]:
    """A directory to fill that appears at `out` as a whole, or not at all.

    Locally it is filled under a temporary name beside `out` and renamed at the end (`out`
    must be absent or an empty directory); on an error it is removed and `out` is untouched.
    In an object store there are no directories to rename: files are written into `out` one
    by one (each atomic)."""
    target = epath.Path(out)
    if not is_local(target):
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(target)
    temp.mkdir()
    try:
        yield temp
        os.replace(temp, target)  # replaces an empty directory; a non-empty one is an error
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
