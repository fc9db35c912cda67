"""The Flax Gemma 2 equals transformers' Gemma2ForCausalLM on the same weights: logits without
and with a prefix (given to transformers as a `past_key_values` cache, as PEFT does), and cached
greedy decoding token for token, on a tiny random model whose sliding window (4) every sequence
crosses. Then the loader: sharded and bfloat16 checkpoints, and one refusal per thing it does
not compute exactly."""

import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from prefix_jax import configs, models, prefix
from prefix_jax.errors import UserError
from prefix_jax.models import gemma2, hf_gemma2
from prefix_jax.models.core import KV, causal_mask
from prefix_jax.prefix import DecodeOptions
from prefix_jax.serving import decoding
from prefix_jax.serving.decoding import DecodeSettings
from prefix_jax.training import partition
from tests.helpers import runlocal_config

VOCAB = 259  # the byte tokenizer's
WINDOW = 4
P = 3


def hf_tiny_gemma2(**overrides) -> transformers.Gemma2ForCausalLM:
    """4 layers (sliding, global, sliding, global), head_dim 24 != 64 / 4 heads, GQA, and caps
    small enough that they bend the scores and logits of this tiny model."""
    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                  query_pre_attn_scalar=20, sliding_window=WINDOW, attn_logit_softcapping=2.0,
                  final_logit_softcapping=3.0, max_position_embeddings=128,
                  attn_implementation="eager")
    fields.update(overrides)
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**fields)).eval()
    with torch.no_grad():  # HF starts norms at zero offset; random offsets make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
        model.model.embed_tokens.weight.mul_(3.0)  # logits large enough for the cap to bite
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny model saved as an HF directory (safetensors + the byte tokenizer)."""
    hf = hf_tiny_gemma2()
    path = tmp_path_factory.mktemp("gemma2")
    hf.save_pretrained(path)
    models.byte_tokenizer().save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def pair(saved):
    hf, path = saved
    return hf, models.load(configs.model_config(str(path)))


def _hf_cache(hf, kv: KV | None, batch: int) -> transformers.DynamicCache:
    """Our `[L, 1, P, K, D]` prefix as transformers' per-layer `[B, K, P, D]` cache (with the
    model's config, so its sliding layers are sliding cache layers, as in `generate`)."""
    if kv is None:
        return transformers.DynamicCache(config=hf.config)
    layers = [tuple(torch.from_numpy(np.asarray(x[i]).repeat(batch, 0).transpose(0, 2, 1, 3)
                                     .copy()) for x in kv) for i in range(kv.k.shape[0])]
    return transformers.DynamicCache(layers, config=hf.config)


def random_prefix(cfg, n: int = P, seed: int = 1, scale: float = 1.0) -> KV:
    rng = np.random.default_rng(seed)
    shape = (cfg.n_layers, 1, n, cfg.n_kv_heads, cfg.head_dim)
    return KV(*(jnp.asarray(rng.normal(size=shape) * scale, jnp.float32) for _ in range(2)))


def padded_batch(lengths=(11, 7), seed: int = 0):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = rng.integers(0, VOCAB, size=(len(lengths), t))
    segments = np.array([[1] * n + [0] * (t - n) for n in lengths])
    return tokens, segments


def ours_logits(loaded, kv: KV | None, tokens, segments, offset: int) -> np.ndarray:
    n_prefix = 0 if kv is None else kv.k.shape[2]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]) + offset, tokens.shape)
    logits, _ = loaded.module.apply({"params": loaded.params}, jnp.asarray(tokens), positions,
                                    causal_mask(jnp.asarray(segments), n_prefix), prefix=kv)
    return np.asarray(logits)


def hf_logits(hf, kv: KV | None, tokens, segments) -> np.ndarray:
    n_prefix = 0 if kv is None else kv.k.shape[2]
    attention = np.concatenate([np.ones((len(tokens), n_prefix), int), segments > 0], axis=1)
    with torch.no_grad():
        return hf(torch.tensor(tokens), attention_mask=torch.tensor(attention),
                  cache=_hf_cache(hf, kv, len(tokens))).logits.numpy()


def max_diff_on_real_tokens(got, want, segments) -> float:
    return max(float(np.abs(got[r, :n] - want[r, :n]).max())
               for r, n in enumerate((segments > 0).sum(1)))


