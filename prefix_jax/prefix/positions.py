"""`prefix.positions`: where real tokens' positions start when a P-slot prefix precedes them.

- `zero`: real tokens at 0, 1, ... as without a prefix.
- `after_prefix`: at P, P+1, ..., as HF/PEFT do (the prefix is a cache of length P). A PEFT
  prefix-tuning adapter reproduces only under this convention, for every base model: prefix keys
  carry no position, but queries do (RoPE rotates them by their absolute position; GPT-2 adds a
  learned position embedding to the input), so shifting real tokens by P changes the output.
- `default` (the default of new configs, since issue 14): `after_prefix` for decoders (Llama
  family, GPT-2) and for prompt tuning (mode `input`: the prompt is real input), so every new
  decoder run exports to PEFT; `zero` for encoders (BERT, whose SST-2 results stay as they were).
- `auto` (the default before issue 14, still what old workdirs' config.json records): as
  `default` except that rotary decoders (Llama family) get `zero`. Its meaning is kept, so old
  runs load, evaluate and decode exactly as they were trained.

A recorded value never changes meaning: a later change of convention gets a new name, as
`default` was added beside `auto` rather than redefining it.
"""

from __future__ import annotations

import ml_collections


def resolve(positions: str, model_config, mode: str = "kv") -> str:
    """'zero' or 'after_prefix' for a `prefix.positions` value, a base model's config and the
    prefix mode (prompt tuning, mode 'input', puts real tokens after the prompt)."""
    if positions not in ("default", "auto"):
        return positions
    caps = model_config.capabilities
    if mode == "input":
        return "after_prefix"
    if positions == "default":
        return "after_prefix" if caps.kind == "decoder" else "zero"
    learned_decoder = caps.kind == "decoder" and caps.positions == "learned"
    return "after_prefix" if learned_decoder else "zero"


def offset(prefix_cfg: ml_collections.ConfigDict, model_config) -> int:
    """The first real token's position: P under 'after_prefix', else 0."""
    where = resolve(prefix_cfg.positions, model_config, prefix_cfg.get("mode", "kv"))
    return prefix_cfg.length if where == "after_prefix" else 0
