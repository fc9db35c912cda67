"""Llama-family HF checkpoints load by their own config and compute what transformers computes:
Llama 3.x (`llama3` RoPE, tied and untied heads, attention biases), Qwen2 (q/k/v biases), Qwen3
(q/k norms, head_dim independent of d_model), Mistral (sliding window shorter than the sequence,
with a prefix in front). Tiny random models are built and saved here (one sharded save, one in
bf16), loaded through `models.load`, and compared in float32: logits without and with a prefix
(transformers gets it as a past_key_values cache and numbers real tokens from P, as PEFT does),
and cached greedy decoding token for token. Every refusal has a test below."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from prefix_jax import configs, models, prefix
from prefix_jax.errors import UserError
from prefix_jax.models import hf_checkpoint, hf_llama
from prefix_jax.models.core import KV, causal_mask
from prefix_jax.models.llama import Llama
from prefix_jax.serving import decoding
from tests.helpers import runlocal_config

VOCAB = 259  # the byte tokenizer's size
P = 4  # prefix length
T = 13  # sequence length: longer than Mistral's window, so its boundary matters
WINDOW = 6
N_NEW = 8
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               max_position_embeddings=128)
_LLAMA3 = dict(rope_type="llama3", rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0,
               high_freq_factor=4.0, original_max_position_embeddings=64)

# name -> (transformers config, how it is saved)
FAMILIES = {
    "llama3-untied": (lambda: transformers.LlamaConfig(
        **_COMMON, rope_parameters=_LLAMA3, tie_word_embeddings=False), {}),
    "llama3-tied-bias": (lambda: transformers.LlamaConfig(
        **_COMMON, rope_parameters=_LLAMA3, tie_word_embeddings=True, attention_bias=True), {}),
    "qwen2-sharded": (lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True),
                      {"max_shard_size": "40KB"}),
    "qwen3-bf16": (lambda: transformers.Qwen3Config(**_COMMON, head_dim=24,
                                                    tie_word_embeddings=False),
                   {"bf16": True}),
    "mistral-window": (lambda: transformers.MistralConfig(**_COMMON, sliding_window=WINDOW,
                                                          tie_word_embeddings=False), {}),
}


def _randomized(config) -> transformers.PreTrainedModel:
    """A random model whose norms and biases are random too (HF starts them at 1 and 0, which
    a parity check could not tell from a missing weight)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def save_family(name: str, path) -> None:
    """FAMILIES[name] saved to `path` with a tokenizer, as a user's HF directory would be."""
    make_config, how = FAMILIES[name]
    model = _randomized(make_config())
    if how.get("bf16"):
        model = model.to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=how.get("max_shard_size", "5GB"))
    models.byte_tokenizer().save_pretrained(path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers reference loaded from the directory in float32, our LoadedModel)."""
    path = tmp_path_factory.mktemp(request.param)
    save_family(request.param, path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32).eval()
    return request.param, reference, models.load(configs.model_config(str(path)))


def random_prefix(cfg, seed: int = 1) -> KV:
    shape = (cfg.n_layers, 1, P, cfg.n_kv_heads, cfg.head_dim)
    rng = np.random.default_rng(seed)
    return KV(rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32))


def hf_cache(reference, kv: KV, batch: int) -> transformers.DynamicCache:
    """Our `[L, 1, P, K, D]` prefix as transformers' cache (per layer `[B, K, P, D]`), built for
    the model's config (sliding-window layers included), as PEFT hands a prefix over."""
    cache = transformers.DynamicCache(config=reference.config)
    for layer in range(kv.k.shape[0]):
        k, v = (torch.from_numpy(np.ascontiguousarray(
            np.broadcast_to(x[layer], (batch, *x.shape[2:])).transpose(0, 2, 1, 3)))
            for x in kv)
        cache.update(k, v, layer)
    return cache


def tokens_batch(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, size=(2, T))


