"""PEFT interop: adapters exported by prefix_jax load in peft (torch) with the same logits, and
adapters made by peft load into prefix_jax (`prefix.init_from_peft`) with the same logits, for a
tiny GQA Llama, a tiny GPT-2 and the real SmolLM2. The torch models hold OUR weights
(`params_to_hf`), so any difference is the prefix's layout or its positions."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from prefix_jax import export, models, train
from prefix_jax.models import hf_gpt2, hf_llama
from prefix_jax.models.core import KV, causal_mask
from prefix_jax.models.gpt2 import GPT2Config
from prefix_jax.serving import bank, peft_format
from prefix_jax.training import partition
from tests.helpers import runlocal_config

P = 5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_from_ours(loaded: models.LoadedModel) -> transformers.PreTrainedModel:
    """A transformers LM holding `loaded`'s weights (built as prefix_jax.bench.train builds its
    reference: on the meta device, the weights assigned, no random init)."""
    cfg = loaded.config
    if isinstance(cfg, GPT2Config):
        cls, hf_cfg = transformers.GPT2LMHeadModel, transformers.GPT2Config(
            **hf_gpt2.config_to_hf(cfg))
        tensors, embedding = hf_gpt2.params_to_hf(cfg, loaded.params), "transformer.wte.weight"
    else:
        cls, hf_cfg = transformers.LlamaForCausalLM, transformers.LlamaConfig(
            **hf_llama.config_to_hf(cfg))
        tensors, embedding = hf_llama.params_to_hf(cfg, loaded.params), "model.embed_tokens.weight"
    with torch.device("meta"):
        model = cls(hf_cfg)
    state = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    if getattr(cfg, "tie_embeddings", True):
        state["lm_head.weight"] = state[embedding]
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    if hasattr(model, "model"):  # Llama's rotary buffers are not weights: rebuild them off meta
        model.model.rotary_emb = type(model.model.rotary_emb)(hf_cfg)
    return model.eval()


def padded_batch(vocab: int, lengths=(9, 6), seed: int = 0):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = rng.integers(3, vocab, size=(len(lengths), t))
    segments = np.array([[1] * n + [0] * (t - n) for n in lengths])
    return tokens, segments


def ours_logits(loaded, kv: KV, offset: int, tokens, segments) -> np.ndarray:
    t = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(t) + offset, tokens.shape)
    logits, _ = loaded.module.apply({"params": loaded.params}, jnp.asarray(tokens), positions,
                                    causal_mask(jnp.asarray(segments), kv.k.shape[2]), prefix=kv)
    return np.asarray(logits)


def peft_logits(model, tokens, segments) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens),
                     attention_mask=torch.tensor(segments > 0).long()).logits.numpy()


def assert_same(got, want, segments, atol=1e-3):
    for row, n in enumerate((segments > 0).sum(1)):
        np.testing.assert_allclose(got[row, :n], want[row, :n], atol=atol, rtol=0)


def peft_made_adapter(hf, path, seed: int = 3) -> peft.PeftModel:
    """A PEFT prefix-tuning adapter with a random prefix, saved to `path`."""
    model = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                            num_virtual_tokens=P))
    torch.manual_seed(seed)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    return model.eval()


def peft_prompt_kv(model) -> KV:
    """peft's own `get_prompt` cache as our `KV([L, 1, P, K, D])` (the layout ground truth)."""
    cache = model.get_prompt(batch_size=1)
    k = np.stack([layer.keys.detach().numpy() for layer in cache.layers]).transpose(0, 1, 3, 2, 4)
    v = np.stack([layer.values.detach().numpy() for layer in cache.layers]).transpose(0, 1, 3, 2, 4)
    return KV(k, v)


@pytest.fixture(scope="module", params=["tiny", "tiny-gpt2", "tiny-hidden-mlp"])
def trained_run(request, tmp_path_factory):
    """A 2-step training run (the smoke run of the train loop for GPT-2), positions as PEFT's:
    'auto' for GPT-2 (resolving to after_prefix), set explicitly for the Llama. The third is a
    Llama with hidden-state prefixes through an MLP: what it exports is the keys/values they
    compute, which PEFT must reproduce as well."""
    workdir = tmp_path_factory.mktemp("run")
    model_path = "tiny" if request.param == "tiny-hidden-mlp" else request.param
    overrides = dict(model__path=model_path, train__num_steps=2, prefix__length=P,
                     data__train_examples=16, eval__num_examples=2, eval__max_new_tokens=4,
                     eval__eval_untuned=False)
    if model_path == "tiny":  # the Llama train loop and its decoding are tested elsewhere
        overrides.update(prefix__positions="after_prefix", eval__num_examples=0)
    if request.param == "tiny-hidden-mlp":
        overrides.update(prefix__mode="hidden", prefix__reparam="mlp", prefix__mlp_hidden=16)
    train.train_and_evaluate(runlocal_config(**overrides), str(workdir))
    return request.param, workdir


def test_train_loop_runs(trained_run):
    _, workdir = trained_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses and all(np.isfinite(losses))
    assert (workdir / "checkpoints" / "2").is_dir()


