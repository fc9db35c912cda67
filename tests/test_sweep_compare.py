"""`python -m prefix_jax.sweep` (expand, validate, dry run, pod lines, run, skip) and
`prefix_jax.compare` (table and figures) on a real two-run sweep of the tiny model;
data.subsample_seed."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import run_tool, runlocal_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E2E = os.path.join(REPO, "experiments", "e2e_smollm2.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A tiny experiment: the runlocal config, 4 steps, dev eval (2 MRs) at step 2 and at the end,
# one batch shape (one compile per run). Its SWEEP: a run that fails (no data), then two
# prefix lengths.
TINY_EXPERIMENT = '''
from experiments import e2e_smollm2

SWEEP = [{"name": "broken", "data.dir": "/nonexistent/e2e"},
         {"name": "length", "prefix.length": 1},
         {"name": "length", "prefix.length": 4}]


def get_config(arg=None):
    config = e2e_smollm2.get_config("runlocal")
    with config.unlocked():
        config.train.num_steps = 4
        config.train.log_every = 1
        config.train.eval_every = 2
        config.train.checkpoint_every = 4
        config.data.train_examples = 16
        config.data.bucket_multiple = config.data.max_len
        config.eval.num_examples = 2
        config.eval.max_new_tokens = 4
        config.eval.num_samples = 0
        config.eval.eval_untuned = False
    return config
'''


def experiment(tmp_path, sweep: str, name: str = "exp") -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(f'''
        from experiments import e2e_smollm2

        SWEEP = {sweep}


        def get_config(arg=None):
            return e2e_smollm2.get_config("runlocal")
        '''))
    return str(path)


def test_dry_run_prints_one_command_per_entry_and_runs_nothing(tmp_path, capsys):
    root = tmp_path / "root"
    status, out, _ = run_tool("sweep", f"--config={E2E}", "--root", root, "--dry_run",
                              "--pack=false", capsys=capsys)
    assert status == 0
    commands = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    # 5 prefix lengths + 4 depths + 3 inits + 50/100/200/500 x 5 subsets x 2 seeds
    assert len(commands) == 5 + 4 + 3 + 40
    workdirs = []
    for argv in commands:
        assert argv[1:4] == ["-m", "prefix_jax.main", f"--config={E2E}"]
        assert argv[4].startswith(f"--workdir={root}/e2e_smollm2/")
        workdirs.append(argv[4])
    assert len(set(workdirs)) == len(commands)
    assert commands[1][4:] == [f"--workdir={root}/e2e_smollm2/prefix.length=5",
                               "--config.prefix.length=5"]
    assert commands[-1][4:] == [
        f"--workdir={root}/e2e_smollm2/data.train_examples=500,data.subsample_seed=4,seed=1",
        "--config.data.train_examples=500", "--config.data.subsample_seed=4",
        "--config.seed=1"]
    assert not root.exists()

    status, out, _ = run_tool("sweep", f"--config={E2E}:runlocal", "--root", root,
                              "--dry_run", "--filter", "^length$", capsys=capsys)
    commands = [line for line in out.splitlines() if not line.startswith("#")]
    assert status == 0 and len(commands) == 5
    assert all(f"--config={E2E}:runlocal --workdir={root}/e2e_smollm2-runlocal/prefix.length="
               in c for c in commands)


def test_dry_run_packs_compatible_entries(tmp_path, capsys):
    """With packing (the default) the low-data entries (they differ in seed and subset only)
    train as packed programs of at most --pack_max runs; the prefix lengths (different shapes)
    and depths still run alone; every entry appears exactly once."""
    root = tmp_path / "root"
    status, out, _ = run_tool("sweep", f"--config={E2E}", "--root", root, "--dry_run",
                              "--pack_max=8", capsys=capsys)
    assert status == 0
    commands = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    alone = [c for c in commands if c[2] == "prefix_jax.main"]
    packed = [c for c in commands if c[2] == "prefix_jax.sweep"]
    entries = [int(i) for c in packed for i in c[-1].removeprefix("--run_packed=").split(",")]
    assert all(2 <= len(c[-1].split(",")) <= 8 for c in packed)
    assert len(entries) + len(alone) == len(set(entries)) + len(alone) == 5 + 4 + 3 + 40
    assert "prefix.length=1" in {c[4].rsplit("/", 1)[1] for c in alone}
    assert 51 in entries  # data.train_examples=500,data.subsample_seed=4,seed=1
    assert not root.exists()


def test_sst2_sweep_dry_run_packs_replicates_and_runs_fine_tuning_alone(tmp_path, capsys):
    """SST-2's P-tuning v2 comparisons: every entry validates; each setting's 3 seeds train as
    one packed program, except full fine-tuning (it trains the base: nothing to share)."""
    path = os.path.join(REPO, "experiments", "sst2_minilm_prefix.py")
    status, out, err = run_tool("sweep", f"--config={path}", "--root", tmp_path, "--dry_run",
                                capsys=capsys)
    assert status == 0, err
    commands = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    packed = [c for c in commands if c[2] == "prefix_jax.sweep"]
    alone = [c for c in commands if c[2] == "prefix_jax.main"]
    # lengths 8/16/32/64, depth top/bottom half, head-only: 7 settings x 3 seeds
    assert [len(c[-1].split(",")) for c in packed] == [3] * 7
    assert len(alone) == 3 and all("--config.trainable=^base/" in c for c in alone)
    assert "# dry run: 24 runs" in out


def test_low_data_sweep_packs_one_length_per_program_in_balanced_order(tmp_path, capsys):
    """The low-data experiment (96 entries) validates; with --pack_max=4 (its documented
    command) every packed program holds runs of one length, both prefix methods, and the
    first four programs are the first replicate block over all four sizes, so a sweep stopped
    after a block gives every (method, size) cell the same count; fine-tuning runs alone."""
    path = os.path.join(REPO, "experiments", "e2e_low_data.py")
    status, out, err = run_tool("sweep", f"--config={path}", "--root", tmp_path, "--dry_run",
                                "--pack_max=4", capsys=capsys)
    assert status == 0, err
    from experiments import e2e_low_data

    sweep = e2e_low_data.SWEEP
    commands = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    groups = [[sweep[int(i)] for i in c[-1].removeprefix("--run_packed=").split(",")]
              for c in commands if c[2] == "prefix_jax.sweep"]
    assert "# dry run: 96 runs" in out
    assert all(len({e["train.num_steps"] for e in g}) == 1 for g in groups)
    first = groups[:4]
    assert [g[0]["data.train_examples"] for g in first] == [50, 100, 200, 500]
    assert all(len(g) == 4 and {e["name"] for e in g} == {"prefix", "prefix_rnd"}
               for g in first)
    alone = [c for c in commands if c[2] == "prefix_jax.main"]
    assert len(alone) == 8 and all("--config.trainable=^base/" in c for c in alone)


@pytest.mark.parametrize("entry,message", [
    ('{"prefix.lenght": 5}', r"unknown config field 'prefix\.lenght'"),
    ('{"optim.learning_rate": 0.1}', r"unknown config field 'optim\.learning_rate'"),
    ('{"prefix.length": "5"}', r"prefix\.length='5': the field's type is int, not str"),
    ('{"prefix.length": -1}', r"prefix\.length=-1: must be an integer >= 0"),
    ('{"name": "length", "train.batch_size": 0}', r"train\.batch_size=0: must be"),
])
def test_a_bad_entry_is_rejected_before_anything_runs(tmp_path, capsys, entry, message):
    path = experiment(tmp_path, f'[{{"prefix.length": 2}}, {entry}]')
    status, out, err = run_tool("sweep", f"--config={path}", "--root", tmp_path / "root",
                                capsys=capsys)
    assert status == 2 and not out
    assert len(err.strip().splitlines()) == 1
    assert re.match(rf"error: {re.escape(path)} SWEEP entry 1 .*{message}", err), err
    assert not (tmp_path / "root").exists()  # the good entry 0 did not run either


def test_a_bad_arg_or_file_is_one_error_line(tmp_path, capsys):
    status, _, err = run_tool("sweep", f"--config={E2E}:nosuch", "--root", tmp_path,
                              capsys=capsys)
    assert status == 2 and err.startswith(f"error: --config={E2E}:nosuch: config arg "
                                          "'nosuch' is not one of")
    status, _, err = run_tool("sweep", f"--config={tmp_path / 'none.py'}", "--root", tmp_path,
                              capsys=capsys)
    assert status == 2 and "none.py: not an experiment file" in err
    path = tmp_path / "nosweep.py"
    path.write_text("def get_config(arg=None):\n    return None\n")
    status, _, err = run_tool("sweep", f"--config={path}", "--root", tmp_path, capsys=capsys)
    assert status == 2 and "nosweep.py: has no SWEEP list" in err


def test_pod_lines_one_launch_per_run(tmp_path, capsys):
    status, out, _ = run_tool("sweep", f"--config={os.path.relpath(E2E)}:runlocal",
                              "--filter", "length", "--tpu", "pod1", "--zone", "zone-a",
                                "--bucket", "gs://bkt/sweeps", capsys=capsys)
    assert status == 0
    launches = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    assert len(launches) == 5
    assert launches[0][0].endswith("scripts/launch_tpu_pod.sh")
    assert launches[0][1:] == [
        "--tpu", "pod1", "--zone", "zone-a", "--bucket", "gs://bkt/sweeps/e2e_smollm2-runlocal",
        "--config", "experiments/e2e_smollm2.py:runlocal", "--run", "prefix.length=1", "--",
        "--config.prefix.length=1"]
    # The launcher accepts the line: its own dry run shows the run's workdir in the bucket.
    argv = launches[0]
    cut = argv.index("--")
    r = subprocess.run(["bash", *argv[:cut], "--dry_run", *argv[cut:]], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert ("--config.prefix.length=1 "
            "--workdir=$HOME/bucket/sweeps/e2e_smollm2-runlocal/prefix.length=1") in r.stdout
    status, _, err = run_tool("sweep", f"--config={E2E}", "--tpu", "pod1", "--bucket",
                              "gs://b", capsys=capsys)
    assert status == 2 and "--tpu needs --zone" in err


def run_sweep(*args, cache: str) -> subprocess.CompletedProcess:
    # The runs share a persistent compilation cache (the tiny model's eager init ops and the
    # decoding steps are the same programs in both): ~3 s less CPU for the second run.
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return subprocess.run([sys.executable, "-m", "prefix_jax.sweep", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The tiny experiment's sweep, run for real (each run its own `prefix_jax.main`)."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = tmp / "tiny.py"
    path.write_text(TINY_EXPERIMENT)
    root, cache = tmp / "root", str(tmp / "jax_cache")
    return path, root, cache, run_sweep(f"--config={path}", "--root", str(root), cache=cache)


def test_sweep_runs_every_entry_past_a_failure_and_resumes(swept):
    path, root, cache, first = swept
    assert first.returncode == 1, first.stderr  # one run failed
    assert "error: data.dir=/nonexistent/e2e" in first.stderr
    summary = first.stdout.strip().splitlines()[-1]
    assert summary.startswith("sweep tiny: 2 done, 0 skipped, 1 failed of 3 under")
    runs = root / "tiny"
    done = [runs / "prefix.length=1", runs / "prefix.length=4"]
    assert sorted(p.name for p in runs.iterdir()) == [d.name for d in done]
    stamps = [os.path.getmtime(d / "results.json") for d in done]

    again = run_sweep(f"--config={path}", "--root", str(root), "--filter", "length", cache=cache)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped (results.json exists)") == 2
    assert again.stdout.strip().splitlines()[-1].startswith(
        "sweep tiny: 0 done, 2 skipped, 0 failed of 2")
    assert [os.path.getmtime(d / "results.json") for d in done] == stamps


def test_compare_writes_the_table_and_figures(swept, tmp_path, capsys):
    _, root, _, _ = swept
    runs = [root / "tiny" / "prefix.length=1", root / "tiny" / "prefix.length=4"]
    out = tmp_path / "cmp"
    status, _, err = run_tool("compare", *(f"--workdir={r}" for r in runs), "--out", out,
                              capsys=capsys)
    assert status == 0, err
    table = (out / "table.md").read_text().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    # Only the differing config field, then the results.
    assert header[:4] == ["run", "prefix.length", "trainable params", "trainable %"]
    for column in ("best eval/bleu", "final eval/bleu", "best eval/rouge_l", "train tokens/s",
                   "checkpoint", "final train/loss"):
        assert column in header
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:4]]
    assert [r[:2] for r in rows] == [["prefix.length=1", "1"], ["prefix.length=4", "4"]]
    # trainable = length x layers x 2 (k, v) x kv heads x head_dim: 4 times as many at P=4
    trainable = [int(r[2].replace(",", "")) for r in rows]
    assert trainable[1] == 4 * trainable[0] > 0
    for r in rows:
        cells = dict(zip(header, r))
        assert float(cells["best eval/bleu"]) >= float(cells["final eval/bleu"])
        assert float(cells["train tokens/s"]) > 0
        assert cells["checkpoint"].endswith("KiB")
    for name in ("loss_curves", "metric_vs_prefix_length", "metric_vs_trainable_params"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name


def test_compare_names_a_bad_workdir_and_writes_nothing(swept, tmp_path, capsys):
    _, root, _, _ = swept
    good = root / "tiny" / "prefix.length=1"
    out = tmp_path / "cmp"
    status, _, err = run_tool("compare", f"--workdir={good}", f"--workdir={tmp_path / 'nope'}",
                              "--out", out, capsys=capsys)
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "nope: not a directory" in err
    (tmp_path / "empty").mkdir()
    status, _, err = run_tool("compare", f"--workdir={good}", f"--workdir={tmp_path / 'empty'}",
                              "--out", out, capsys=capsys)
    assert status == 2 and "empty/config.json: missing" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    status, _, err = run_tool("compare", f"--workdir={good}", f"--workdir={broken}", "--out", out,
                              capsys=capsys)
    assert status == 2 and "broken/metrics.jsonl:2: not valid JSON" in err
    assert not out.exists()


def test_compare_reads_a_run_whose_last_metrics_line_is_torn(swept, tmp_path, capsys):
    """A run killed mid-append: its last line is skipped, the rest compared."""
    import shutil

    _, root, _, _ = swept
    torn = tmp_path / "torn"
    shutil.copytree(root / "tiny" / "prefix.length=1", torn, ignore=shutil.ignore_patterns(
        "checkpoints", "tensorboard"))
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')
    status, _, err = run_tool("compare", f"--workdir={root / 'tiny' / 'prefix.length=4'}",
                              f"--workdir={torn}", "--out", tmp_path / "cmp", capsys=capsys)
    assert status == 0, err
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "torn" in table and "| 4 |" not in table.splitlines()[0]


# A stand-in for one sweep run: reports it is ready, then on SIGTERM/SIGINT "saves" and exits
# as prefix_jax.main does (128 + signal).
CHILD = """
import pathlib, signal, sys, time
marker = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    marker.write_text(signal.Signals(signum).name)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
marker.write_text("ready")
time.sleep(60)
"""
# The sweep's side: run the child through sweep.run_child and report what came back.
PARENT = """
import sys
from prefix_jax import sweep
status, signum = sweep.run_child([sys.executable, "-c", sys.argv[1], sys.argv[2]], {})
print(status, signum)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sweep_forwards_a_signal_to_the_running_run_and_waits_for_it(tmp_path, sig):
    import signal
    import time

    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        REPO, os.environ.get("PYTHONPATH")]))}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(marker)], env=env,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 60
    while not (marker.exists() and marker.read_text() == "ready"):
        assert time.time() < deadline and parent.poll() is None, "the child never started"
        time.sleep(0.05)
    parent.send_signal(getattr(signal, sig))  # to the sweep only, as `kill` or a scheduler does
    out, _ = parent.communicate(timeout=60)
    assert marker.read_text() == sig  # the child got it and ran its save-and-exit path
    number = int(getattr(signal, sig))
    assert out.split() == [str(128 + number), str(number)]
    assert parent.returncode == 0


