r"""Train and evaluate a prefix: `python -m prefix_jax.main --config=FILE[:ARGS] --workdir=DIR`.

  --config=experiments/e2e_smollm2.py:runlocal   an experiment file and its get_config() arg
  --config.prefix.length=20                      override any config field
  --workdir=runs/x                               outputs; rerunning the same command resumes

Mistakes in flags, config values, files or checkpoints end with one line on stderr and exit
status 2 (`--traceback` shows the stack); bugs keep their traceback.
"""

from __future__ import annotations

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from prefix_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the stack trace of user errors too.")

USAGE_EXIT = 2


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        # e.g. an unknown --config.x field or a value of the wrong type
        _fail(f"{str(e).splitlines()[0]} (see --helpfull for the flags and the config file "
              "for its fields)")
    except UserError as e:  # raised by a config file's get_config(arg)
        _fail(str(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections raises these for a --config.x.y override that names no field or
        # has the wrong type; the message already suggests the closest field.
        message = str(e.args[0] if e.args else e)
        field = re.search(r"(\w+)\\?'", message)
        guess = re.search(r'Did you mean "(\w+)"', message)
        detail = f"unknown field '{field.group(1)}'" if field else message.splitlines()[0]
        if guess:
            detail += f" (did you mean '{guess.group(1)}'?)"
        _fail(f"bad --config override: {detail}; the config file lists the fields")
    return []


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}: every option is a --flag")
    if _CONFIG.value is None:
        _fail("--config is required, e.g. --config=experiments/e2e_smollm2.py:runlocal")
    try:
        config = _CONFIG.value
        config.get("train")  # a config file that failed to load raises on first access
    except OSError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _fail(f"--config could not be loaded: {lines[-1]}; check the file path")
    if not _WORKDIR.value:
        _fail("--workdir is required: the directory for checkpoints, logs and results")
    from prefix_jax import train  # after flag checks: importing JAX takes seconds

    if not flags.FLAGS["verbosity"].present:
        # orbax and grain log every save at INFO; the progress bar and prints tell the story.
        logging.set_verbosity(logging.WARNING)
    from prefix_jax.training.preemption import Stopped

    try:
        result = train.train_and_evaluate(config, _WORKDIR.value)
    except UserError as e:
        if _TRACEBACK.value:
            raise
        _fail(str(e))
    except Stopped as e:
        # A clean stop (checkpoint saved); the status says "killed by this signal" to schedulers.
        print(f"{e}: checkpoint saved; rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + e.signum)
    import jax

    if jax.process_index() != 0:  # one summary per run, not one per host
        return
    print("final:", ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in result.items()))


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
