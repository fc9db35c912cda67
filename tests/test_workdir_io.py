"""Files on disk: atomic writes (training/workdir.py), torn-file readers, metrics.jsonl after a
resume, and the reruns that used to end in a traceback on a torn file."""

import json
import os
import shutil

import pytest

from prefix_jax import sweep, train
from prefix_jax.errors import UserError
from prefix_jax.training import workdir as workdir_io
from prefix_jax.training.metric_writer import MetricWriter
from tests.helpers import runlocal_config


def test_write_json_is_atomic_the_old_file_survives_a_failed_rename(tmp_path, monkeypatch):
    workdir_io.write_json(tmp_path, "results.json", {"bleu": 1.0})

    def rename_fails(src, dst):  # as if the process died between the write and the rename
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", rename_fails)
    with pytest.raises(OSError, match="simulated crash"):
        workdir_io.write_json(tmp_path, "results.json", {"bleu": 2.0})
    monkeypatch.undo()
    assert json.loads((tmp_path / "results.json").read_text()) == {"bleu": 1.0}
    assert sorted(os.listdir(tmp_path)) == ["results.json"]  # the temporary file is removed


def test_a_leftover_temp_file_of_a_killed_writer_changes_nothing(tmp_path):
    workdir_io.write_text(tmp_path, "config.json", '{"seed": 0}')
    (tmp_path / ".config.json.tmp-123-abcdef01").write_text('{"se')  # kill -9 mid-write
    assert workdir_io.read_json(tmp_path, "config.json") == {"seed": 0}
    workdir_io.write_text(tmp_path, "config.json", '{"seed": 1}')
    assert workdir_io.read_json(tmp_path, "config.json") == {"seed": 1}


def test_writes_create_subdirectories_and_return_the_path(tmp_path):
    path = workdir_io.write_jsonl(tmp_path, "generations/dev_step5.jsonl",
                                  [{"prediction": "a"}, {"prediction": "b"}])
    assert str(path) == str(tmp_path / "generations" / "dev_step5.jsonl")
    assert workdir_io.read_jsonl(tmp_path, "generations/dev_step5.jsonl") == [
        {"prediction": "a"}, {"prediction": "b"}]


def test_read_json_of_a_torn_file_is_one_error_naming_file_and_fix(tmp_path):
    (tmp_path / "results.json").write_text('{"eval/bleu": 12.')
    with pytest.raises(UserError) as e:
        workdir_io.read_json(tmp_path, "results.json", fix="delete it and rerun")
    message = str(e.value)
    assert "results.json is not valid JSON" in message and message.endswith("delete it and rerun")
    assert "\n" not in message
    assert workdir_io.read_json_if_valid(tmp_path, "results.json") is None
    assert workdir_io.read_json_if_valid(tmp_path, "absent.json") is None


def test_read_jsonl_skips_a_torn_last_line_but_not_a_bad_middle_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train/lo')
    assert workdir_io.read_jsonl(tmp_path, "m.jsonl") == [{"step": 1}, {"step": 2}]
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"m.jsonl:2: not valid JSON"):
        workdir_io.read_jsonl(tmp_path, "m.jsonl")
    assert workdir_io.read_jsonl(tmp_path, "absent.jsonl") == []


def test_new_directory_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "adapter"
    with pytest.raises(RuntimeError), workdir_io.new_directory(out) as staging:
        workdir_io.write_text(staging, "adapter_config.json", "{}")
        raise RuntimeError("interrupted after the first file")
    assert os.listdir(tmp_path) == []  # neither `out` nor the staging directory
    out.mkdir()  # an empty directory is replaced
    with workdir_io.new_directory(out) as staging:
        workdir_io.write_text(staging, "a.txt", "a")
        assert not (out / "a.txt").exists()  # not visible before the end
    assert os.listdir(out) == ["a.txt"] and os.listdir(tmp_path) == ["adapter"]


