"""Your own data as JSONL (tasks/jsonl.py): reading, bad rows (one error with file:line each),
the prompt template, named generation metrics, the data dir search order, the two example
experiments end to end, and the README's "Your model, your data" commands on a tiny HF Llama."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import ml_collections
import pytest

from prefix_jax import configs, models, tasks
from prefix_jax.errors import UserError
from prefix_jax.tasks import evals, metrics, text_to_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")


def text_config(data_dir: str, **data) -> ml_collections.ConfigDict:
    from experiments import jsonl_example

    config = jsonl_example.get_config("runlocal")
    with config.unlocked():
        config.data.dir = data_dir
        config.data.update(data)
    return config


def classification_config(data_dir: str, **data) -> ml_collections.ConfigDict:
    from experiments import jsonl_classification_example

    config = jsonl_classification_example.get_config("runlocal")
    with config.unlocked():
        config.data.dir = data_dir
        config.data.update(data)
    return config


def write(path, *lines: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


# -- reading -------------------------------------------------------------------------------------


def test_fixture_reads_with_both_ways_of_giving_several_references():
    task = tasks.get(text_config(os.path.join(FIXTURES, "capitals")))
    pairs = task.train_pairs[0]
    # rows sharing a source are its references; a list-valued target is several references
    sources, refs = task.read_references(task.dirs[0], "train")
    assert refs[sources.index("Switzerland")] == ["Bern", "Berne"]
    dev_sources, dev_refs = task.read_references(task.dirs[0], "dev")
    assert dev_refs[dev_sources.index("Bolivia")] == ["Sucre", "La Paz"]
    assert len(pairs) == 43 and pairs[0] == text_to_text.Pair("France", "Paris")


def test_prompt_template_is_used_in_training_and_decoding():
    task = tasks.get(text_config(os.path.join(FIXTURES, "capitals")))
    assert task.prompt("France") == "What is the capital of France?\nAnswer:"
    tokenizer = models.byte_tokenizer()
    example = task.train_examples(tokenizer)[0]
    text = tokenizer.decode(example.tokens[:example.n_source])
    assert text == "What is the capital of France?\nAnswer:"
    assert tokenizer.decode(example.tokens[example.n_source:-1]) == " Paris"


def test_training_false_reads_no_file(tmp_path):
    task = tasks.get(text_config(str(tmp_path / "missing")), training=False)
    assert task.prompt("x") == "What is the capital of x?\nAnswer:"


# -- bad input: one UserError naming file:line ---------------------------------------------------

BAD_ROWS = {
    "invalid_json": ('{"country": "France", "capital": "Paris"}', '{"country": "Spain",'),
    "not_an_object": ('{"country": "France", "capital": "Paris"}', '["Spain", "Madrid"]'),
    "missing_field": ('{"country": "France", "capital": "Paris"}', '{"country": "Spain"}'),
    "non_string_field": ('{"country": "France", "capital": "Paris"}',
                         '{"country": "Spain", "capital": 7}'),
    "empty_string": ('{"country": "France", "capital": "Paris"}',
                     '{"country": "", "capital": "Madrid"}'),
    "bad_reference_list": ('{"country": "France", "capital": "Paris"}',
                           '{"country": "Spain", "capital": ["Madrid", 3]}'),
}
BAD_MESSAGES = {"invalid_json": "invalid JSON", "not_an_object": "expected a JSON object",
                "missing_field": "no field 'capital'", "non_string_field": "non-empty string",
                "empty_string": "non-empty string", "bad_reference_list": "list of them"}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_is_one_error_with_file_and_line(tmp_path, case):
    path = write(tmp_path / "train.jsonl", *BAD_ROWS[case])
    with pytest.raises(UserError) as e:
        tasks.get(text_config(str(tmp_path)))
    message = str(e.value)
    assert message.startswith(f"{path}:2: ") and "\n" not in message, message
    assert BAD_MESSAGES[case] in message


def test_empty_file_is_an_error(tmp_path):
    path = write(tmp_path / "train.jsonl", "", "  ")
    with pytest.raises(UserError, match=re.escape(f"{path}: no rows")):
        tasks.get(text_config(str(tmp_path)))


def test_missing_file_and_missing_split_are_errors(tmp_path):
    with pytest.raises(UserError, match=r"train file not found \(data.train_file"):
        tasks.get(text_config(str(tmp_path)))
    config = text_config(os.path.join(FIXTURES, "capitals"), test_file="")
    with pytest.raises(UserError, match=r"data\.test_file is empty"):
        evals.build(config, tasks.get(config))


def test_not_utf8_is_an_error(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"country": "A", "capital": "B"}\n{"c": "\xff"}\n')
    with pytest.raises(UserError, match=r"train.jsonl:2: byte 0xff, which is not UTF-8"):
        tasks.get(text_config(str(tmp_path)))


@pytest.mark.parametrize("prompt,problem", [
    ("{question}\nAnswer:", "has fields ['question']"),
    ("no field at all", "has fields []"),
    ("{source} {source}", "has fields ['source', 'source']"),
    ("{source", "expected '}'"),
])
def test_bad_prompt_template(prompt, problem):
    with pytest.raises(UserError, match=re.escape(problem)):
        tasks.get(text_config(os.path.join(FIXTURES, "capitals"), prompt=prompt))


def test_literal_braces_in_prompt():
    task = tasks.get(text_config(os.path.join(FIXTURES, "capitals"),
                                 prompt='{{"q": "{source}"}} ->'))
    assert task.prompt("France") == '{"q": "France"} ->'


# -- metrics and config.evals --------------------------------------------------------------------


def test_exact_match():
    refs = [["Paris"], ["Sucre", "La Paz"], ["Rome"]]
    assert metrics.exact_match(["paris ", "La  Paz", "Milan"], refs) == pytest.approx(200 / 3)


@pytest.mark.parametrize("given,want", [
    ("quick", "quick"), ("report", "report"), ("exact_match", ("exact_match",)),
    ("bleu, exact_match", ("bleu", "exact_match")), (("rouge_l",), ("rouge_l",)),
])
def test_generation_metrics_by_name(given, want):
    config = text_config(os.path.join(FIXTURES, "capitals"))
    with config.unlocked():
        config.evals = configs.evals_config(dev={"type": "generation", "metrics": given})
    task = tasks.get(config)
    assert evals.specs(config, task)["dev"].metrics == want
    during, _ = evals.build(config, task)
    names = {"quick": ("bleu", "rouge_l"), "report": ("bleu", "rouge_l", "exact_match")}
    assert during["dev"].metric_names == names.get(want, want)


@pytest.mark.parametrize("given", ["meteor", "bleu,bleu", "", 3])
def test_unknown_generation_metric_is_an_error(given):
    config = text_config(os.path.join(FIXTURES, "capitals"))
    with config.unlocked():
        config.evals = configs.evals_config(dev={"type": "generation", "metrics": given})
    with pytest.raises(UserError, match=r"evals\.dev\.metrics="):
        evals.specs(config, tasks.get(config))


# -- classification ------------------------------------------------------------------------------


def test_label_set_from_the_train_file_is_recorded():
    config = classification_config(os.path.join(FIXTURES, "sentiment"))
    task = tasks.get(config)
    assert task.labels == ("negative", "neutral", "positive")
    assert tuple(config.data.labels) == task.labels and config.model.num_labels == 3
    dev = task.read_split("dev")
    assert [e.label for e in dev] == [2, 2, 0, 0, 1]
    # a finished run's config (labels recorded) reads back without the train file
    again = tasks.get(config, training=False)
    assert again.labels == task.labels


def test_unknown_dev_label_is_an_error(tmp_path):
    shutil.copy(os.path.join(FIXTURES, "sentiment", "train.jsonl"), tmp_path / "train.jsonl")
    path = write(tmp_path / "dev.jsonl", '{"text": "fine", "label": "positive"}',
                 '{"text": "meh", "label": "mixed"}')
    config = classification_config(str(tmp_path))
    task = tasks.get(config)
    with pytest.raises(UserError, match=re.escape(f"{path}:2: label 'mixed' is not in the "
                                                  "label set")):
        evals.build(config, task)


def test_integer_labels_sorted_and_mixed_types_refused(tmp_path):
    write(tmp_path / "train.jsonl", '{"text": "a", "label": 2}', '{"text": "b", "label": 0}')
    assert tasks.get(classification_config(str(tmp_path))).labels == (0, 2)
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": 1}',
                 '{"text": "b", "label": "1"}')
    with pytest.raises(UserError, match=re.escape(f"{path}:2: label '1' is a str")):
        tasks.get(classification_config(str(tmp_path)))


def test_label_problems(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": "x"}',
                 '{"text": "b", "label": true}')
    with pytest.raises(UserError, match=re.escape(f"{path}:2: label True")):
        tasks.get(classification_config(str(tmp_path)))
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": "x"}')
    with pytest.raises(UserError, match="a classifier needs at least 2"):
        tasks.get(classification_config(str(tmp_path)))


def test_num_labels_mismatch_is_an_error():
    config = classification_config(os.path.join(FIXTURES, "sentiment"))
    with config.unlocked():
        config.model.num_labels = 2
    with pytest.raises(UserError, match=r"model.num_labels=2 but the label set has 3 labels"):
        tasks.get(config)


def test_decoder_task_on_an_encoder_is_refused():
    config = text_config(os.path.join(FIXTURES, "capitals"))
    task = tasks.get(config)
    loaded = models.load(ml_collections.ConfigDict(dict(configs.model_config("tiny-bert"))))
    with pytest.raises(UserError, match="needs a decoder"):
        tasks.check_model(task, loaded)


# -- data dir search order -----------------------------------------------------------------------


def test_data_dir_search_order(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    shared = tmp_path / "shared" / "data" / "e2e"
    here = tmp_path / "cwd"
    for d in (checkout, shared, here):
        d.mkdir(parents=True)
    monkeypatch.setattr(configs, "_REPO_ROOT", str(checkout))
    monkeypatch.chdir(here)
    monkeypatch.delenv(configs.DATA_ENV, raising=False)
    # nothing anywhere: the checkout's data/<task>, where scripts/get_data.sh writes
    assert configs.default_data_dir("sst2") == str(checkout / "data" / "sst2")
    assert configs.default_data_dir("e2e") == str(shared)  # ../shared/data beside the checkout
    (checkout / "data" / "e2e").mkdir(parents=True)
    assert configs.default_data_dir("e2e") == str(checkout / "data" / "e2e")
    (here / "data" / "e2e").mkdir(parents=True)
    assert configs.default_data_dir("e2e") == str(here / "data" / "e2e")
    monkeypatch.setenv(configs.DATA_ENV, str(tmp_path / "elsewhere"))
    assert configs.default_data_dir("e2e") == str(tmp_path / "elsewhere" / "e2e")
    # and the flag replaces the default whatever it is
    from experiments import e2e_smollm2

    config = e2e_smollm2.get_config()
    with config.unlocked():
        config.data.dir = "/given"
    assert configs.task_dirs(config) == ["/given"]


def test_default_e2e_run_finds_the_shared_data_here():
    if os.environ.get(configs.DATA_ENV):
        pytest.skip(f"{configs.DATA_ENV} is set")
    from experiments import e2e_smollm2

    assert os.path.isfile(os.path.join(e2e_smollm2.get_config().data.dir, "trainset.csv"))


def test_get_data_script_arguments(tmp_path):
    script = os.path.join(REPO, "scripts", "get_data.sh")
    out = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "e2e" in out.stdout and "PREFIX_JAX_DATA" in out.stdout
    bad = subprocess.run(["bash", script, "mnist"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "mnist" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    dry = subprocess.run(["bash", script, "--dry-run", "--dest", str(tmp_path), "e2e", "dart"],
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert f"{tmp_path}/e2e" in dry.stdout and f"{tmp_path}/dart" in dry.stdout
    assert not os.listdir(tmp_path)  # a dry run downloads and writes nothing


# -- end to end ----------------------------------------------------------------------------------


def scores_of(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_jsonl_example_trains_and_reports_dev_scores(tmp_path):
    from prefix_jax import train

    config = text_config(os.path.join(FIXTURES, "capitals"))
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == config.train.num_steps
    rows = scores_of(tmp_path)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    dev = [r for r in rows if "eval/exact_match" in r][-1]
    assert 0.0 <= dev["eval/exact_match"] <= 100.0 and 0.0 <= dev["eval/bleu"] <= 100.0
    assert math.isfinite(dev["eval/loss"])
    with open(tmp_path / "eval_test.json") as f:
        test = json.load(f)
    assert set(test["scores"]) == {"bleu", "rouge_l", "exact_match"}
    with open(tmp_path / "generations" / f"dev_step{config.train.num_steps}.jsonl") as f:
        first = json.loads(f.readline())
    assert first["source"] == "Iceland" and first["references"] == ["Reykjavik"]


def test_jsonl_classification_example_trains(tmp_path):
    from prefix_jax import train

    config = classification_config(os.path.join(FIXTURES, "sentiment"))
    train.train_and_evaluate(config, str(tmp_path))
    dev = [r for r in scores_of(tmp_path) if "eval/accuracy" in r][-1]
    assert 0.0 <= dev["eval/accuracy"] <= 100.0 and math.isfinite(dev["eval/loss"])
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["data"]["labels"] == ["negative", "neutral", "positive"]
    assert written["model"]["num_labels"] == 3


def readme_quickstart() -> list[str]:
    """The bash lines of README's "Your model, your data" block (between its markers)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = text.split("<!-- quickstart: begin")[1].split("<!-- quickstart: end -->")[0]
    return block.split("```bash\n")[1].split("```")[0].splitlines()


