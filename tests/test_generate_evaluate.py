"""`python -m prefix_jax.generate` and `prefix_jax.evaluate` on two tiny trained runs; the E2E
metrics."""

import json
import os

import pytest

from prefix_jax import train
from prefix_jax.tasks import e2e, metrics
from tests.helpers import E2E_DIR, run_tool, runlocal_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MRS = ["name[Aromi], eatType[pub]", "name[The Eagle], food[French]", "name[Zizzi]"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two 2-step runs of the tiny model whose prefixes start at different scales."""
    workdirs = []
    for std in (1.0, 3.0):
        workdir = str(tmp_path_factory.mktemp(f"run_std{std}"))
        config = runlocal_config(prefix__init_std=std, train__num_steps=2,
                                 eval__num_examples=0, eval__eval_untuned=False)
        train.train_and_evaluate(config, workdir)
        workdirs.append(workdir)
    return workdirs


def lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_generate_one_run_a_bank_and_raw_prompts(two_runs, tmp_path, capsys):
    a, b = two_runs
    (tmp_path / "mrs.txt").write_text("\n".join(MRS) + "\n")
    (tmp_path / "raw.txt").write_text("\n".join(e2e.format_source(m).replace("\n", "\\n")
                                                for m in MRS[:1]) + "\n")
    common = ["--max_new_tokens", 6, "--batch_size", 2]
    outputs = {}
    for name, workdir in (("a", a), ("b", b)):
        status, _, _ = run_tool("generate", "--workdir", workdir, "--input",
                                  tmp_path / "mrs.txt", "--out", tmp_path / f"{name}.txt",
                                  *common, capsys=capsys)
        assert status == 0
        outputs[name] = lines(tmp_path / f"{name}.txt")
        assert len(outputs[name]) == len(MRS)
    assert outputs["a"] != outputs["b"], "the two prefixes decode alike; the bank check is void"

    # A bank of both runs, rows interleaved and sharing batches: each line as its run alone.
    rows = [1, 0, 1]
    (tmp_path / "mixed.txt").write_text("".join(f"{r}\t{m}\n" for r, m in zip(rows, MRS)))
    status, _, _ = run_tool("generate", "--workdir", a, "--workdir", b, "--input",
                              tmp_path / "mixed.txt", "--out", tmp_path / "mixed_out.txt",
                              *common, capsys=capsys)
    assert status == 0
    assert lines(tmp_path / "mixed_out.txt") == [outputs["ab"[r]][i] for i, r in enumerate(rows)]

    # --raw: the line is the whole prompt. The formatted prompt has a newline, which cannot sit
    # in one input line, so compare a prompt without one: the raw MR against the raw MR.
    (tmp_path / "one.txt").write_text(MRS[0] + "\n")
    run_tool("generate", "--workdir", a, "--input", tmp_path / "one.txt", "--out",
               tmp_path / "raw_out.txt", "--raw", *common, capsys=capsys)
    run_tool("generate", "--workdir", a, "--input", tmp_path / "one.txt", "--out",
               tmp_path / "fmt_out.txt", *common, capsys=capsys)
    from prefix_jax.serving import bank, decoding

    run = bank.load([a])
    settings = decoding.settings_for(run.base.tokenizer, 6, prefix=run.options)  # its positions
    want_raw = decoding.generate(run.base.module, run.base.params, run.row(0), run.base.tokenizer,
                                 [MRS[0]], 2, settings)
    assert lines(tmp_path / "raw_out.txt") == want_raw
    assert lines(tmp_path / "fmt_out.txt") == outputs["a"][:1]


@pytest.mark.parametrize("content,flags,expected", [
    ("0\tname[Aromi]\n5\tname[Zizzi]\n", ["--workdir", "B"], "prefix 5 is out of range"),
    ("name[Aromi]\n", ["--workdir", "B"], "each line must be 'K<TAB>source'"),
    ("name[Aromi]\n", ["--top_p", "0"], "top_p=0.0 must be in (0, 1]"),
    ("name[Aromi]\n", ["--num_beams", "0"], "--num_beams=0 must be >= 1"),
], ids=["row-out-of-range", "no-row-with-a-bank", "bad-top-p", "bad-beams"])
def test_generate_bad_input_is_one_line_and_writes_nothing(two_runs, tmp_path, capsys, content,
                                                           flags, expected):
    a, b = two_runs
    (tmp_path / "in.txt").write_text(content)
    flags = [b if f == "B" else f for f in flags]
    status, _, err = run_tool("generate", "--workdir", a, "--input", tmp_path / "in.txt",
                             "--out", tmp_path / "out.txt", *flags, capsys=capsys)
    assert status == 2
    assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.txt").exists()


def test_evaluate_writes_scores_and_predictions(two_runs, capsys):
    a, _ = two_runs
    status, _, _ = run_tool("evaluate", "--workdir", a, "--split", "dev", "--limit", 3,
                              "--num_beams", 2, "--max_new_tokens", 5, capsys=capsys)
    assert status == 0
    with open(os.path.join(a, "eval_dev.json")) as f:
        result = json.load(f)
    assert set(result["scores"]) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    assert result["num_examples"] == 3 and result["decoding"]["num_beams"] == 2
    _, refs = e2e.group_references(e2e.read_pairs(E2E_DIR, "dev"))
    assert result["num_references"] == sum(len(r) for r in refs[:3])
    # A 2-step tiny random model writes byte soup: near-zero scores on every metric.
    assert all(v < 5 for v in result["scores"].values())
    assert len(lines(os.path.join(a, "predictions_dev.txt"))) == 3
    status, _, err = run_tool("evaluate", "--workdir", a, "--split", "train", capsys=capsys)
    assert status == 2 and err.startswith("error: ") and "--split" in err


def test_generate_never_writes_over_its_input_or_an_earlier_output(two_runs, tmp_path, capsys):
    a, _ = two_runs
    source = tmp_path / "mrs.txt"
    source.write_text(MRS[0] + "\n")
    common = ["--workdir", a, "--max_new_tokens", 2, "--batch_size", 1]
    status, _, err = run_tool("generate", *common, "--input", source, "--out", source,
                              "--overwrite", capsys=capsys)
    assert status == 2 and "is the --input file" in err and len(err.strip().splitlines()) == 1
    assert source.read_text() == MRS[0] + "\n"
    earlier = tmp_path / "out.txt"
    earlier.write_text("an earlier result\n")
    status, _, err = run_tool("generate", *common, "--input", source, "--out", earlier,
                              capsys=capsys)
    assert status == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert earlier.read_text() == "an earlier result\n"
    status, _, err = run_tool("generate", *common, "--input", source, "--out", earlier,
                              "--overwrite", capsys=capsys)
    assert status == 0, err
    assert len(lines(earlier)) == 1 and lines(earlier) != ["an earlier result"]


def test_evaluate_refuses_to_replace_a_result_made_with_other_settings(two_runs, tmp_path,
                                                                       capsys, monkeypatch):
    import shutil

    from prefix_jax.serving import decoding

    workdir = tmp_path / "run"
    shutil.copytree(two_runs[0], workdir)
    for name in ("eval_dev.json", "predictions_dev.txt"):  # another test's evaluation
        if (workdir / name).exists():
            os.remove(workdir / name)
    common = ["--workdir", workdir, "--split", "dev", "--limit", 2, "--max_new_tokens", 3]
    assert run_tool("evaluate", *common, "--num_beams", 1, capsys=capsys)[0] == 0
    assert run_tool("evaluate", *common, "--num_beams", 1, capsys=capsys)[0] == 0  # same: fine

    status, _, err = run_tool("evaluate", *common, "--num_beams", 2, capsys=capsys)
    # one error line (beside the note that --limit 2 decodes as one batch of 2)
    assert status == 2 and [line for line in err.splitlines() if not line.startswith("note:")] \
        == [err.strip().splitlines()[-1]] and err.strip().splitlines()[-1].startswith("error:")
    assert "other settings" in err and "--overwrite" in err and "'num_beams': 1" in err
    assert json.loads((workdir / "eval_dev.json").read_text())["decoding"]["num_beams"] == 1
    status, _, err = run_tool("evaluate", *common, "--limit", 3, capsys=capsys)
    assert status == 2 and "num_examples 2 -> 3" in err

    # The decoded outputs are on disk before scoring: a scorer that fails loses no decoding.
    def scorer_fails(self, predictions, references):
        raise RuntimeError("scorer crashed")

    os.remove(workdir / "predictions_dev.txt")
    monkeypatch.setattr(e2e.E2E, "report_scores", scorer_fails)
    with pytest.raises(RuntimeError, match="scorer crashed"):
        run_tool("evaluate", *common, "--num_beams", 2, "--overwrite", capsys=capsys)
    assert len(lines(workdir / "predictions_dev.txt")) == 2
    assert json.loads((workdir / "eval_dev.json").read_text())["decoding"]["num_beams"] == 1
    monkeypatch.undo()
    status, _, err = run_tool("evaluate", *common, "--num_beams", 2, "--overwrite",
                              capsys=capsys)
    assert status == 0, err
    assert json.loads((workdir / "eval_dev.json").read_text())["decoding"]["num_beams"] == 2

    # METEOR needs Java: refused before any decoding.
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before checking for Java")

    monkeypatch.setattr(e2e.shutil, "which", lambda name: None)
    monkeypatch.setattr(decoding, "generate", no_decoding)
    status, _, err = run_tool("evaluate", *common, "--overwrite", capsys=capsys)
    assert status == 2 and "needs Java" in err and len(err.strip().splitlines()) == 1


def test_e2e_metrics_of_a_reference_and_of_a_bad_system():
    """A system that outputs one of each MR's references (not always the first: multi-reference
    scoring) gets the maximum BLEU and ROUGE-L and a near-maximum METEOR."""
    _, refs = e2e.group_references(e2e.read_pairs(E2E_DIR, "dev"))
    refs = refs[:20]
    perfect = [r[i % len(r)] for i, r in enumerate(refs)]
    scores = metrics.e2e_scores(perfect, refs)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["rouge_l"] == pytest.approx(100.0)
    assert scores["meteor"] > 95
    assert scores["nist"] > 5 and scores["cider"] > 2
    # NIST and CIDEr without Java: a system that drops the second half of each sentence.
    halves = [" ".join(p.split()[:len(p.split()) // 2]) for p in perfect]
    assert metrics.nist(halves, refs) < scores["nist"] - 1


def test_runs_trained_before_newer_config_fields_still_load(two_runs, tmp_path):
    """A config.json without fields added later (model.remat, data.extra_dirs, eval.num_beams)
    still serves: those take their defaults."""
    import shutil

    from prefix_jax.serving import bank

    old = tmp_path / "old_run"
    shutil.copytree(two_runs[0], old)
    with open(old / "config.json") as f:
        config = json.load(f)
    for section, field in (("model", "remat"), ("model", "param_dtype"), ("data", "extra_dirs"),
                           ("eval", "num_beams")):
        del config[section][field]
    (old / "config.json").write_text(json.dumps(config))
    run = bank.load([str(old)])
    np_equal = (run.prefixes.k == bank.load([two_runs[0]]).prefixes.k).all()
    from prefix_jax import configs

    assert bool(np_equal) and run.configs[0].model.remat == configs.model_config().remat
