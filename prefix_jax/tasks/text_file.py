"""Data files read as text, checked first: every reader (E2E CSV, DART JSON/XML, SST-2 TSV,
JSONL) gets UTF-8 text without NUL bytes, or one error naming the file and line of the first bad
byte. Without it a Latin-1 file ends in a UnicodeDecodeError traceback, and a NUL (a binary or
UTF-16 file) is read as text and trained on."""

from __future__ import annotations

from prefix_jax.errors import UserError


def read_text(path: str) -> str:
    """The whole file, decoded as UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    nul = data.find(b"\0")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.start if nul < 0 else min(e.start, nul)
    else:
        if nul < 0:
            return text
        bad = nul
    line = data.count(b"\n", 0, bad) + 1
    what = "a NUL byte (binary or UTF-16 data?)" if bad == nul else (
        f"byte 0x{data[bad]:02x}, which is not UTF-8")
    raise UserError(f"{path}:{line}: {what}; save the file as UTF-8 text")
