"""Every prefix variant of the ablations (prefix.py): parameter counts, parity of the modes with
what they claim to be, layer subsets against a layer-by-layer reference, infix masking, eject,
partly trained stacked leaves (fine-tune top layers)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_jax import configs, models, prefix, train
from prefix_jax.models.core import causal_mask, rope_angles
from prefix_jax.models.llama import DecoderLayer
from prefix_jax.prefix import masks
from prefix_jax.tasks import text_to_text
from prefix_jax.tasks.base import Model
from prefix_jax.training import partition
from tests.helpers import runlocal_config, tiny_batch


@pytest.fixture(scope="module")
def tiny():
    return models.load(configs.model_config("tiny"), seed=2)


def _prefix_cfg(**fields):
    cfg = configs.prefix_config(length=fields.pop("length", 3))
    cfg.update(fields)
    return cfg


def _logits(loaded, kv, tokens, offset=0, key_mask=None, embeddings=None):
    b, t = tokens.shape
    n = prefix.length(kv)
    out, _ = loaded.module.apply({"params": loaded.params}, tokens,
                                 jnp.broadcast_to(jnp.arange(t) + offset, (b, t)),
                                 causal_mask(jnp.ones((b, t), int), n), prefix=kv,
                                 key_mask=key_mask, embeddings=embeddings)
    return np.asarray(out)


TOKENS = jnp.asarray([[5, 9, 17, 33, 64, 100, 7], [11, 3, 200, 45, 8, 2, 90]])


@pytest.mark.parametrize("mode,layers,reparam", [
    (m, lay, r) for m, lay, r in itertools.product(("kv", "hidden", "input"),
                                                    ("all", "top:1", "0"), ("none", "mlp"))
    if not (m == "input" and lay != "all")])
def test_parameter_count_formula(tiny, mode, layers, reparam):
    """Trainable count = the formula of each mode/depth/reparameterization (P=3, hidden 8)."""
    cfg = tiny.config
    p, h = 3, 8
    n = cfg.n_layers if layers == "all" else 1
    per_slot = {"kv": n * 2 * cfg.n_kv_heads * cfg.head_dim, "hidden": n * cfg.d_model,
                "input": cfg.d_model}[mode]
    want = p * per_slot if reparam == "none" else \
        p * cfg.d_model + (cfg.d_model * h + h) + (h * per_slot + per_slot)
    config = runlocal_config(prefix__mode=mode, prefix__layers=layers, prefix__reparam=reparam,
                             prefix__mlp_hidden=h, prefix__length=p,
                             prefix__positions="after_prefix")
    setup = train.create_train_state(config, tiny)
    assert partition.count(setup.state.trainable) == want


@pytest.mark.parametrize("mode", ["hidden", "input"])
def test_length_zero_equals_base(tiny, mode):
    cfg = _prefix_cfg(mode=mode, length=0, positions="after_prefix")
    module = prefix.build(cfg, tiny.config)
    kv = prefix.compute(module, prefix.init(module, jax.random.key(0)), tiny.module, tiny.params)
    np.testing.assert_array_equal(_logits(tiny, kv, TOKENS), _logits(tiny, None, TOKENS))


def test_input_mode_is_prompt_tuning(tiny):
    """The prompt's keys/values as a prefix = the model reading [prompt embeddings; tokens]."""
    cfg = _prefix_cfg(mode="input", length=4, positions="after_prefix", init_std=0.5)
    module = prefix.build(cfg, tiny.config)
    params = prefix.init(module, jax.random.key(1))
    kv = prefix.compute(module, params, tiny.module, tiny.params)
    got = _logits(tiny, kv, TOKENS, offset=4)
    table = tiny.params["embed_tokens"]["embedding"]
    prompt = jnp.broadcast_to(params["embeddings"], (2, 4, tiny.config.d_model))
    embeddings = jnp.concatenate([prompt, jnp.asarray(table)[TOKENS]], axis=1)
    whole = _logits(tiny, None, jnp.zeros((2, 11), jnp.int32), embeddings=embeddings)
    np.testing.assert_allclose(got, whole[:, 4:], atol=1e-5)


def test_hidden_mode_text_init_is_the_text_in_context(tiny):
    """Hidden states of real words, projected by each layer's frozen norm and K/V (keys rotated
    at 0..P-1), act exactly like the words read before the input."""
    cfg = _prefix_cfg(mode="hidden", length=5, init="text", init_text="ab",
                      positions="after_prefix")
    module = prefix.build(cfg, tiny.config)
    kv = prefix.compute(module, prefix.init(module, jax.random.key(0), cfg, tiny), tiny.module,
                        tiny.params)
    text = tiny.tokenizer("ababa", add_special_tokens=False).input_ids
    got = _logits(tiny, kv, TOKENS[:1], offset=5)
    whole = _logits(tiny, None, jnp.concatenate([jnp.asarray([text]), TOKENS[:1]], axis=1))
    np.testing.assert_allclose(got, whole[:, 5:], atol=1e-5)


