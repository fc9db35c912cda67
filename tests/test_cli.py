"""Every tool follows one convention: `python -m prefix_jax.<tool>` with absl flags, `--help`
and `--helpfull` exit 0, a bad flag is one `error:` line and exit status 2, and setup.cfg's
console entry points name each tool's `run`."""

import configparser
import importlib
import os

import pytest

from tests.helpers import REPO, run_tool

TOOLS = ["main", "generate", "evaluate", "export", "eject", "sweep", "compare",
         "layer_influence", "bench.train", "bench.decode", "bench.memory", "bench.step_profile",
         "bench.decode_profile",
         "bench.plan"]


@pytest.mark.parametrize("flag", ["--help", "--helpfull"])
@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_answers_help(tool, flag, capsys):
    status, out, err = run_tool(tool, flag, capsys=capsys)
    assert status == 0, err
    first_line = importlib.import_module(f"prefix_jax.{tool}").__doc__.strip().splitlines()[0]
    assert out.startswith(first_line) and "--[no]traceback" in out and not err


@pytest.mark.parametrize("args", [["--no_such_flag=1"], ["stray_positional"]],
                         ids=["unknown-flag", "positional"])
@pytest.mark.parametrize("tool", TOOLS)
def test_a_bad_flag_is_one_error_line_and_exit_2(tool, args, capsys):
    status, _, err = run_tool(tool, *args, capsys=capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert ("no_such_flag" if args[0].startswith("--") else "stray_positional") in lines[0]


def test_a_bad_flag_value_names_the_flag(capsys):
    status, _, err = run_tool("generate", "--num_beams=many", capsys=capsys)
    assert status == 2 and err.startswith("error: ") and "--num_beams" in err
    assert len(err.strip().splitlines()) == 1


def test_a_user_error_shows_its_stack_only_with_traceback(tmp_path, capsys):
    missing = tmp_path / "no_run"
    missing.mkdir()  # a directory, but not a run: bank.read_config raises a UserError
    status, _, err = run_tool("export", f"--workdir={missing}", f"--out={tmp_path / 'out'}",
                              capsys=capsys)
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    from prefix_jax.errors import UserError

    with pytest.raises(UserError):
        run_tool("export", f"--workdir={missing}", f"--out={tmp_path / 'out'}", "--traceback",
                 capsys=capsys)


def test_a_tool_run_twice_starts_from_its_defaults(capsys):
    """Flags of one in-process run do not leak into the next (absl keeps parsed values)."""
    from prefix_jax import generate

    run_tool("generate", "--raw", "--num_beams=3", capsys=capsys)  # fails: no --workdir
    run_tool("generate", capsys=capsys)
    assert generate.FLAGS["raw"].value is False and generate.FLAGS["num_beams"].value == 1


def test_console_entry_points_name_each_tools_run():
    setup = configparser.ConfigParser()
    setup.read(os.path.join(REPO, "setup.cfg"))
    lines = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    targets = dict(line.replace(" ", "").split("=") for line in lines)
    assert targets["prefix-jax-train"] == "prefix_jax.main:run"
    for name, target in targets.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    assert {t.split(":")[0].removeprefix("prefix_jax.") for t in targets.values()} == {
        t for t in TOOLS if not t.startswith("bench.")}