def test_train_examples_subset_follows_subsample_seed_not_seed():
    """The low-data protocol varies the subset (data.subsample_seed) apart from the
    init/order seed: the training rows are those of the subsample seed only."""
    from prefix_jax import models, tasks

    tokenizer = models.byte_tokenizer()
    subsets = []
    for seed, subsample_seed in ((0, 0), (1, 0), (0, 1)):
        config = runlocal_config(data__train_examples=8, seed=seed,
                                 data__subsample_seed=subsample_seed)
        examples = tasks.get(config).train_examples(tokenizer)
        subsets.append([e.tokens.tobytes() for e in examples])
    assert len(subsets[0]) == 8
    assert subsets[0] == subsets[1] != subsets[2]


def test_run_record_best_final_throughput_and_checkpoint(tmp_path):
    """The table's numbers from a hand-written workdir: best over every evaluation (min for
    losses), the last write of a resumed step wins, tokens/s leaves out the compile interval,
    the checkpoint is the newest step directory."""
    from prefix_jax import compare

    run = tmp_path / "run"
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "checkpoints" / "10" / "state").mkdir(parents=True)
    (run / "checkpoints" / "12.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save
    (run / "checkpoints" / "2" / "x").write_bytes(b"0" * 50)
    (run / "checkpoints" / "10" / "state" / "y").write_bytes(b"0" * 700)
    (run / "config.json").write_text('{"prefix": {"length": 5}, "seed": 0}')
    rows = ['{"step": 5, "train/loss": 3.0, "train/tokens_per_sec": 10.0}',
            '{"step": 5, "eval/bleu": 30.0, "eval/loss": 2.0}',
            '{"step": 10, "train/loss": 2.5, "train/tokens_per_sec": 100.0}',
            '{"step": 10, "train/loss": 2.0, "train/tokens_per_sec": 200.0}',  # resumed
            '{"step": 10, "eval/bleu": 20.0, "eval/loss": 1.5}']
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    (run / "results.json").write_text('{"eval/bleu": 20.0, "eval/loss": 1.5, "step": 10}')
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"prefix": {"length": 10}, "seed": 0, "new": 1}')

    record, unfinished = compare.read_runs([str(run), str(other)])
    assert record.best("eval/bleu") == 30.0 and record.final("eval/bleu") == 20.0
    assert record.best("eval/loss") == 1.5
    assert record.series("train/loss") == [(5, 3.0), (10, 2.0)]
    assert record.tokens_per_sec() == 200.0  # step 5's interval compiled the step
    assert record.checkpoint_bytes == 700
    assert compare.differing_fields([record, unfinished]) == ["new", "prefix.length"]
    table = compare.table([record, unfinished])
    assert "| run | new | prefix.length | trainable params |" in table
    assert "| run | — | 5 | — | — | 30.00 | 1.50 | 20.00 | 1.50 | 2.000 | 200 | 700 B |" in table
    assert "Unfinished (no results.json): other." in table