def tiny_hf_llama(path) -> None:
    """A tiny random HF Llama directory: config.json, safetensors, a byte-level tokenizer."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    models.byte_tokenizer().save_pretrained(path)


def test_readme_quickstart_commands_run_end_to_end(tmp_path):
    """README's commands, unchanged but for three things: MODEL and DATA point at a tiny random
    HF Llama and at the capitals fixture rewritten as question/answer rows, and the training
    command gets a few steps instead of the full run."""
    tiny_hf_llama(tmp_path / "hf_model")
    for split in ("train", "dev", "test"):
        with open(os.path.join(FIXTURES, "capitals", f"{split}.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        write(tmp_path / "my_data" / f"{split}.jsonl",
              *(json.dumps({"question": f"Capital of {r['country']}?", "answer": r["capital"]})
                for r in rows))
    write(tmp_path / "questions.txt", "Capital of France?", "Capital of Peru?")
    os.symlink(os.path.join(REPO, "experiments"), tmp_path / "experiments")
    lines = []
    for line in readme_quickstart():
        if line.startswith("MODEL="):
            line = f"MODEL={tmp_path / 'hf_model'}"
        elif line.startswith("DATA="):
            line = f"DATA={tmp_path / 'my_data'}"
        elif "--config.data.prompt=" in line:
            line += (" --config.train.num_steps=2 --config.train.log_every=1"
                     " --config.eval.max_new_tokens=4 --config.eval.eval_untuned=False")
        lines.append(line)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               JAX_PLATFORMS="cpu")
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "runs" / "my_task" / "config.json") as f:
        written = json.load(f)
    assert written["model"]["path"] == str(tmp_path / "hf_model")
    assert written["data"]["prompt"] == "{source}\nAnswer:"
    assert [r for r in scores_of(tmp_path / "runs" / "my_task") if "eval/exact_match" in r]
    with open(tmp_path / "answers.txt") as f:
        assert len(f.read().splitlines()) == 2
