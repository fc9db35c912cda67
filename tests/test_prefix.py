"""The kv prefix: length 0 is the base model; the prefix is sized for each layer's KV heads."""

import jax
import jax.numpy as jnp
import numpy as np

from prefix_jax import configs, models, prefix
from prefix_jax.models.core import causal_mask


def _logits(loaded, kv, tokens):
    b, t = tokens.shape
    out, _ = loaded.module.apply({"params": loaded.params}, tokens,
                                 jnp.broadcast_to(jnp.arange(t), (b, t)),
                                 causal_mask(jnp.ones((b, t), int), prefix.length(kv)), prefix=kv)
    return np.asarray(out)


def test_length_zero_prefix_equals_base_model():
    loaded = models.load(configs.model_config("tiny"))
    module = prefix.build(configs.prefix_config(length=0), loaded.config)
    kv = prefix.compute(module, prefix.init(module, jax.random.key(0)),
                        loaded.module, loaded.params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 200, (2, 9)))
    np.testing.assert_array_equal(_logits(loaded, kv, tokens), _logits(loaded, None, tokens))


def test_prefix_shapes_follow_kv_heads():
    for name in ("tiny", "tiny-mha"):
        loaded = models.load(configs.model_config(name))
        cfg = loaded.config
        module = prefix.build(configs.prefix_config(length=7), cfg)
        params = prefix.init(module, jax.random.key(0))
        want = (cfg.n_layers, 7, cfg.n_kv_heads, cfg.head_dim)
        assert params["key"].shape == want and params["value"].shape == want


def test_every_query_sees_the_prefix():
    """Changing one prefix value changes the logits of the first and the last position."""
    loaded = models.load(configs.model_config("tiny"))
    module = prefix.build(configs.prefix_config(length=3), loaded.config)
    kv = prefix.compute(module, prefix.init(module, jax.random.key(0)),
                        loaded.module, loaded.params)
    tokens = jnp.asarray([[4, 8, 15, 16, 23, 42]])
    moved = kv._replace(v=kv.v.at[0, 0, 1].add(5.0))
    diff = np.abs(_logits(loaded, kv, tokens) - _logits(loaded, moved, tokens)).max(axis=-1)[0]
    assert (diff > 1e-4).all(), diff


def test_text_init_prefix_acts_like_the_text_in_context():
    """A prefix initialized from the activations of a text, with real positions starting after
    it, gives exactly the logits of the model reading that text first."""
    loaded = models.load(configs.model_config("tiny"))
    cfg = configs.prefix_config(length=5)
    cfg.init, cfg.init_text = "text", "ab"  # cycled to "ababa"
    module = prefix.build(cfg, loaded.config)
    kv = prefix.compute(module, prefix.init(module, jax.random.key(0), cfg, loaded),
                        loaded.module, loaded.params)
    text = loaded.tokenizer("ababa", add_special_tokens=False).input_ids
    rest = loaded.tokenizer(" then more", add_special_tokens=False).input_ids
    t = len(rest)
    with_prefix, _ = loaded.module.apply(
        {"params": loaded.params}, jnp.asarray([rest]), jnp.arange(5, 5 + t)[None],
        causal_mask(jnp.ones((1, t), int), 5), prefix=kv)
    whole = _logits(loaded, None, jnp.asarray([text + rest]))
    np.testing.assert_allclose(np.asarray(with_prefix[0]), whole[0, 5:], atol=1e-5)
