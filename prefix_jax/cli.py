"""Command-line conventions shared by the scripts: one `error:` line and exit status 2 for
mistakes a user can make (see main.py for the training entry point's version)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

USAGE_EXIT = 2


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the problem (and the --help hint)."""

    def error(self, message: str) -> None:
        fail(f"{message} (see {self.prog} --help)")


def run(main: Callable[[], None]) -> None:
    """Call `main`, turning a UserError into one line and exit status 2."""
    from prefix_jax.errors import UserError

    try:
        main()
    except UserError as e:
        fail(str(e))