def test_layer_subset_matches_a_layer_by_layer_reference(tiny):
    """`prefix.layers='top:1'`: layer 0 runs without a prefix, layer 1 with it."""
    cfg = _prefix_cfg(layers="top:1", length=3)
    module = prefix.build(cfg, tiny.config)
    params = prefix.init(module, jax.random.key(3))
    assert params["key"].shape[0] == 1
    kv = prefix.compute(module, params, tiny.module, tiny.params)
    opts = prefix.decode_options(cfg, tiny.config)
    got = _logits(tiny, kv, TOKENS, key_mask=masks.key_mask(opts.prefix_layers, 2, 3, 10))

    b, t = TOKENS.shape
    x = jnp.asarray(tiny.params["embed_tokens"]["embedding"])[TOKENS]
    cos, sin = rope_angles(jnp.broadcast_to(jnp.arange(t), (b, t)), tiny.config.head_dim,
                           tiny.config.rope_theta)
    layer = DecoderLayer(tiny.config)
    for i, with_prefix in ((0, False), (1, True)):
        layer_params = jax.tree.map(lambda a, i=i: a[i], tiny.params["layers"])
        layer_kv = (type(kv)(kv.k[i], kv.v[i]) if with_prefix else None)
        mask = causal_mask(jnp.ones((b, t), int), 3 if with_prefix else 0)
        x, _ = layer.apply({"params": layer_params}, x, cos, sin, mask, layer_kv, None, 0, None)
    want = tiny.module.apply({"params": tiny.params}, tiny.module.apply(
        {"params": tiny.params}, x, method=lambda m, h: m.norm(h)), method="logits")
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)


def test_infix_is_unseen_by_the_source(tiny):
    """Infix slots change the logits from the last source token on, never before it."""
    config = runlocal_config(prefix__placement="infix", prefix__length=3)
    setup = train.create_train_state(config, tiny)
    batch = tiny_batch(tiny.tokenizer, n=2)
    params = partition.merge(setup.state.trainable, setup.frozen)
    moved = {**params, "prefix": jax.tree.map(lambda x: x * 3.0 + 1.0, params["prefix"])}
    a = _all_logits(setup.model, params, batch)
    b = _all_logits(setup.model, moved, batch)
    for row, first in enumerate(np.asarray(batch["target_index"][:, 0])):
        np.testing.assert_allclose(a[row, :first], b[row, :first], atol=1e-6)
        assert np.abs(a[row, first:] - b[row, first:]).max(axis=-1).min() > 1e-4


def _all_logits(model, params, batch):
    """Logits at every position through `target_logits`, which reads the infix boundary from
    `target_index[:, 0]`: keep that column, then ask for every position."""
    b, t = batch["tokens"].shape
    index = jnp.concatenate([batch["target_index"][:, :1],
                             jnp.broadcast_to(jnp.arange(t), (b, t))], axis=1)
    logits = text_to_text.target_logits(model, params, dict(batch, target_index=index))
    return np.asarray(logits)[:, 1:]


def test_eject_gives_the_same_logits(tiny):
    config = runlocal_config(prefix__reparam="mlp", prefix__mlp_hidden=16,
                             prefix__mode="hidden", prefix__layers="bottom:1")
    setup = train.create_train_state(config, tiny)
    params = partition.merge(setup.state.trainable, setup.frozen)
    flat_module, flat = prefix.eject(setup.model.prefix, params["prefix"])
    assert partition.count(flat) < partition.count(params["prefix"])
    flat_model = Model(setup.model.base, flat_module, setup.model.options)
    batch = tiny_batch(tiny.tokenizer)
    np.testing.assert_allclose(
        np.asarray(text_to_text.target_logits(flat_model, {**params, "prefix": flat}, batch)),
        np.asarray(text_to_text.target_logits(setup.model, params, batch)), atol=1e-5)


def test_mlp_fitted_to_text_values(tiny):
    """The paper's init of the MLP prefix: fitted to the real-word activations."""
    cfg = _prefix_cfg(reparam="mlp", mlp_hidden=64, init="text", length=4)
    module = prefix.build(cfg, tiny.config)
    fitted = prefix.init(module, jax.random.key(0), cfg, tiny)
    flat_cfg = _prefix_cfg(init="text", length=4)
    target = prefix.init(prefix.build(flat_cfg, tiny.config), jax.random.key(0), flat_cfg, tiny)
    out = module.apply({"params": fitted})
    for name in ("key", "value"):
        err = np.mean((np.asarray(out[name]) - np.asarray(target[name])) ** 2)
        assert err < 0.05 * np.mean(np.asarray(target[name]) ** 2), (name, err)