def ours_logits(loaded, tokens: np.ndarray, kv: KV | None) -> np.ndarray:
    n_prefix = 0 if kv is None else kv.k.shape[2]
    positions = jnp.broadcast_to(jnp.arange(T) + n_prefix, tokens.shape)  # after_prefix
    logits, _ = loaded.module.apply({"params": loaded.params}, jnp.asarray(tokens), positions,
                                    causal_mask(jnp.ones(tokens.shape, jnp.int32), n_prefix),
                                    prefix=kv)
    return np.asarray(logits)


def hf_logits(reference, tokens: np.ndarray, kv: KV | None) -> np.ndarray:
    cache = None if kv is None else hf_cache(reference, kv, len(tokens))
    with torch.no_grad():
        return reference(torch.tensor(tokens), past_key_values=cache).logits.numpy()


def hf_greedy(reference, prompt: np.ndarray, kv: KV, n_new: int) -> list[int]:
    """Greedy decoding through `forward` with the prefix cache (PeftModel.generate ignores prefix
    adapters; this is what it would do)."""
    cache = hf_cache(reference, kv, 1)
    ids = torch.tensor(prompt)[None]
    out = []
    with torch.no_grad():
        for _ in range(n_new):
            result = reference(ids, past_key_values=cache, use_cache=True)
            cache = result.past_key_values
            ids = result.logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(ids[0, 0]))
    return out


def ours_greedy(loaded, prompt: np.ndarray, kv: KV, n_new: int) -> list[int]:
    tokens, valid = decoding.left_pad([prompt.tolist()], pad_id=0)
    settings = decoding.DecodeSettings(max_new_tokens=n_new, pad_id=0,
                                       prefix=prefix.DecodeOptions(position_offset=P))
    out = decoding.decode(loaded.module, loaded.params, kv, jnp.asarray(tokens),
                          jnp.asarray(valid), settings)
    return np.asarray(out.tokens)[0].tolist()


def parity(name: str, reference, loaded) -> dict:
    """The numbers of docs/models.md's parity table for one family."""
    tokens = tokens_batch()
    kv = random_prefix(loaded.config)
    no_prefix = np.abs(ours_logits(loaded, tokens, None) - hf_logits(reference, tokens, None))
    with_prefix = np.abs(ours_logits(loaded, tokens, kv) - hf_logits(reference, tokens, kv))
    ours = ours_greedy(loaded, tokens[0], kv, N_NEW)
    theirs = hf_greedy(reference, tokens[0], kv, N_NEW)
    return {"family": name, "no_prefix": float(no_prefix.max()),
            "prefix": float(with_prefix.max()), "greedy_equal": ours == theirs,
            "ours": ours, "theirs": theirs}


def test_config_is_read_as_the_family(family):
    name, _, loaded = family
    cfg = loaded.config
    expected = {
        "llama3-untied": dict(model_type="llama", tie_embeddings=False, qkv_bias=False),
        "llama3-tied-bias": dict(model_type="llama", tie_embeddings=True, qkv_bias=True,
                                 o_bias=True),
        "qwen2-sharded": dict(model_type="qwen2", qkv_bias=True, o_bias=False),
        "qwen3-bf16": dict(model_type="qwen3", qk_norm=True, head_dim=24, qkv_bias=False),
        "mistral-window": dict(model_type="mistral", sliding_window=WINDOW),
    }[name]
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (cfg.rope_scaling is not None) == name.startswith("llama3")


def test_logits_and_cached_greedy_match_transformers(family):
    name, reference, loaded = family
    result = parity(name, reference, loaded)
    assert result["no_prefix"] <= 1e-4, result
    assert result["prefix"] <= 1e-4, result
    assert result["greedy_equal"], result


