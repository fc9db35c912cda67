"""The model's context bounds what can be decoded: every prompt's positions plus the new tokens'
must fit in `max_seq_len`. Past it, a model with a learned position table (GPT-2) looks up rows
that do not exist (NaN logits, then empty generations, and exit status 0), and a rotary model
runs at positions it was never trained on. So decoding refuses up front, naming the prompt and
the limit, instead of returning silently wrong text."""

from __future__ import annotations

from prefix_jax.errors import UserError


def check_fits(model_config, prompt_lengths: list[int], max_new_tokens: int,
               position_offset: int) -> None:
    """Raises UserError for the longest prompt (1-based index among `prompt_lengths`, in
    tokens) whose positions from `position_offset` plus `max_new_tokens` exceed the model's."""
    limit = model_config.max_seq_len
    room = limit - position_offset - max_new_tokens
    too_long = [(n, i) for i, n in enumerate(prompt_lengths, start=1) if n > room]
    if not too_long:
        return
    n, i = max(too_long)
    table = (" (its learned position table)" if model_config.capabilities.positions == "learned"
             else "")
    start = f" starting at position {position_offset} (after the prefix)" if position_offset \
        else ""
    raise UserError(
        f"input {i} is {n} tokens{start}; with max_new_tokens={max_new_tokens} it needs "
        f"{position_offset + n + max_new_tokens} positions, but the model has {limit}{table}; "
        f"shorten that input (to at most {max(room, 0)} tokens) or lower max_new_tokens")
