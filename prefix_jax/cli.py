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


def add_decoding_flags(parser: argparse.ArgumentParser, num_beams: int, batch_size: int) -> None:
    """The decoding flags every script shares (checked by `check_decoding_flags`)."""
    greedy = " (default)" if num_beams == 1 else f" (default {num_beams})"
    parser.add_argument("--num_beams", type=int, default=num_beams, help="1 = greedy" + greedy)
    parser.add_argument("--length_penalty", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=batch_size,
                        help="prompts decoded together")


def check_decoding_flags(args: argparse.Namespace) -> None:
    for name in ("num_beams", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name}={getattr(args, name)} must be >= 1")


def run(main: Callable[[], None]) -> None:
    """Call `main`, turning a UserError into one line and exit status 2."""
    from prefix_jax.errors import UserError

    try:
        main()
    except UserError as e:
        fail(str(e))