def test_sharded_and_bf16_checkpoints_are_read_as_saved(tmp_path):
    save_family("qwen2-sharded", tmp_path / "sharded")
    assert (tmp_path / "sharded" / hf_checkpoint.INDEX_FILE).exists()
    assert len(hf_checkpoint.safetensors_files(str(tmp_path / "sharded"))) > 1
    save_family("qwen3-bf16", tmp_path / "bf16")
    from_disk = hf_checkpoint.read_tensors(str(tmp_path / "bf16"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16",
                                                                  dtype=torch.float32)
    for name, tensor in reference.state_dict().items():
        if name in from_disk:  # exact widening: bf16 -> float32 loses nothing
            assert np.array_equal(from_disk[name], tensor.numpy()), name


def test_the_window_is_exercised_and_packing_keeps_it_per_sequence():
    """Without the window Mistral's logits differ (the test sequence is longer than it), and a
    packed row with a prefix gives each sequence's logits alone: the window counts positions
    within a sequence, the prefix slots at the P positions before its first token."""
    cfg = hf_llama.config_from_hf(FAMILIES["mistral-window"][0]().to_dict())
    params = hf_llama.params_from_hf(cfg, {k: v.numpy() for k, v in _randomized(
        FAMILIES["mistral-window"][0]()).state_dict().items()})
    module = Llama(cfg)
    unwindowed = Llama(dataclasses.replace(cfg, sliding_window=None))
    kv = random_prefix(cfg)
    a, b = np.random.default_rng(2).integers(3, VOCAB, size=T), np.arange(3, 3 + 9)

    def run(m, tokens, segments, positions):
        out, _ = m.apply({"params": params}, jnp.asarray(tokens)[None],
                         jnp.asarray(positions)[None],
                         causal_mask(jnp.asarray(segments)[None], P), prefix=kv)
        return np.asarray(out[0])

    alone_a = run(module, a, np.ones(T, int), np.arange(T) + P)
    alone_b = run(module, b, np.ones(9, int), np.arange(9) + P)
    assert np.abs(alone_a - run(unwindowed, a, np.ones(T, int), np.arange(T) + P)).max() > 1e-3
    packed = np.concatenate([a, b, [0, 0]])
    segments = np.array([1] * T + [2] * 9 + [0, 0])
    positions = np.concatenate([np.arange(T), np.arange(9), [0, 0]]) + P
    out = run(module, packed, segments, positions)
    np.testing.assert_allclose(out[:T], alone_a, atol=1e-5)
    np.testing.assert_allclose(out[T:T + 9], alone_b, atol=1e-5)


# ---- refusals: one line naming the field or tensor, before any training


def _hf_dict(name: str, **changes) -> dict:
    d = FAMILIES[name][0]().to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize("changes,field", [
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)), "rope_type"),
    (dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)), "rope_type"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=1e4)), "rope_type"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4,
                               partial_rotary_factor=0.5)), "partial_rotary_factor"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mlp_bias=True), "mlp_bias"),
], ids=["rope-linear", "rope-dynamic", "rope-yarn", "partial-rotary", "activation", "mlp-bias"])
def test_unsupported_llama_settings_are_refused(changes, field):
    with pytest.raises(UserError, match=field) as err:
        hf_llama.config_from_hf(_hf_dict("llama3-untied", **changes))
    assert "\n" not in str(err.value) and "supported" in str(err.value)


def test_llama3_rope_without_its_fields_is_refused():
    rope = {k: v for k, v in _LLAMA3.items() if k != "low_freq_factor"}
    with pytest.raises(UserError, match="low_freq_factor"):
        hf_llama.config_from_hf(_hf_dict("llama3-untied", rope_parameters=rope))


@pytest.mark.parametrize("name", ["qwen2-sharded", "qwen3-bf16"])
def test_qwen_sliding_window_layers_are_refused(name):
    config = FAMILIES[name][0]()
    hf = transformers.AutoConfig.for_model(**{**config.to_dict(), "use_sliding_window": True,
                                              "sliding_window": 4, "max_window_layers": 1,
                                              "layer_types": None})
    with pytest.raises(UserError, match="use_sliding_window"):
        hf_llama.config_from_hf(hf.to_dict())