def test_exported_adapter_gives_prefix_jax_logits_in_peft(trained_run, tmp_path):
    _, workdir = trained_run
    out = tmp_path / "adapter"
    export.export(str(workdir), str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == P
    assert not config["prefix_projection"] and config["task_type"] == "CAUSAL_LM"

    run = bank.load([str(workdir)])
    assert run.options.position_offset == P
    loaded = run.base
    model = peft.PeftModel.from_pretrained(hf_from_ours(loaded), str(out)).eval()
    tokens, segments = padded_batch(loaded.config.vocab_size)
    want = peft_logits(model, tokens, segments)
    got = ours_logits(loaded, run.row(0), run.options.position_offset, tokens, segments)
    assert_same(got, want, segments)
    # The prefix is seen: positions from 0 (the other convention) give other logits.
    assert np.abs(ours_logits(loaded, run.row(0), 0, tokens, segments) - want).max() > 1e-3


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_peft_made_adapter_loads_via_init_from_peft(name, tmp_path):
    config = runlocal_config(model__path=name, prefix__length=P, prefix__positions="after_prefix",
                             prefix__init_from_peft=str(tmp_path / "adapter"))
    loaded = models.load(config.model)
    model = peft_made_adapter(hf_from_ours(loaded), tmp_path / "adapter")
    setup = train.create_train_state(config, loaded)
    kv = setup.model.prefix_kv(partition.merge(setup.state.trainable, setup.frozen))
    want_kv = peft_prompt_kv(model)  # the layout as peft itself reads its tensor
    np.testing.assert_array_equal(np.asarray(kv.k), want_kv.k)
    np.testing.assert_array_equal(np.asarray(kv.v), want_kv.v)

    tokens, segments = padded_batch(loaded.config.vocab_size, seed=1)
    got = ours_logits(loaded, kv, setup.model.options.position_offset, tokens, segments)
    assert_same(got, peft_logits(model, tokens, segments), segments)


def _edited_run(workdir, tmp_path, **prefix_or_data):
    """A copy of `workdir` whose config.json has some prefix/data fields changed."""
    copy = tmp_path / "edited"
    shutil.copytree(workdir, copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in prefix_or_data.items():
        section, field = key.split("__")
        config[section][field] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


EXPORT_REFUSALS = {
    # name -> (workdir(run, tmp), out(tmp), text the one error line must contain)
    "out-not-empty": (lambda w, t: w, lambda t: _nonempty(t), "not empty"),
    # the default on a Llama: 'auto' resolves to 'zero' (found once the model is loaded)
    "positions-auto-on-llama": (lambda w, t: _edited_run(w, t, prefix__positions="auto"),
                                lambda t: t / "out", "positions=after_prefix"),
    "multi-task-without-task": (
        lambda w, t: _edited_run(w, t, data__extra_dirs=str(w)), lambda t: t / "out", "--task"),
    "not-a-run": (lambda w, t: t, lambda t: t / "out", "no config.json"),
}


def _nonempty(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("keep me")
    return tmp / "out"


@pytest.mark.parametrize("trained_run", ["tiny"], indirect=True)
@pytest.mark.parametrize("case", sorted(EXPORT_REFUSALS))
def test_export_refusals(trained_run, tmp_path, case):
    """`python -m prefix_jax.export` mistakes: one `error:` line, exit 2, nothing written."""
    make_workdir, make_out, named = EXPORT_REFUSALS[case]
    workdir, out = make_workdir(trained_run[1], tmp_path), make_out(tmp_path)
    before = sorted(os.listdir(out)) if out.exists() else None
    result = subprocess.run([sys.executable, "-m", "prefix_jax.export", f"--workdir={workdir}",
                             f"--out={out}"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and named in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert (sorted(os.listdir(out)) if out.exists() else None) == before


def _max_error(a, b, segments) -> float:
    return max(float(np.abs(a[r, :n] - b[r, :n]).max())
               for r, n in enumerate((segments > 0).sum(1)))


def assert_as_close_as_transformers(got, model, tokens, segments):
    """`got` (float32) against the PEFT model's logits computed in float64, the exact answer.

    On SmolLM2 (30 layers, large activation outliers) float32 rounding alone moves logits by up
    to ~3e-3 for some random prefixes, in transformers as much as here, so a fixed 1e-3 against
    transformers' float32 logits would test luck. prefix_jax must be within 1e-3 of the exact
    logits, or no further from them than 3x transformers' own float32 error (two samples of the
    same rounding noise; measured ratios up to 1.8). A wrong layout or position convention is
    off by O(1). Leaves `model` in float32.
    """
    want32 = peft_logits(model, tokens, segments)
    model.double()  # the prefix too: peft casts it to the base model's dtype
    want64 = peft_logits(model, tokens, segments)
    model.float()
    floor = _max_error(want32, want64, segments)
    error = _max_error(got, want64, segments)
    print(f"max |logit error| vs float64: prefix_jax {error:.2e}, transformers float32 {floor:.2e}")
    assert error <= max(1e-3, 3 * floor), (error, floor)


@pytest.mark.real_model
def test_smollm2_both_ways(smollm2, tmp_path):
    """The real SmolLM2 (GQA, 30 layers): a prefix_jax adapter in peft, a peft adapter here."""
    config = runlocal_config(model__path="smollm2", prefix__length=P,
                             prefix__positions="after_prefix")
    loaded = smollm2
    cfg = loaded.config
    hf = hf_from_ours(loaded)
    tokens, segments = padded_batch(cfg.vocab_size, lengths=(8, 5))

    rng = np.random.default_rng(0)
    shape = (cfg.n_layers, 1, P, cfg.n_kv_heads, cfg.head_dim)
    ours = KV(rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32))
    peft_format.write_adapter(str(tmp_path / "ours"), ours, cfg, loaded.source)
    exported = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    assert_as_close_as_transformers(ours_logits(loaded, ours, P, tokens, segments), exported,
                                    tokens, segments)
    hf = exported.get_base_model()  # prompt learning leaves the base untouched

    theirs = peft_made_adapter(hf, tmp_path / "theirs")
    config.prefix.init_from_peft = str(tmp_path / "theirs")
    kv = peft_format.load_prefix(config.prefix, cfg)
    assert_as_close_as_transformers(ours_logits(loaded, kv, P, tokens, segments), theirs,
                                    tokens, segments)
