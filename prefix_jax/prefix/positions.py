"""`prefix.positions`: where real tokens' positions start when a P-slot prefix precedes them.

- `zero`: real tokens at 0, 1, ... as without a prefix.
- `after_prefix`: at P, P+1, ..., as HF/PEFT do (the prefix is a cache of length P). A PEFT
  prefix-tuning adapter reproduces only under this convention, for every base model: prefix keys
  carry no position, but queries do (RoPE rotates them by their absolute position; GPT-2 adds a
  learned position embedding to the input), so shifting real tokens by P changes the output.
- `auto` (default): `after_prefix` for decoders with learned absolute positions (GPT-2), where
  PEFT adapters should load unchanged, and for prompt tuning (mode `input`: the prompt is real
  input); `zero` otherwise (RoPE models and encoders, this project's original convention, kept
  so earlier runs and results stay as they were).
"""

from __future__ import annotations

import ml_collections


def resolve(positions: str, model_config, mode: str = "kv") -> str:
    """'zero' or 'after_prefix' for a `prefix.positions` value, a base model's config and the
    prefix mode (prompt tuning, mode 'input', puts real tokens after the prompt)."""
    if positions == "auto":
        caps = model_config.capabilities
        learned_decoder = caps.kind == "decoder" and caps.positions == "learned"
        return "after_prefix" if learned_decoder or mode == "input" else "zero"
    return positions


def offset(prefix_cfg: ml_collections.ConfigDict, model_config) -> int:
    """The first real token's position: P under 'after_prefix', else 0."""
    where = resolve(prefix_cfg.positions, model_config, prefix_cfg.get("mode", "kv"))
    return prefix_cfg.length if where == "after_prefix" else 0