def test_loader_reads_the_config_by_transformers(pair):
    _, loaded = pair
    cfg = loaded.config
    assert isinstance(loaded.module, gemma2.Gemma2)
    assert models.loader_for(loaded.source)[0] == "hf gemma2"
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    assert (cfg.head_dim, cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == (24, 64, 4, 2)
    assert (cfg.sliding_window, cfg.query_pre_attn_scalar, cfg.attn_logit_softcap,
            cfg.final_logit_softcap, cfg.tie_embeddings) == (WINDOW, 20.0, 2.0, 3.0, True)
    # Its own sharding table names every matrix.
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(loaded.params)[0]:
        name = partition.path_str(key_path)
        assert any(jax.numpy.ndim(leaf) == len(axes) and re.search(p, name)
                   for p, axes in cfg.logical_axes), name


def test_logits_without_a_prefix_match_transformers(pair):
    hf, loaded = pair
    tokens, segments = padded_batch()
    got = ours_logits(loaded, None, tokens, segments, 0)
    want = hf_logits(hf, None, tokens, segments)
    assert max_diff_on_real_tokens(got, want, segments) <= 1e-4
    assert np.abs(want).max() > 1.5  # the final cap (3.0) is in play, not a linear regime


def test_logits_with_a_prefix_match_transformers(pair):
    """Real tokens at positions P..., the prefix as HF's cache: the prefix falls out of the
    sliding layers' window as transformers drops it."""
    hf, loaded = pair
    tokens, segments = padded_batch(seed=2)
    kv = random_prefix(loaded.config)
    got = ours_logits(loaded, kv, tokens, segments, P)
    want = hf_logits(hf, kv, tokens, segments)
    assert max_diff_on_real_tokens(got, want, segments) <= 1e-4
    plain = ours_logits(loaded, None, tokens, segments, P)
    assert np.abs(plain[0] - want[0]).max() > 1e-2  # the prefix matters


def test_the_window_matters_and_packing_keeps_it(pair):
    """Without the window the logits differ (so the tests above see it); a packed row gives
    each sequence's logits alone, prefix included: distances do not count other segments."""
    _, loaded = pair
    cfg, params = loaded.config, loaded.params
    kv = random_prefix(cfg)
    a, b = padded_batch(lengths=(9,), seed=3)[0][0], padded_batch(lengths=(6,), seed=4)[0][0]

    def run(config, tokens, segments, positions):
        out, _ = gemma2.Gemma2(config).apply(
            {"params": params}, jnp.asarray(tokens)[None], jnp.asarray(positions)[None],
            causal_mask(jnp.asarray(segments)[None], P), prefix=kv)
        return np.asarray(out[0])

    alone_a = run(cfg, a, [1] * 9, np.arange(9) + P)
    alone_b = run(cfg, b, [1] * 6, np.arange(6) + P)
    packed = run(cfg, np.concatenate([a, b, [0]]), [1] * 9 + [2] * 6 + [0],
                 np.concatenate([np.arange(9), np.arange(6), [0]]) + P)
    np.testing.assert_allclose(packed[:9], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[9:15], alone_b, atol=1e-5)
    global_only = dataclasses.replace(cfg, layer_types=("full_attention",) * cfg.n_layers)
    assert np.abs(run(global_only, a, [1] * 9, np.arange(9) + P)[-1] - alone_a[-1]).max() > 1e-3


def hf_greedy(hf, prompt: list[int], kv: KV | None, n_new: int) -> tuple[list[int], float]:
    """transformers' greedy tokens through `forward` with a cache (the prefix in its first
    slots): the prompt once, then one token per call; and their summed log-probabilities."""
    cache = _hf_cache(hf, kv, 1)
    ids, out, score = torch.tensor([prompt]), [], 0.0
    with torch.no_grad():
        for _ in range(n_new):
            logits = hf(ids, cache=cache, use_cache=True).logits[0, -1]
            token = int(logits.argmax())
            score += float(torch.log_softmax(logits.double(), -1)[token])
            out.append(token)
            ids = torch.tensor([[token]])
    return out, score


def greedy_pair(pair, kv: KV | None, offset: int, n_new: int = 8):
    """(ours, transformers') greedy tokens and scores for two prompts of different lengths,
    left-padded into one batch on our side, each alone on theirs."""
    hf, loaded = pair
    prompts = [[17, 200, 31, 44, 5, 9, 120, 66, 3], [120, 7, 66, 250, 1]]
    tokens, valid = decoding.left_pad(prompts, 0)
    ours = decoding.decode(loaded.module, loaded.params, kv, jnp.asarray(tokens),
                           jnp.asarray(valid), DecodeSettings(
                               max_new_tokens=n_new,
                               prefix=DecodeOptions(position_offset=offset)))
    theirs = [hf_greedy(hf, p, kv, n_new) for p in prompts]
    return ours, theirs


@pytest.mark.parametrize("with_prefix", [False, True], ids=["no-prefix", "prefix"])
def test_cached_greedy_decoding_matches_transformers(pair, with_prefix):
    _, loaded = pair
    kv = random_prefix(loaded.config, scale=2.0) if with_prefix else None
    ours, theirs = greedy_pair(pair, kv, P if with_prefix else 0)
    for row, (tokens, score) in enumerate(theirs):
        assert np.asarray(ours.tokens[row]).tolist() == tokens, row
        assert abs(float(ours.scores[row]) - score) <= 1e-4, row


def test_sharded_bfloat16_checkpoint_loads_exactly(saved, tmp_path):
    """Shards listed in model.safetensors.index.json, stored as bfloat16: the logits of
    transformers' model with the same bfloat16-rounded weights (computed in float32)."""
    hf, _ = saved
    hf.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40KB")
    hf.float()
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    models.byte_tokenizer().save_pretrained(tmp_path)
    rounded = transformers.Gemma2ForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    loaded = models.load(configs.model_config(str(tmp_path)))
    tokens, segments = padded_batch()
    got = ours_logits(loaded, None, tokens, segments, 0)
    want = hf_logits(rounded, None, tokens, segments)
    assert max_diff_on_real_tokens(got, want, segments) <= 1e-4


def test_only_kv_prefixes(pair):
    _, loaded = pair
    for mode in ("hidden", "input"):
        config = runlocal_config(prefix__mode=mode, prefix__positions="after_prefix")
        with pytest.raises(UserError, match=rf"prefix.mode='{mode}' is not implemented for "
                                            "Gemma 2"):
            prefix.build(config.prefix, loaded.config)


# ---- refusals: each is one line naming the field or tensor, before anything is built

def _copy(saved, tmp_path):
    _, path = saved
    target = tmp_path / "m"
    shutil.copytree(path, target)
    return target


def _edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


def _refused(path, match: str) -> str:
    with pytest.raises(UserError, match=match) as err:
        models.load(configs.model_config(str(path)))
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("fields,match", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
     "rope_parameters.rope_type='linear'"),
    (dict(hidden_activation="silu"), "hidden_activation='silu'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    (dict(layer_types=["sliding_attention", "chunked_attention"] * 2), "layer_types="),
    (dict(sliding_window=None), "sliding_window=None"),
], ids=["rope-type", "activation", "attention-bias", "bidirectional", "layer-type",
        "no-window"])
