"""The GGUF loader equals transformers' own GGUF load of the real SmolLM2-135M."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from prefix_jax import models
from prefix_jax.models.core import causal_mask

pytestmark = pytest.mark.real_model


def test_smollm2_logits_match_transformers_gguf_load(smollm2):
    path = models.smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    text = "name[The Eagle], eatType[coffee shop]\nDescription: The Eagle is a coffee shop."
    ids = smollm2.tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    t = len(ids)
    got, _ = smollm2.module.apply({"params": smollm2.params}, jnp.asarray([ids]),
                                  jnp.arange(t)[None], causal_mask(jnp.ones((1, t), int), 0))
    assert smollm2.config.n_layers == 30 and smollm2.config.n_kv_heads == 3
    np.testing.assert_allclose(np.asarray(got[0]), want, atol=1e-3, rtol=0)
    # The model is the instruct model, not noise: it predicts the text it was given.
    assert (np.argmax(want[:-1], -1) == np.asarray(ids[1:])).mean() > 0.3


def test_gguf_tokenizer_equals_transformers_gguf_tokenizer(smollm2):
    """Our torch-free GGUF tokenizer gives transformers' token ids, special tokens and decoding."""
    path = models.smollm2_gguf_path()
    want = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))
    got = smollm2.tokenizer
    texts = ["name[The Eagle], eatType[coffee shop], priceRange[£20-25]\nDescription:",
             " Café Brazil is 5 out of 5, near  Burger King 2024!<|im_end|>", "  leading spaces"]
    for text in texts:
        assert got(text, add_special_tokens=False).input_ids == \
            want(text, add_special_tokens=False).input_ids
        ids = want(text, add_special_tokens=False).input_ids
        assert got.decode(ids) == want.decode(ids)
    assert (got.eos_token, got.eos_token_id, got.bos_token) == \
        (want.eos_token, want.eos_token_id, want.bos_token)
    assert len(got) == len(want) == smollm2.config.vocab_size
