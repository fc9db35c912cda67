"""Pins a finding about the reference tools, so it is re-checked when versions move: with peft
0.21.2 and transformers 5.x, `PeftModel.generate` silently ignores a prefix-tuning adapter.

A large random prefix changes `forward`'s logits and the tokens of a greedy loop over `forward`,
but `generate` returns the base model's tokens. This is why prefix_jax.bench.decode and the
parity tests decode through `forward` with a prefix-filled cache, never through
`PeftModel.generate` (docs/decoding.md).

If this test fails, peft or transformers changed: check whether `generate` now honours the
prefix, and if so update docs/decoding.md and README.md (the finding) and this test.
"""

import peft
import torch
import transformers

from tests.test_llama_parity import _hf_tiny

PROMPT = [[17, 200, 31, 44, 5, 9]]
NEW_TOKENS = 8


def _greedy_through_forward(model, ids):
    """Greedy decoding by recomputing the whole sequence with `forward` each step."""
    ids = torch.tensor(ids)
    for _ in range(NEW_TOKENS):
        next_token = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    return ids[:, -NEW_TOKENS:].tolist()


def test_peft_generate_ignores_a_prefix_tuning_adapter():
    base = _hf_tiny(2, True)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        base_logits = base(ids).logits[0, -1]
        base_tokens = _greedy_through_forward(base, PROMPT)
        base_generated = base.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                       pad_token_id=0)[:, -NEW_TOKENS:].tolist()
    assert base_generated == base_tokens  # generate and the forward loop agree without a prefix

    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                              num_virtual_tokens=5))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "prompt_encoder" in name:
                param.normal_(0.0, 8.0)
        prefix_logits = model(input_ids=ids).logits[0, -1]
        prefix_tokens = _greedy_through_forward(model, PROMPT)
        generated = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=0)[:, -NEW_TOKENS:].tolist()

    assert (prefix_logits - base_logits).abs().max() > 0.1  # forward sees the prefix
    assert prefix_tokens != base_tokens  # and so does a decoding loop over forward
    assert generated == base_tokens, (  # but generate decodes as if there were no prefix
        f"PeftModel.generate now differs from the base model (peft {peft.__version__}, "
        f"transformers {transformers.__version__}): re-check the finding and update the docs")
