"""What the rest of the package may know about a backbone: its `Capabilities` and the small
protocol every model config and module satisfies.

Code outside models/ reads `config.capabilities` instead of asking which class a model is, and
shards parameters by `config.logical_axes`, the backbone's own table.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import jax

from prefix_jax.errors import UserError

KINDS = ("decoder", "encoder")
POSITIONS = ("rotary", "learned")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backbone is and which prefix variants it computes exactly."""

    kind: str  # 'decoder' (causal LM with `logits`) or 'encoder' (bidirectional, a class head)
    positions: str  # 'rotary' (rotated queries/keys) or 'learned' (absolute position embeddings)
    prefix_modes: tuple[str, ...]  # the `prefix.mode`s it implements ('kv', 'hidden', 'input')

    def __post_init__(self):
        if self.kind not in KINDS or self.positions not in POSITIONS:
            raise ValueError(f"kind={self.kind!r} must be one of {KINDS} and "
                             f"positions={self.positions!r} one of {POSITIONS}")

    def require_prefix_mode(self, mode: str, model_name: str) -> None:
        """A one-line UserError when this backbone does not implement prefix mode `mode`."""
        if mode not in self.prefix_modes:
            modes = " or ".join(repr(m) for m in self.prefix_modes)
            raise UserError(f"prefix.mode={mode!r} is not implemented for {model_name} models; "
                            f"use prefix.mode={modes} with this model")


@runtime_checkable
class BackboneConfig(Protocol):
    """The fields every backbone's config exposes (a prefix is sized from them)."""

    capabilities: Capabilities
    logical_axes: tuple[tuple[str, tuple], ...]  # (param path regex, dimension names)
    name: str  # the family, for messages ('Llama', 'GPT-2', 'BERT')
    vocab_size: int
    d_model: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: str


class Backbone(Protocol):
    """A Flax module called as `module(tokens, positions, mask, prefix=KV|None, key_mask=...)`;
    decoders also take `cache`, `cache_index`, `return_hidden` and have `logits(hidden)`."""

    config: BackboneConfig
    remat: str

    def __call__(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array,
                 **kwargs): ...
