"""The bad-input catalog: each mistake ends with one `error:` line naming the problem, exit
status 2, no traceback, and the workdir exactly as it was (byte for byte). The catalog runs
`prefix_jax.main` in this process (one JAX start-up for all); a real process checks the exit
status and `--traceback`."""

import os
import subprocess
import sys

import pytest

from tests.helpers import E2E_DIR, run_tool, runlocal_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(REPO, "experiments", "e2e_smollm2.py")
RUNLOCAL = f"--config={EXPERIMENT}:runlocal"
FAST = ["--config.eval.num_examples=0", "--config.eval.eval_untuned=False"]


def run_main_process(*flags, workdir=None, timeout=300):
    args = [sys.executable, "-m", "prefix_jax.main", *flags]
    if workdir is not None:
        args.append(f"--workdir={workdir}")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def snapshot(path):
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, path)
            if os.path.isfile(p):
                with open(p, "rb") as fh:
                    out[rel] = fh.read()
            else:
                out[rel] = None
    return out


def data_dir_with(tmp, train_text=None, drop=()):
    """A copy of the E2E dir (symlinks) with trainset.csv replaced or some files left out."""
    d = tmp / "e2e"
    d.mkdir()
    for name in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
        if name in drop or (name == "trainset.csv" and train_text is not None):
            continue
        os.symlink(os.path.join(E2E_DIR, name), d / name)
    if train_text is not None:
        (d / "trainset.csv").write_text(train_text)
    return d


def tiny_hf_dir_with_wrong_tokenizer(tmp):
    """An HF Llama dir whose tokenizer has more tokens than the model's vocabulary."""
    return _save_tiny_hf_llama(tmp / "hf_model", vocab_size=100)


def _save_tiny_hf_llama(d, vocab_size: int):
    """A 1-layer random HF Llama with the byte tokenizer, saved to `d`."""
    import torch
    import transformers

    from prefix_jax import models

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=512)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    models.byte_tokenizer().save_pretrained(d)
    return d


