"""The Flax Llama equals transformers' LlamaForCausalLM on the same weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from prefix_jax.models import llama
from prefix_jax.models.core import causal_mask
from prefix_jax.models.hf_llama import config_from_hf, params_from_hf


def _hf_tiny(n_kv_heads: int, tie: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, rope_theta=500.0,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # HF initializes norms to one; random scales make the parity check see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _to_flax(model):
    cfg = config_from_hf(model.config.to_dict())
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return cfg, params_from_hf(cfg, state)


@pytest.mark.parametrize("n_kv_heads,tie", [(4, False), (2, True), (1, False)],
                         ids=["mha-untied", "gqa2-tied", "mqa-untied"])
def test_logits_match_transformers(n_kv_heads, tie):
    hf = _hf_tiny(n_kv_heads, tie)
    cfg, params = _to_flax(hf)
    assert cfg.n_kv_heads == n_kv_heads and cfg.tie_embeddings == tie
    _assert_same_logits(hf, cfg, params, seed=0, length=11)


def _assert_same_logits(hf, cfg, params, seed: int, length: int) -> None:
    """Random tokens through the transformers model and the Flax one: logits within 1e-4."""
    tokens = np.random.default_rng(seed).integers(0, 259, size=(2, length))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    positions = jnp.broadcast_to(jnp.arange(length), (2, length))
    mask = causal_mask(jnp.ones((2, length), jnp.int32), 0)
    got, _ = llama.Llama(cfg).apply({"params": params}, jnp.asarray(tokens), positions, mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_padding_and_packing_do_not_leak():
    """A right-padded row and two packed segments give the logits of each sequence alone."""
    hf = _hf_tiny(2, True)
    cfg, params = _to_flax(hf)
    model = llama.Llama(cfg)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 259, size=5), rng.integers(0, 259, size=4)

    def alone(seq):
        t = len(seq)
        out, _ = model.apply({"params": params}, jnp.asarray(seq)[None],
                             jnp.arange(t)[None], causal_mask(jnp.ones((1, t), int), 0))
        return np.asarray(out[0])

    packed = jnp.asarray(np.concatenate([a, b, [0]]))[None]
    segments = jnp.asarray([[1] * 5 + [2] * 4 + [0]])
    positions = jnp.asarray([list(range(5)) + list(range(4)) + [0]])
    out, _ = model.apply({"params": params}, packed, positions, causal_mask(segments, 0))
    np.testing.assert_allclose(np.asarray(out[0, :5]), alone(a), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[0, 5:9]), alone(b), atol=1e-5)


def test_hf_directory_loader(tmp_path):
    """models.load on an HF directory (config.json + safetensors + tokenizer) gives HF's logits."""
    from prefix_jax import configs, models

    hf = _hf_tiny(2, False)
    hf.save_pretrained(tmp_path)  # safetensors
    models.byte_tokenizer().save_pretrained(tmp_path)
    loaded = models.load(configs.model_config(str(tmp_path)))
    assert loaded.config.n_kv_heads == 2 and not loaded.config.tie_embeddings
    ids = loaded.tokenizer("hi there", add_special_tokens=False).input_ids
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits.numpy()
    t = len(ids)
    got, _ = loaded.module.apply({"params": loaded.params}, jnp.asarray([ids]),
                                 jnp.arange(t)[None], causal_mask(jnp.ones((1, t), int), 0))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_flax_params_written_in_hf_layout_give_the_same_model(tie):
    """params_to_hf/config_to_hf (used to hand our weights to transformers and peft) invert the
    loader: a model rebuilt from them in transformers gives the Flax model's logits."""
    from prefix_jax.models.hf_llama import config_to_hf, params_to_hf

    cfg, params = _to_flax(_hf_tiny(2, tie))
    rebuilt = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg))).eval()
    state = {k: torch.from_numpy(v) for k, v in params_to_hf(cfg, params).items()}
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (tie or not missing)
    _assert_same_logits(rebuilt, cfg, params, seed=1, length=9)
