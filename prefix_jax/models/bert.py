"""A BERT encoder (learned absolute positions, token types, post-LayerNorm, GELU, biases) whose
attention takes the same per-layer prefix of keys and values as the Llama decoder, and a
sequence-classification head.

Layers are stacked with `nn.scan` (a leading `layers` axis on every per-layer parameter), so a
prefix is one `KV([L, B|1, P, n_heads, head_dim])`, exactly what `prefix.build` makes for a
Llama: the config exposes the same sizing fields (`n_kv_heads` = `n_heads`).

The encoder is bidirectional: every real token sees every prefix slot and every real token of
its row; padding keys are masked (`bidirectional_mask`). The prefix enters only as keys and
values (P-tuning v2 / PEFT on BERT), so it has no position embedding and real tokens keep their
positions 0.. unless the caller offsets them (`prefix.positions='after_prefix'`, as HF BERT does
with a cache).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from prefix_jax.models.backbone import Capabilities
from prefix_jax.models.core import (
    KV,
    REMAT_POLICIES,
    attend,
    bidirectional_mask,
    prepend_prefix,
    with_layer_keys,
)

POOLINGS = ("cls", "mean")


# Logical names of every parameter's dimensions, by path regex (see sharding.regex_axes).
LOGICAL_AXES = (
    (r"(^|/)word/embedding$", ("vocab", "embed")),
    (r"(^|/)(position|token_type)/embedding$", (None, "embed")),
    (r"layers/(query|key|value)/kernel$", ("layers", "embed", "heads")),
    (r"layers/(query|key|value)/bias$", ("layers", "heads")),
    (r"layers/attention_out/kernel$", ("layers", "heads", "embed")),
    (r"layers/intermediate/kernel$", ("layers", "embed", "mlp")),
    (r"layers/intermediate/bias$", ("layers", "mlp")),
    (r"layers/output/kernel$", ("layers", "mlp", "embed")),
    (r"layers/(attention_out|output)/bias$", ("layers", "embed")),
    (r"layers/(attention_norm|output_norm)/(scale|bias)$", ("layers", "embed")),
    (r"(^|/)embed_norm/(scale|bias)$", ("embed",)),
    (r"(^|/)classifier/kernel$", ("embed", None)),
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int = 512  # learned position embeddings
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    num_labels: int = 2  # classification head outputs
    pooling: str = "mean"  # 'cls' (first token) or 'mean' (over real tokens) before the head
    classifier_dropout: float = 0.1  # on the pooled vector, in training steps only
    dtype: str = "float32"  # compute dtype of activations; parameters keep their own

    name: ClassVar[str] = "BERT"
    capabilities: ClassVar[Capabilities] = Capabilities(
        kind="encoder", positions="learned", prefix_modes=("kv",))
    logical_axes: ClassVar[tuple] = LOGICAL_AXES

    @property
    def n_kv_heads(self) -> int:  # every head has its own K/V: what prefix.build sizes
        return self.n_heads

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}")


def _dense(features: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02))


class EncoderLayer(nn.Module):
    """One post-norm block. Scanned over layers: (x, per-layer prefix) -> (x, None)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, prefix: KV | None, key_mask: jax.Array | None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, t, _ = x.shape
        mask = with_layer_keys(mask, key_mask)
        heads = (b, t, cfg.n_heads, cfg.head_dim)
        q = _dense(cfg.n_heads * cfg.head_dim, "query", dtype)(x).reshape(heads)
        k = _dense(cfg.n_heads * cfg.head_dim, "key", dtype)(x).reshape(heads)
        v = _dense(cfg.n_heads * cfg.head_dim, "value", dtype)(x).reshape(heads)
        k, v = prepend_prefix(prefix, k, v)
        attn = _dense(cfg.d_model, "attention_out", dtype)(attend(q, k, v, mask))
        x = nn.LayerNorm(cfg.ln_eps, dtype=dtype, name="attention_norm")(x + attn)
        h = nn.gelu(_dense(cfg.d_ff, "intermediate", dtype)(x), approximate=False)
        h = _dense(cfg.d_model, "output", dtype)(h)
        x = nn.LayerNorm(cfg.ln_eps, dtype=dtype, name="output_norm")(x + h)
        return x, None


class Bert(nn.Module):
    """Encoder + classification head. `__call__` gives the last hidden states `[B, T, d]`;
    `classify` pools them and applies the head (the only parameters a fresh checkpoint lacks)."""

    config: BertConfig
    remat: str = "none"

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        layer = EncoderLayer
        if self.remat != "none":
            layer = nn.remat(EncoderLayer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        init = nn.initializers.normal(0.02)
        self.word = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init)
        self.position = nn.Embed(cfg.max_seq_len, cfg.d_model, embedding_init=init)
        self.token_type = nn.Embed(cfg.type_vocab_size, cfg.d_model, embedding_init=init)
        self.embed_norm = nn.LayerNorm(cfg.ln_eps, dtype=dtype)
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, 0, 0),
            length=cfg.n_layers,
        )(cfg)
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.classifier = nn.Dense(cfg.num_labels, dtype=dtype, kernel_init=init)

    def __call__(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array,
                 prefix: KV | None = None, token_types: jax.Array | None = None,
                 key_mask: jax.Array | None = None) -> jax.Array:
        """tokens, positions `[B, T]`; mask `[B, T, P + T]`; `key_mask` `[L, P + T]` per-layer
        key-slot mask (prefix layer subsets); the last hidden states `[B, T, d]`."""
        cfg = self.config
        b, t = tokens.shape
        n_prefix = 0 if prefix is None else prefix.k.shape[2]
        chex.assert_shape(positions, (b, t))
        chex.assert_shape(mask, (b, t, n_prefix + t))
        if prefix is not None:
            chex.assert_shape([prefix.k, prefix.v],
                              (cfg.n_layers, None, None, cfg.n_heads, cfg.head_dim))
        if token_types is None:
            token_types = jnp.zeros_like(tokens)
        x = self.word(tokens) + self.position(positions) + self.token_type(token_types)
        x = self.embed_norm(x.astype(jnp.dtype(cfg.dtype)))
        x, _ = self.layers(x, mask, prefix, key_mask)
        return x

    def classify(self, hidden: jax.Array, segment_ids: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """Logits `[B, num_labels]` from hidden states `[B, T, d]`, pooled over real tokens
        (`segment_ids` > 0; CLS pooling reads position 0). Dropout needs a 'dropout' rng."""
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            real = (segment_ids > 0).astype(hidden.dtype)[..., None]
            pooled = (hidden * real).sum(1) / jnp.maximum(real.sum(1), 1.0)
        pooled = self.dropout(pooled, deterministic=deterministic)
        return self.classifier(pooled).astype(jnp.float32)


def init_params(module: Bert, rng: jax.Array) -> dict:
    """Random params for `module`, the classifier included."""
    tokens = jnp.zeros((1, 1), jnp.int32)

    def both(m, tokens):
        seg = jnp.ones_like(tokens)
        return m.classify(m(tokens, tokens, bidirectional_mask(seg, 0)), seg)

    return module.init(rng, tokens, method=both)["params"]