def test_another_model_type_is_refused_by_name(tmp_path):
    with pytest.raises(UserError, match="model_type='phi3'"):
        hf_llama.config_from_hf(_hf_dict("llama3-untied", model_type="phi3"))
    # Through the registry: one transformers knows, one it does not, and none at all.
    known = tmp_path / "phi3"
    transformers.AutoConfig.for_model("phi3", **{k: v for k, v in _COMMON.items()}
                                      ).save_pretrained(known)
    with pytest.raises(UserError, match=r"model_type 'phi3'.*supported model types") as err:
        models.loader_for(str(known))
    assert "\n" not in str(err.value)
    for name, config in [("unknown", {"model_type": "no-such-model"}), ("none", {})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        with pytest.raises(UserError, match="model_type") as err:
            models.loader_for(str(tmp_path / name))
        assert "\n" not in str(err.value)


def _tensors(name: str) -> tuple[object, dict]:
    model = _randomized(FAMILIES[name][0]())
    cfg = hf_llama.config_from_hf(model.config.to_dict())
    return cfg, {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_missing_leftover_and_misshapen_tensors_are_refused():
    cfg, tensors = _tensors("qwen2-sharded")
    hf_llama.params_from_hf(cfg, tensors)  # as saved: fine
    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(UserError, match=r"lack tensor 'model.layers.1.self_attn.k_proj.bias'"):
        hf_llama.params_from_hf(cfg, missing)
    extra = {**tensors, "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(UserError, match=r"tensor 'model.layers.0.self_attn.o_proj.bias'.*does "
                                        r"not use"):
        hf_llama.params_from_hf(cfg, extra)
    wrong = {**tensors, "model.layers.0.mlp.up_proj.weight": np.zeros((97, 64), np.float32)}
    with pytest.raises(UserError, match=r"'model.layers.0.mlp.up_proj.weight' has shape "
                                        r"\(97, 64\) but the config.json implies \(96, 64\)"):
        hf_llama.params_from_hf(cfg, wrong)


def test_qwen3_norms_are_required_and_llama_biases_are_leftovers():
    cfg, tensors = _tensors("qwen3-bf16")
    del tensors["model.layers.0.self_attn.q_norm.weight"]
    with pytest.raises(UserError, match="q_norm"):
        hf_llama.params_from_hf(cfg, tensors)
    cfg, tensors = _tensors("llama3-tied-bias")
    plain = hf_llama.config_from_hf(_hf_dict("llama3-tied-bias", attention_bias=False))
    with pytest.raises(UserError, match="does not use"):
        hf_llama.params_from_hf(plain, tensors)


def test_a_tied_head_that_differs_from_the_embedding_is_refused():
    cfg, tensors = _tensors("qwen2-sharded")
    same = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}
    hf_llama.params_from_hf(cfg, same)
    with pytest.raises(UserError, match="tie_word_embeddings"):
        hf_llama.params_from_hf(cfg, {**same, "lm_head.weight": same["lm_head.weight"] + 1})


def test_non_float_and_missing_weight_files_are_refused(tmp_path):
    from safetensors.numpy import save_file

    save_file({"model.embed_tokens.weight": np.zeros((4, 4), np.int8)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="stored as I8"):
        hf_checkpoint.read_tensors(str(tmp_path))
    (tmp_path / hf_checkpoint.INDEX_FILE).write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(UserError, match=r"names shard model-00001-of-00002\.safetensors"):
        hf_checkpoint.read_tensors(str(tmp_path))


def test_hidden_prefix_mode_is_refused_where_it_would_be_inexact():
    """`hidden` projects prefix states through the norm and K/V kernels alone: without the
    biases, q/k norms or scaled RoPE of these variants it would be wrong, so it is refused."""
    for name in ("llama3-untied", "qwen2-sharded", "qwen3-bf16"):
        cfg = hf_llama.config_from_hf(FAMILIES[name][0]().to_dict())
        with pytest.raises(UserError, match=r"prefix\.mode='hidden' is not implemented"):
            prefix.build(runlocal_config(prefix__mode="hidden").prefix, cfg)
    mistral = hf_llama.config_from_hf(FAMILIES["mistral-window"][0]().to_dict())
    assert "hidden" in mistral.capabilities.prefix_modes