def test_vocab_init_uses_token_embeddings(tiny):
    cfg = _prefix_cfg(mode="input", init="vocab", length=6, positions="after_prefix")
    params = prefix.init(prefix.build(cfg, tiny.config), jax.random.key(4), cfg, tiny)
    table = np.asarray(tiny.params["embed_tokens"]["embedding"])
    for row in np.asarray(params["embeddings"]):
        assert np.isclose(table, row, atol=1e-6).all(axis=1).any()


def test_finetune_top_layer_leaves_other_layers_bitwise(tiny):
    config = runlocal_config(trainable=r"^base/layers/-1/", prefix__length=0)
    setup = train.create_train_state(config, tiny)
    before = jax.tree.map(lambda x: np.array(x, copy=True), tiny.params)
    n_layer_params = partition.count(tiny.params["layers"])
    assert partition.count(setup.state.trainable, setup.layer_masks) == n_layer_params // 2
    step = jax.jit(functools.partial(train.train_step, model=setup.model, tx=setup.tx,
                                     loss_fn=text_to_text.lm_loss))
    state = setup.state
    batch = tiny_batch(tiny.tokenizer)
    for _ in range(2):
        state, _ = step(state, setup.frozen, batch)
    after = partition.merge(state.trainable, setup.frozen)["base"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(after["layers"])[0]:
        old = before["layers"]
        for key in path:
            old = old[key.key]
        np.testing.assert_array_equal(np.asarray(leaf)[0], old[0])  # bottom layer untouched
        assert not np.array_equal(np.asarray(leaf)[1], old[1]), path  # top layer trained
    jax.tree.map(np.testing.assert_array_equal, after["norm"], before["norm"])


def test_prefix_dropout_trains_and_evaluates_deterministically(tiny):
    config = runlocal_config(prefix__dropout=0.5)
    setup = train.create_train_state(config, tiny)
    params = partition.merge(setup.state.trainable, setup.frozen)
    kv1, kv2 = setup.model.prefix_kv(params), setup.model.prefix_kv(params)
    np.testing.assert_array_equal(kv1.k, kv2.k)
    dropped = setup.model.prefix_kv(params, jax.random.key(0))
    zeros = float(jnp.mean(dropped.k == 0))
    assert 0.3 < zeros < 0.7, zeros
    step = jax.jit(functools.partial(train.train_step, model=setup.model, tx=setup.tx,
                                     loss_fn=text_to_text.lm_loss))
    _, metrics = step(setup.state, setup.frozen, tiny_batch(tiny.tokenizer))
    assert np.isfinite(float(metrics["train/loss"]))


@pytest.mark.parametrize("overrides", [dict(prefix__placement="infix"),
                                       dict(prefix__layers="top:1"),
                                       dict(prefix__mode="input", prefix__init="vocab")],
                         ids=["infix", "top-layer", "prompt"])
def test_cached_greedy_decoding_equals_the_train_path(tiny, overrides):
    """The decoder's masks (infix, per-layer, prompt positions) are the training masks: each
    greedy token is the argmax of the train path's logits on the decoded sequence, and the
    decoder's summed log-probability is the train path's."""
    from prefix_jax.serving import decoding
    from prefix_jax.tasks import e2e

    setup = train.create_train_state(runlocal_config(prefix__length=3, **overrides), tiny)
    params = partition.merge(setup.state.trainable, setup.frozen)
    params = {**params, "prefix": jax.tree.map(lambda x: x * 3.0, params["prefix"])}
    ids = tiny.tokenizer(e2e.format_source("name[Alimentum], area[city centre]"),
                         add_special_tokens=False).input_ids
    settings = decoding.DecodeSettings(max_new_tokens=6, prefix=setup.model.options)
    tokens, valid = decoding.left_pad([ids], 0)
    out = decoding.decode(tiny.module, params["base"], setup.model.prefix_kv(params),
                          jnp.asarray(tokens), jnp.asarray(valid), settings)
    generated = [int(x) for x in np.asarray(out.tokens)[0]]
    seq, n = ids + generated, len(ids)
    batch = {"tokens": jnp.asarray([seq]), "positions": jnp.arange(len(seq))[None],
             "segment_ids": jnp.ones((1, len(seq)), jnp.int32),
             "target_index": jnp.arange(n - 1, len(seq) - 1)[None]}
    logits = np.asarray(text_to_text.target_logits(setup.model, params, batch))[0]
    assert list(logits.argmax(-1)) == generated
    log_probs = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(generated)), generated]
    np.testing.assert_allclose(float(out.scores[0]), float(log_probs.sum()), atol=1e-4)
