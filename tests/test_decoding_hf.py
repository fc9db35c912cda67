"""Beam search and greedy decoding equal transformers' `generate` on the same tiny Llama weights
(left-padded batch, a stop token that ends some hypotheses, several length penalties)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from prefix_jax.models import llama
from prefix_jax.serving import decoding
from prefix_jax.serving.decoding import DecodeSettings
from tests.test_llama_parity import _hf_tiny, _to_flax

PAD = 1  # not 0: transformers' beam search fills with EOS when pad_token_id is 0 (falsy)
PROMPTS = [[17, 200, 31, 44, 5, 9], [120, 7]]


@pytest.fixture(scope="module")
def models_pair():
    hf = _hf_tiny(2, True)
    cfg, params = _to_flax(hf)
    return hf, llama.Llama(cfg), params


def _hf_generate(hf, max_new, **kwargs):
    t = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[PAD] * (t - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=0,
                          pad_token_id=PAD, do_sample=False, **kwargs)
    out = out[:, t:].numpy()
    return np.pad(out, ((0, 0), (0, max_new - out.shape[1])), constant_values=PAD)


def _ours(module, params, max_new, **kwargs):
    tokens, valid = decoding.left_pad(PROMPTS, PAD)
    out = decoding.decode(module, params, None, jnp.asarray(tokens), jnp.asarray(valid),
                          DecodeSettings(max_new_tokens=max_new, pad_id=PAD, **kwargs))
    return np.asarray(out.tokens)


def test_greedy_and_beam_equal_transformers(models_pair):
    hf, module, params = models_pair
    n = 10
    free = _ours(module, params, n)
    assert (free == _hf_generate(hf, n, eos_token_id=None)).all()
    # A stop token the free-running beams meet, so EOS handling is exercised.
    stop = int(free[0, 4])
    stopped = []
    for lp in (1.0, 0.0, -0.5, 2.0):
        ours = _ours(module, params, n, num_beams=4, length_penalty=lp, stop_ids=(stop,))
        theirs = _hf_generate(hf, n, num_beams=4, length_penalty=lp, eos_token_id=stop,
                              early_stopping="never")
        assert ours.tolist() == theirs.tolist(), f"length_penalty={lp}"
        stopped.append(bool((ours == stop).any()))
    # The stop token won for short-favouring penalties and lost to longer hypotheses otherwise.
    assert stopped == [False, True, True, False]
