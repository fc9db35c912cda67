"""The Flax GPT-2 equals transformers' GPT2LMHeadModel on the same random weights, loaded through
`models.load` from a `save_pretrained` directory: padded batches, a KV prefix fed to transformers
as `past_key_values` (real tokens at positions P..., as HF does), and cached greedy decoding."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from prefix_jax import configs, models
from prefix_jax.models import gpt2
from prefix_jax.models.core import KV, causal_mask
from prefix_jax.prefix import DecodeOptions
from prefix_jax.serving import decoding
from prefix_jax.serving.decoding import DecodeSettings

VOCAB = 259  # the byte tokenizer's size


def hf_tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_inner=96,
                                  n_positions=64, layer_norm_epsilon=1e-5)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # HF initializes LayerNorms to (1, 0), biases to 0 and weights with std 0.02 (a near-constant
    # next-token choice); random values of a larger scale make every check see every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif ".ln_" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3 if "wte" in name or "wpe" in name else 0.1)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_tiny_gpt2()
    path = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(path)
    models.byte_tokenizer().save_pretrained(path)
    loaded = models.load(configs.model_config(str(path)))
    return hf, loaded


def _padded_batch():
    rng = np.random.default_rng(0)
    lengths = [11, 7]
    tokens = rng.integers(0, VOCAB, size=(2, max(lengths)))
    segments = np.array([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    return tokens, segments, lengths


def _hf_cache(prefix: KV):
    """Our `[L, 1, P, H, D]` prefix as transformers' per-layer `[1, H, P, D]` cache."""
    layers = [(torch.from_numpy(np.asarray(prefix.k[i]).transpose(0, 2, 1, 3).copy()),
               torch.from_numpy(np.asarray(prefix.v[i]).transpose(0, 2, 1, 3).copy()))
              for i in range(prefix.k.shape[0])]
    return transformers.DynamicCache(layers)


def test_loader_gives_gpt2(pair):
    _, loaded = pair
    assert isinstance(loaded.module, gpt2.GPT2)
    cfg = loaded.config
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (3, 4, 4, 16, 96)


@pytest.mark.parametrize("n_prefix", [0, 5], ids=["no-prefix", "prefix"])
def test_logits_match_transformers_padded(pair, n_prefix):
    """Right-padded batch; with a prefix, HF gets it as a cache and numbers real tokens from P."""
    hf, loaded = pair
    cfg = loaded.config
    tokens, segments, lengths = _padded_batch()
    t = tokens.shape[1]
    prefix = None
    kwargs = {}
    if n_prefix:
        rng = np.random.default_rng(1)
        shape = (cfg.n_layers, 1, n_prefix, cfg.n_heads, cfg.head_dim)
        prefix = KV(jnp.asarray(rng.normal(size=shape), jnp.float32),
                    jnp.asarray(rng.normal(size=shape), jnp.float32))
        kwargs["past_key_values"] = _hf_cache(KV(prefix.k.repeat(2, 1), prefix.v.repeat(2, 1)))
    attention = np.concatenate([np.ones((2, n_prefix), int), segments > 0], axis=1)
    with torch.no_grad():
        want = hf(torch.tensor(tokens), attention_mask=torch.tensor(attention),
                  **kwargs).logits.numpy()
    positions = jnp.broadcast_to(jnp.arange(t) + n_prefix, (2, t))
    got, _ = loaded.module.apply({"params": loaded.params}, jnp.asarray(tokens), positions,
                                 causal_mask(jnp.asarray(segments), n_prefix), prefix=prefix)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(got[row, :n]), want[row, :n], atol=1e-4, rtol=0)
    if n_prefix:  # the prefix matters: without it the logits differ
        plain, _ = loaded.module.apply({"params": loaded.params}, jnp.asarray(tokens), positions,
                                       causal_mask(jnp.asarray(segments), 0))
        assert np.abs(np.asarray(plain[0]) - want[0]).max() > 1e-2


def test_cached_greedy_decoding_matches_transformers(pair):
    """decoding.decode (left-padded batch, KV cache) gives HF's greedy tokens: without a prefix
    against `generate`, with one (positions after P) against a greedy loop over `forward`."""
    hf, loaded = pair
    cfg = loaded.config
    prompts = [[17, 200, 31, 44, 5, 9], [120, 7, 66]]
    n_new = 6
    rng = np.random.default_rng(2)
    shape = (cfg.n_layers, 1, 4, cfg.n_heads, cfg.head_dim)
    prefix = KV(jnp.asarray(rng.normal(size=shape) * 3, jnp.float32),
                jnp.asarray(rng.normal(size=shape) * 3, jnp.float32))
    tokens, valid = decoding.left_pad(prompts, 0)
    for kv, offset in ((None, 0), (prefix, 4)):
        ours = decoding.decode(loaded.module, loaded.params, kv, jnp.asarray(tokens),
                               jnp.asarray(valid), DecodeSettings(
                                   max_new_tokens=n_new,
                                   prefix=DecodeOptions(position_offset=offset)))
        for row, p in enumerate(prompts):
            ids = torch.tensor([p])
            with torch.no_grad():
                if kv is None:
                    want = hf.generate(ids, max_new_tokens=n_new, do_sample=False,
                                       pad_token_id=0)[0, len(p):].tolist()
                else:
                    for _ in range(n_new):
                        logits = hf(ids, past_key_values=_hf_cache(kv)).logits[:, -1]
                        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
                    want = ids[0, len(p):].tolist()
            assert np.asarray(ours.tokens[row]).tolist() == want, (row, offset)
