"""The command-line convention of every tool (`python -m prefix_jax.<tool>`, absl flags).

Each tool keeps its flags in its own `flags.FlagValues` (from `flag_values()`), so that several
tools can live in one process (a tool that imports another, or a test that runs them in turn)
without their `--workdir` or `--out` colliding, and starts with `run(main, FLAGS, __doc__)`.
Mistakes a user can make end with one `error: ...` line on stderr and exit status 2: a bad or
unknown flag, a positional argument, a `UserError` raised by the tool (`--traceback` shows its
stack). `--help` and `--helpfull` print the tool's docstring and flags and exit 0.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags, logging

from prefix_jax.errors import UserError

USAGE_EXIT = 2
_HELP = ("--help", "-help", "--helpshort", "--helpfull", "-h", "-?")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def flag_values() -> flags.FlagValues:
    """A tool's own flags, holding those every tool has: --traceback, and absl's --verbosity
    (shared with absl logging, which reads it)."""
    values = flags.FlagValues()
    flags.DEFINE_bool("traceback", False, "Show the stack trace of user errors too.",
                      flag_values=values)
    flags.DEFINE_flag(flags.FLAGS["verbosity"], flag_values=values)
    return values


def define_decoding_flags(values: flags.FlagValues, num_beams: int, batch_size: int) -> None:
    """The decoding flags of every tool that decodes (checked by `check_decoding_flags`)."""
    greedy = " (default)" if num_beams == 1 else f" (default {num_beams})"
    flags.DEFINE_integer("num_beams", num_beams, "1 = greedy" + greedy, flag_values=values)
    flags.DEFINE_float("length_penalty", 1.0, "Beam search: score / length**penalty.",
                       flag_values=values)
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per source at most.",
                         flag_values=values)
    flags.DEFINE_integer("batch_size", batch_size, "Prompts decoded together.",
                         flag_values=values)


def check_decoding_flags(values: flags.FlagValues) -> None:
    for name in ("num_beams", "max_new_tokens", "batch_size"):
        if values[name].value < 1:
            fail(f"--{name}={values[name].value} must be >= 1")


def split_config(spec: str) -> tuple[str, str | None]:
    """`FILE[:ARG]` of a `--config` flag, split as ml_collections splits it (at the first ':')."""
    path, colon, arg = spec.partition(":")
    return path, (arg if colon else None)


def parse(values: flags.FlagValues, argv: list[str]) -> list[str]:
    """Parse `argv` into the tool's flags (and nothing else); every mistake is one line."""
    # A tool run twice in one process starts from its defaults, without the flags that
    # ml_collections defined for the last run's --config.x.y overrides.
    for name in [n for n in values if "." in n]:
        delattr(values, name)
    values.unparse_flags()
    try:
        rest = values(argv)
    except flags.Error as e:
        # e.g. an unknown flag, an unknown --config.x field or a value of the wrong type
        fail(f"{str(e).splitlines()[0]} (see --help)")
    except UserError as e:  # raised by a config file's get_config(arg)
        fail(str(e))
    except ImportError as e:  # a config file's own import, e.g. `from experiments import ...`
        fail(f"the --config file could not import {e.name or str(e)!r} ({e}): its imports are "
             f"resolved from the working directory {os.getcwd()}, not from the file's folder; "
             "run from the repository root, or add that root to PYTHONPATH")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections raises these for a --config.x.y override that names no field or
        # has the wrong type; the message already suggests the closest field.
        message = str(e.args[0] if e.args else e)
        field = re.search(r"(\w+)\\?'", message)
        guess = re.search(r'Did you mean "(\w+)"', message)
        detail = f"unknown field '{field.group(1)}'" if field else message.splitlines()[0]
        if guess:
            detail += f" (did you mean '{guess.group(1)}'?)"
        fail(f"bad --config override: {detail}; the config file lists the fields")
    if len(rest) > 1:
        fail(f"unexpected arguments {rest[1:]}: every option is a --flag (see --help)")
    # absl's app.run reads its own flags (--run_with_pdb, ...) from the global registry, which
    # a tool never parses: their defaults hold.
    flags.FLAGS.mark_as_parsed()
    return rest


def _print_help(values: flags.FlagValues, doc: str) -> NoReturn:
    print(doc.strip() + "\n\nflags:\n" + values.get_help())
    sys.exit(0)


def _working_directory_importable() -> None:
    """Experiment files import their neighbours (`from experiments import sweeps`) from the
    checkout they are launched in. `python -m prefix_jax.<tool>` puts the working directory
    first on the import path; a console script (`prefix-jax-train`) starts from its bin/
    directory instead, so it gets the working directory the way `-m` does."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def run(main: Callable[[], None], values: flags.FlagValues, doc: str,
        argv: list[str] | None = None) -> None:
    """Run a tool: parse `argv` (default sys.argv) into `values`, call `main()`.

    Ends with exit status 0, or 2 with one `error:` line for a user's mistake."""
    argv = list(sys.argv if argv is None else argv)
    flag_args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(a in _HELP for a in flag_args):
        _print_help(values, doc)
    _working_directory_importable()

    def checked_main(_: list[str]) -> None:
        if not values["verbosity"].present:
            # orbax and grain log every save at INFO; the tools print what matters.
            logging.set_verbosity(logging.WARNING)
        try:
            main()
        except UserError as e:
            if values["traceback"].value:
                raise
            fail(str(e))

    # ml_collections reads the --config.x.y overrides from sys.argv itself, not from the argv
    # it is given: a tool run in-process with its own argv sets it for the run.
    saved, sys.argv = sys.argv, argv
    try:
        app.run(checked_main, argv=argv, flags_parser=lambda args: parse(values, args))
    finally:
        sys.argv = saved