def test_config_fields_not_computed_are_refused(saved, tmp_path, fields, match):
    path = _copy(saved, tmp_path)
    _edit_config(path, **fields)
    _refused(path, match)


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.layers.2.pre_feedforward_layernorm.weight"),
     "lack tensor 'model.layers.2.pre_feedforward_layernorm.weight'"),
    (lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(24)}),
     "tensor.*'model.layers.0.self_attn.q_norm.weight'"),
    (lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.ones(95, 64)}),
     r"'model.layers.1.mlp.up_proj.weight' has shape \(95, 64\).*\(96, 64\)"),
    (lambda t: t.update({"lm_head.weight": torch.ones(VOCAB, 64)}),
     "'lm_head.weight' differs from the embedding"),
], ids=["missing", "left-over", "shape", "untied-head"])
def test_tensors_that_do_not_fit_are_refused(saved, tmp_path, edit, match):
    path = _copy(saved, tmp_path)
    _edit_tensors(path, edit)
    _refused(path, match)


def test_weights_in_another_dtype_are_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _edit_tensors(path, lambda t: t.update(
        {"model.norm.weight": t["model.norm.weight"].to(torch.int8)}))
    _refused(path, "tensor 'model.norm.weight' is stored as I8")


def test_an_invalid_config_is_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _edit_config(path, num_hidden_layers="four")
    _refused(path, "config.json .* is not a config this transformers can read: .*num_hidden_layers")


def test_a_missing_shard_is_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(path, "names shard model-00002-of-00002.safetensors, which is not in")


def test_an_untied_head_loads(tmp_path):
    hf = hf_tiny_gemma2(tie_word_embeddings=False, final_logit_softcapping=None,
                        attn_logit_softcapping=None)
    hf.save_pretrained(tmp_path)
    models.byte_tokenizer().save_pretrained(tmp_path)
    loaded = models.load(configs.model_config(str(tmp_path)))
    assert not loaded.config.tie_embeddings and loaded.config.final_logit_softcap is None
    tokens, segments = padded_batch()
    got = ours_logits(loaded, None, tokens, segments, 0)
    assert max_diff_on_real_tokens(got, hf_logits(hf, None, tokens, segments), segments) <= 1e-4


def test_config_from_hf_refuses_another_family():
    with pytest.raises(UserError, match="model_type='llama'"):
        hf_gemma2.config_from_hf(transformers.LlamaConfig())