def tiny_hf_llama_dir(tmp, edit_config=None, edit_tensors=None):
    """A tiny HF Llama dir (byte tokenizer) with its config.json and/or its tensors changed."""
    import json

    from safetensors.numpy import load_file, save_file

    d = _save_tiny_hf_llama(tmp / "hf_llama", vocab_size=320)
    if edit_config:
        config = json.loads((d / "config.json").read_text())
        edit_config(config)
        (d / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(str(d / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _yarn(config):
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}


def _bad_utf8_file(tmp, name: str, good: str, bad: bytes, copy_of: str | None = None):
    """A data dir holding `name` = `good` text then a line with `bad` bytes (line 3 of the
    file when `good` has two lines), plus symlinks to `copy_of`'s other files."""
    d = tmp / "data"
    d.mkdir()
    if copy_of:
        for other in os.listdir(copy_of):
            if other != name:
                os.symlink(os.path.join(copy_of, other), d / other)
    (d / name).write_bytes(good.encode() + bad + b"\n")
    return f"--config.data.dir={d}"


def tiny_peft_adapter(tmp, length: int):
    """A PEFT prefix-tuning adapter dir for the tiny Llama with `length` virtual tokens."""
    import numpy as np

    from prefix_jax import models
    from prefix_jax.models.core import KV
    from prefix_jax.serving import peft_format

    cfg = models.tiny_config("tiny")
    kv = np.zeros((cfg.n_layers, 1, length, cfg.n_kv_heads, cfg.head_dim), np.float32)
    d = tmp / f"adapter{length}"
    peft_format.write_adapter(str(d), KV(kv, kv), cfg, "tiny")
    return d


def _plain_dir(tmp):
    d = tmp / "not_an_adapter"
    d.mkdir()
    (d / "notes.txt").write_text("no adapter here")
    return d


def trained_workdir(tmp):
    """A workdir holding a 2-step runlocal checkpoint (RUNLOCAL with FAST)."""
    from prefix_jax import train

    w = tmp / "run"
    train.train_and_evaluate(runlocal_config(train__num_steps=2, eval__num_examples=0,
                                             eval__eval_untuned=False), str(w))
    return w


GOOD_ROW = '"name[A], eatType[pub]",A is a pub.\n'
EMPTY_TRAIN = "mr,ref\n"
BAD_HEADER = "a,b\n" + GOOD_ROW
BAD_ROW = "mr,ref\n" + GOOD_ROW + '"name[B]"\n'  # line 3: one field


def data_flag(tmp, train_text=None, drop=()):
    return f"--config.data.dir={data_dir_with(tmp, train_text, drop)}"


# name -> (setup(tmp) -> (flags, workdir or None), text the error line must contain)
CATALOG = {
    "unknown-config-field": (lambda t: ([RUNLOCAL, "--config.prefix.lenght=3"], None),
                             "unknown field 'lenght'"),
    "unknown-config-section": (lambda t: ([RUNLOCAL, "--config.prefixx.length=3"], None),
                               "'prefixx'"),
    "unknown-config-arg": (lambda t: ([RUNLOCAL + ",prefixlen=3"], None), "prefixlen"),
    "config-arg-wrong-type": (lambda t: ([RUNLOCAL + ",prefix_len=ten"], None), "prefix_len"),
    "wrong-type-value": (lambda t: ([RUNLOCAL, "--config.train.num_steps=abc"], None),
                         "num_steps"),
    "missing-config-file": (lambda t: (["--config=experiments/nope.py"], None), "nope.py"),
    "missing-workdir-flag": (lambda t: ([RUNLOCAL], "none"), "--workdir"),
    "extra-argument": (lambda t: ([RUNLOCAL, "oops"], None), "oops"),
    "negative-prefix-length": (lambda t: ([RUNLOCAL, "--config.prefix.length=-1"], None),
                               "prefix.length=-1"),
    "bad-prefix-mode": (lambda t: ([RUNLOCAL, "--config.prefix.mode=banana"], None),
                        "prefix.mode"),
    "bad-prefix-init": (lambda t: ([RUNLOCAL, "--config.prefix.init=magic"], None),
                        "prefix.init"),
    "bad-prefix-layers": (lambda t: ([RUNLOCAL, "--config.prefix.layers=top:9"], None),
                          "prefix.layers"),
    "bad-prefix-reparam": (lambda t: ([RUNLOCAL, "--config.prefix.reparam=lstm"], None),
                           "prefix.reparam"),
    "prompt-tuning-positions": (lambda t: ([RUNLOCAL, "--config.prefix.mode=input",
                                            "--config.prefix.positions=zero"], None),
                                "after_prefix"),
    "bad-positions": (lambda t: ([RUNLOCAL, "--config.prefix.positions=middle"], None),
                      "prefix.positions"),
    "zero-steps": (lambda t: ([RUNLOCAL, "--config.train.num_steps=0"], None),
                   "train.num_steps=0"),
    "zero-batch": (lambda t: ([RUNLOCAL, "--config.train.batch_size=0"], None),
                   "train.batch_size=0"),
    "negative-lr": (lambda t: ([RUNLOCAL, "--config.optim.lr=-1.0"], None), "optim.lr"),
    "bad-dtype": (lambda t: ([RUNLOCAL, "--config.model.dtype=float16"], None), "model.dtype"),
    "bad-param-dtype": (lambda t: ([RUNLOCAL, "--config.model.param_dtype=int4"], None),
                        "model.param_dtype"),
    "bad-remat": (lambda t: ([RUNLOCAL, "--config.model.remat=some"], None), "model.remat"),
    "mesh-larger-than-devices": (lambda t: ([RUNLOCAL, "--config.mesh.data=3"], None),
                                 "set --config.mesh"),
    "coordinator-without-process-count": (
        lambda t: ([RUNLOCAL, "--config.distributed.coordinator_address=127.0.0.1:1"], None),
        "distributed.num_processes"),
    "regex-matches-nothing": (lambda t: ([RUNLOCAL, "--config.trainable=^nothing/"], None),
                              "matches no parameter"),
    "invalid-regex": (lambda t: ([RUNLOCAL, "--config.trainable=(prefix"], None),
                      "not a valid regex"),
    "missing-model-file": (lambda t: ([RUNLOCAL, "--config.model.path=/nonexistent/m.gguf"],
                                      None), "/nonexistent/m.gguf"),
    "corrupt-model-file": (lambda t: ([RUNLOCAL, f"--config.model.path={_garbage(t)}"], None),
                           "not a readable Llama GGUF"),
    "tokenizer-model-mismatch": (
        lambda t: ([RUNLOCAL, f"--config.model.path={tiny_hf_dir_with_wrong_tokenizer(t)}"],
                   None), "belongs to another model"),
    "missing-data-dir": (lambda t: ([RUNLOCAL, "--config.data.dir=/nonexistent/e2e"], None),
                         "/nonexistent/e2e"),
    "missing-train-file": (
        lambda t: ([RUNLOCAL, data_flag(t, drop=("trainset.csv",))], None), "trainset.csv"),
    "empty-train-file": (
        lambda t: ([RUNLOCAL, data_flag(t, EMPTY_TRAIN)], None), "no data rows"),
    "malformed-header": (
        lambda t: ([RUNLOCAL, data_flag(t, BAD_HEADER)], None), "trainset.csv:1:"),
    "bad-data-row": (lambda t: ([RUNLOCAL, data_flag(t, BAD_ROW)], None), "trainset.csv:3:"),
    "fewer-examples-than-batch": (lambda t: ([RUNLOCAL, "--config.data.train_examples=2"], None),
                                  "fewer than train.batch_size"),
    "sequence-longer-than-max-len": (lambda t: ([RUNLOCAL, "--config.data.max_len=20"], None),
                                     "longer than data.max_len=20"),
    "max-len-over-model-maximum": (lambda t: ([RUNLOCAL, "--config.data.max_len=100000"], None),
                                   "maximum sequence length"),
    "non-utf8-e2e-csv": (
        lambda t: ([RUNLOCAL, _bad_utf8_file(t, "trainset.csv", "mr,ref\n" + GOOD_ROW,
                                             b'"name[B]",caf\xe9', E2E_DIR)], None),
        "trainset.csv:3: byte 0xe9, which is not UTF-8"),
    "nul-in-e2e-csv": (
        lambda t: ([RUNLOCAL, _bad_utf8_file(t, "trainset.csv", "mr,ref\n" + GOOD_ROW,
                                             b'"name[B]",a\0b', E2E_DIR)], None),
        "trainset.csv:3: a NUL byte"),
    "non-utf8-sst2-tsv": (
        lambda t: ([SST2, _bad_utf8_file(t, "train.tsv", "sentence\tlabel\ngood\t1\n",
                                         b"caf\xe9\t0", SST2_DIR)], None),
        "train.tsv:3: byte 0xe9"),
    "nul-in-jsonl": (
        lambda t: ([JSONL, _bad_utf8_file(t, "train.jsonl",
                                          '{"country": "B", "capital": "C"}\n\n',
                                          b'{"country": "\0"}')], None),
        "train.jsonl:3: a NUL byte"),
    "zero-bucket-multiple": (lambda t: ([RUNLOCAL, "--config.data.bucket_multiple=0"], None),
                             "data.bucket_multiple=0"),
    "negative-seed": (lambda t: ([RUNLOCAL, "--config.seed=-1"], None), "seed=-1"),
    "config-import-fails": (lambda t: ([f"--config={_config_importing_nothing(t)}"], None),
                            "working directory"),
    "hf-unknown-model-type": (
        lambda t: ([RUNLOCAL, f"--config.model.path={tiny_hf_llama_dir(t, lambda c: c.update(model_type='no-such-model'))}"],  # noqa: E501
                   None), "model_type"),
    "hf-unsupported-rope-type": (
        lambda t: ([RUNLOCAL, f"--config.model.path={tiny_hf_llama_dir(t, _yarn)}"], None),
        "rope_type='yarn'"),
    "hf-missing-tensor": (
        lambda t: ([RUNLOCAL, "--config.model.path=" + str(tiny_hf_llama_dir(
            t, edit_tensors=lambda w: w.pop("model.norm.weight")))], None),
        "lack tensor 'model.norm.weight'"),
    "hf-left-over-tensor": (
        lambda t: ([RUNLOCAL, "--config.model.path=" + str(tiny_hf_llama_dir(
            t, edit_tensors=lambda w: w.update(extra=w["model.norm.weight"])))], None),
        "tensor 'extra'"),
    "workdir-is-a-file": (lambda t: ([RUNLOCAL], _file(t)), "is a file"),
    "unwritable-workdir": (lambda t: ([RUNLOCAL], os.path.join(_file(t), "run")),
                           "cannot be created"),
    "init-from-peft-not-an-adapter": (
        lambda t: ([RUNLOCAL, "--config.prefix.positions=after_prefix",
                    f"--config.prefix.init_from_peft={_plain_dir(t)}"], None),
        "not a PEFT adapter directory"),
    "init-from-peft-shape-mismatch": (
        lambda t: ([RUNLOCAL, "--config.prefix.positions=after_prefix",
                    f"--config.prefix.init_from_peft={tiny_peft_adapter(t, 3)}"], None),
        "set prefix.length=3"),
    "init-from-peft-positions-zero": (
        lambda t: ([RUNLOCAL, "--config.prefix.positions=zero",
                    f"--config.prefix.init_from_peft={tiny_peft_adapter(t, 10)}"], None),
        "prefix.positions=after_prefix"),
    "checkpoint-of-another-model": (
        lambda t: ([RUNLOCAL, *FAST, "--config.model.path=tiny-mha"], trained_workdir(t)),
        "fingerprint"),
    "checkpoint-of-another-prefix-shape": (
        lambda t: ([RUNLOCAL, *FAST, "--config.prefix.length=3"], trained_workdir(t)),
        "trainable shapes"),
    "jsonl-invalid-json": (lambda t: ([JSONL, jsonl_dir(t, '{"country": "A",')], None),
                           "train.jsonl:2: invalid JSON"),
    "jsonl-missing-field": (lambda t: ([JSONL, jsonl_dir(t, '{"country": "A"}')], None),
                            "train.jsonl:2: no field 'capital'"),
    "jsonl-non-string-field": (
        lambda t: ([JSONL, jsonl_dir(t, '{"country": "A", "capital": 1}')], None),
        "train.jsonl:2: field 'capital'"),
    "jsonl-bad-prompt": (lambda t: ([JSONL, "--config.data.prompt={question}"], None),
                         "data.prompt="),
    "jsonl-unknown-dev-label": (
        lambda t: ([JSONL_CLS, labelled_dir(t)], None), "dev.jsonl:1: label 'mixed'"),
}

SST2 = f"--config={os.path.join(REPO, 'experiments', 'sst2_minilm_prefix.py')}:runlocal"
SST2_DIR = os.path.join(os.path.dirname(E2E_DIR), "sst2")
JSONL = f"--config={os.path.join(REPO, 'experiments', 'jsonl_example.py')}:runlocal"
JSONL_CLS = (f"--config={os.path.join(REPO, 'experiments', 'jsonl_classification_example.py')}"
             ":runlocal")


def jsonl_dir(tmp, bad_line: str) -> str:
    """The capitals fixture with a bad second train line."""
    d = tmp / "capitals"
    d.mkdir()
    (d / "train.jsonl").write_text('{"country": "B", "capital": "C"}\n' + bad_line + "\n")
    return f"--config.data.dir={d}"


def labelled_dir(tmp) -> str:
    """The sentiment fixture with a dev label the train file does not have."""
    d = tmp / "sentiment"
    d.mkdir()
    os.symlink(os.path.join(REPO, "tests", "fixtures", "sentiment", "train.jsonl"),
               d / "train.jsonl")
    (d / "dev.jsonl").write_text('{"text": "so so", "label": "mixed"}\n')
    return f"--config.data.dir={d}"


def _config_importing_nothing(tmp):
    """A config file that imports a helper module the working directory does not have (as
    `from experiments import sweeps` does when run from outside the repository root)."""
    p = tmp / "my_experiment.py"
    p.write_text("from my_missing_helpers import base  # noqa\n")
    return p


def _garbage(tmp):
    p = tmp / "broken.gguf"
    p.write_bytes(b"this is not a gguf file" * 10)
    return p


def _file(tmp):
    p = tmp / "a_file"
    p.write_text("not a directory")
    return str(p)


def test_catalog_is_large_enough():
    assert len(CATALOG) >= 20


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_bad_input(tmp_path, name, capsys):
    setup, named = CATALOG[name]
    flags, workdir = setup(tmp_path)
    if workdir is None:
        workdir = tmp_path / "run"
        workdir.mkdir()
        (workdir / "notes.txt").write_text("keep me")
    before = snapshot(workdir) if workdir != "none" and os.path.isdir(workdir) else None
    capsys.readouterr()  # what the setup printed is not the tool's output
    if workdir != "none":
        flags = [*flags, f"--workdir={workdir}"]
    status, _, err = run_tool("main", *flags, capsys=capsys)  # a bug raises through here
    assert status == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and named in errors[0], err[-3000:]
    assert "Traceback" not in err
    if before is not None:
        assert snapshot(workdir) == before
    elif workdir != "none":
        assert not os.path.exists(workdir) or not os.path.isdir(workdir)


def test_a_process_exits_2_with_one_line_and_traceback_shows_the_stack(tmp_path):
    flags = [RUNLOCAL, "--config.data.dir=/nonexistent/e2e"]
    result = run_main_process(*flags, workdir=tmp_path / "run")
    assert result.returncode == 2
    assert len([line for line in result.stderr.splitlines() if line.startswith("error: ")]) == 1
    assert "/nonexistent/e2e" in result.stderr and "Traceback" not in result.stderr
    result = run_main_process(*flags, "--traceback", workdir=tmp_path / "run")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_generate_refuses_inputs_past_the_context(tmp_path, capsys):
    """GPT-2 has 512 learned positions here: a long input, or a short one with too many new
    tokens, is refused with the limit named (it used to decode NaN logits into empty lines)."""
    from prefix_jax import train

    workdir = tmp_path / "gpt2"
    train.train_and_evaluate(runlocal_config(model__path="tiny-gpt2", train__num_steps=1,
                                             eval__num_examples=0, eval__eval_untuned=False),
                             str(workdir))
    inputs, out = tmp_path / "in.txt", tmp_path / "out.txt"
    for source, new_tokens, named in (("name[" + "x" * 600 + "]", 8, "input 2 is "),
                                      ("name[The Eagle]", 500, "max_new_tokens=500")):
        inputs.write_text(f"name[A]\n{source}\n" if new_tokens == 8 else f"{source}\n")
        capsys.readouterr()
        status, _, err = run_tool("generate", f"--workdir={workdir}", f"--input={inputs}",
                                  f"--out={out}", f"--max_new_tokens={new_tokens}", "--raw",
                                  capsys=capsys)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert status == 2 and len(errors) == 1, err[-3000:]
        assert named in errors[0] and "512 (its learned position table)" in errors[0]
        assert not out.exists()


def test_eval_batch_far_above_the_examples_is_clamped_with_a_note(tmp_path, capsys):
    from prefix_jax import train

    # unclamped, 100000 rows of padding would take gigabytes and minutes to decode
    result = train.train_and_evaluate(
        runlocal_config(train__num_steps=1, eval__num_examples=2, eval__batch_size=100_000,
                        eval__eval_untuned=False, eval__max_new_tokens=2), str(tmp_path / "w"))
    assert "eval/bleu" in result
    assert "batch_size=100000 is more than its 2 examples" in capsys.readouterr().err