def test_object_store_urls_are_not_local():
    assert not workdir_io.is_local("gs://bucket/runs/a")
    assert workdir_io.is_local("runs/a") and workdir_io.is_local("/tmp/runs/a")


def rows_of(workdir):
    return workdir_io.read_jsonl(workdir, "metrics.jsonl")


def test_metric_writer_drops_rows_after_the_restored_step_and_a_torn_line(tmp_path):
    earlier = MetricWriter(str(tmp_path), resume_step=0)
    for step in range(1, 9):
        earlier.write(step, {"train/loss": 1.0 / step})
    earlier.write(8, {"eval/bleu": 3.0})
    earlier.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train/lo')  # killed mid-append
    writer = MetricWriter(str(tmp_path), resume_step=4)
    assert [r["step"] for r in rows_of(tmp_path)] == [1, 2, 3, 4]
    for step in range(5, 9):
        writer.write(step, {"train/loss": 2.0 / step})
    writer.write(8, {"eval/bleu": 4.0})
    writer.close()
    rows = rows_of(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert rows[4]["train/loss"] == 2.0 / 5 and rows[-1] == {"step": 8, "eval/bleu": 4.0}


def test_metric_writer_supersedes_a_row_written_again_for_an_earlier_step(tmp_path):
    """A finished run rerun evaluates again at its last step: one row, the new one."""
    first = MetricWriter(str(tmp_path), resume_step=0)
    first.write(0, {"eval_untuned/bleu": 1.0})
    first.write(2, {"train/loss": 0.5})
    first.write(2, {"eval/bleu": 3.0})
    first.close()
    again = MetricWriter(str(tmp_path), resume_step=2)
    again.write(2, {"eval/bleu": 3.5})
    again.write(2, {"eval/bleu": 3.6})  # a second write within one run appends as before
    again.close()
    assert rows_of(tmp_path) == [{"step": 0, "eval_untuned/bleu": 1.0},
                                 {"step": 2, "train/loss": 0.5}, {"step": 2, "eval/bleu": 3.5},
                                 {"step": 2, "eval/bleu": 3.6}]


def test_metrics_hold_each_step_once_after_a_resume_and_torn_files_are_recomputed(tmp_path):
    """A tiny run; its last checkpoint lost (as when killed after logging past the step-4 save)
    and its eval_untuned.json torn; the rerun resumes from 4, rewrites each step once and
    recomputes the untuned baseline instead of ending in a traceback."""
    config = runlocal_config(train__num_steps=8, train__log_every=1, train__checkpoint_every=4,
                             train__eval_every=0, eval__num_examples=2,
                             eval__max_new_tokens=2, eval__num_samples=0)
    train.train_and_evaluate(config, str(tmp_path))
    first = rows_of(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "8")
    (tmp_path / "eval_untuned.json").write_text('{"bleu": 0.')
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "train/lo')
    result = train.train_and_evaluate(config, str(tmp_path))
    rows = rows_of(tmp_path)
    keys = [(r["step"], tuple(sorted(r))) for r in rows]
    assert len(keys) == len(set(keys)), "a row is repeated"
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 9))
    assert len(rows) == len(first)
    assert any("eval_untuned/bleu" in r for r in rows)
    assert "eval_untuned/bleu" in result
    assert isinstance(workdir_io.read_json(tmp_path, "eval_untuned.json"), dict)


def test_sweep_does_not_count_a_torn_results_json_as_done(tmp_path):
    run = sweep.Run(0, "base", {}, "base", "digest")
    (tmp_path / "results.json").write_text('{"eval/bleu": 1')
    assert sweep.finished(str(tmp_path), run) == (False, "results.json is unreadable")
    workdir_io.write_json(tmp_path, "results.json",
                          {"eval/bleu": 1.0, "results_identity": "digest"})
    assert sweep.finished(str(tmp_path), run)[0]
    assert sweep.finished(str(tmp_path / "absent"), run) == (False, "no results.json")