def _replicate_run(root, name, size, init, seed, subsample, bleu):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"seed": seed, "data": {"train_examples": size, "subsample_seed": subsample},
         "prefix": {"init": init}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "train/loss": 1.0}) + "\n")
    (run / "results.json").write_text(json.dumps({"eval/bleu": bleu, "step": 10}))


def test_compare_groups_replicates_with_mean_std_and_interval(tmp_path, capsys):
    """Runs that differ only in seed / subsample_seed are one setting: n, mean, std, 95% t
    interval per metric; the low-data figure (error bars) is drawn."""
    root = tmp_path / "runs"
    values = {("text", 50): [10.0, 12.0, 14.0], ("random", 50): [5.0, 7.0],
              ("text", 100): [20.0, 20.0, 23.0], ("random", 100): [9.0]}
    for (init, size), bleus in values.items():
        for i, bleu in enumerate(bleus):
            _replicate_run(root, f"{init}-{size}-{i}", size, init, i % 2, i, bleu)
    out = tmp_path / "cmp"
    status, _, err = run_tool("compare", f"--workdir={root}/*", "--out", out, capsys=capsys)
    assert status == 0, err
    text = (out / "table.md").read_text()
    grouped = text.split("## Mean over replicates")[1]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in grouped.splitlines() if line.startswith("| ") and "setting" not in line}
    # mean 12, std 2, t(0.975, 2) = 4.303: 12 +- 4.303 * 2 / sqrt(3) = [7.03, 16.97]
    assert list(rows) == ["train_examples=50, init=random", "train_examples=50, init=text",
                          "train_examples=100, init=random", "train_examples=100, init=text"]
    row = rows["train_examples=50, init=text"]
    assert row[3] == "3" and row[4] == "12.00 ± 2.00 [7.03, 16.97]"
    assert rows["train_examples=100, init=random"][4] == "9.00 (n=1)"
    assert rows["train_examples=50, init=random"][3] == "2"
    assert (out / "metric_vs_train_examples.png").stat().st_size > 0
