"""Reading an HF model directory, shared by every family that loads one (hf_llama, hf_gpt2, ...).

- `read_config(path)`: config.json through `transformers.AutoConfig`, so defaults, renamed fields
  (e.g. `rope_scaling` -> `rope_parameters`) and derived fields (`layer_types`) are exactly the
  ones transformers itself runs with;
- `read_tensors(path)`: every tensor of `model.safetensors`, of the shards a
  `model.safetensors.index.json` names, or of the `*.safetensors` files, as float32 numpy
  (bf16/fp16 on disk are widened exactly; the caller casts to `model.param_dtype`);
- `Tensors`: what a family's converter takes tensors from by name and expected shape; it refuses
  a missing tensor, a shape mismatch and, once the converter is done, any tensor left over (a
  weight the family would silently ignore, e.g. biases of a variant it does not implement).

The safetensors files are read here (an 8-byte header length, a JSON header, raw little-endian
data) rather than through `safetensors.numpy`, which cannot represent bf16.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping

import numpy as np

from prefix_jax.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Buffers some exporters wrote next to the weights; they are recomputed from the config.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _float_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes  # a JAX dependency: numpy's own dtypes have no bfloat16

    return {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
            "BF16": np.dtype(ml_dtypes.bfloat16)}


def read_config(path: str):
    """The directory's config.json as a `transformers.PretrainedConfig` (AutoConfig)."""
    from transformers import AutoConfig

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"model.path={path} has no config.json: give an HF model directory "
                        "(config.json + *.safetensors), a .gguf file, 'smollm2' or 'tiny'")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    if not model_type:
        raise UserError(f"{config_path} has no model_type: save the model with transformers' "
                        "save_pretrained, which writes it")
    from huggingface_hub.errors import StrictDataclassError

    try:
        return AutoConfig.from_pretrained(path)
    # transformers validates fields as strict dataclasses; their error is no ValueError.
    except (StrictDataclassError, ValueError, TypeError, KeyError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{config_path} (model_type={model_type!r}) is not a config this "
                        f"transformers can read: {first_line}") from e


def safetensors_files(path: str) -> list[str]:
    """The weight files of an HF directory: the shards its index names, else
    model.safetensors, else every *.safetensors file."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_path} has no weight_map: re-save the model with "
                            "save_pretrained")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise UserError(f"{index_path} names shard {missing[0]}, which is not in {path}: "
                            "copy every shard of the checkpoint")
        return files
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        return [SINGLE_FILE]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"model.path={path} has no *.safetensors files: convert the checkpoint "
                        "to safetensors (pickled .bin weights are not loaded)")
    return files


def read_safetensors(file_path: str) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as float32 numpy (exact for F16/BF16/F32)."""
    dtypes = _float_dtypes()
    with open(file_path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = np.memmap(file_path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = dtypes.get(info["dtype"])
        if dtype is None:
            raise UserError(f"{file_path}: tensor '{name}' is stored as {info['dtype']}; only "
                            f"floating-point weights ({', '.join(dtypes)}) are loaded (quantized "
                            "checkpoints are not)")
        begin, end = info["data_offsets"]
        raw = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize,
                            offset=begin)
        tensors[name] = raw.reshape(info["shape"]).astype(np.float32)
    return tensors


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every weight of an HF directory (all shards) as float32 numpy, by HF name."""
    tensors: dict[str, np.ndarray] = {}
    for name in safetensors_files(path):
        tensors.update(read_safetensors(os.path.join(path, name)))
    return {k: v for k, v in tensors.items() if not _IGNORED.search(k)}


class Tensors:
    """HF-named tensors handed out to a family's converter, which must take every one.

    `take(name, shape)` returns a float32 array and records the name; `check_all_taken()` then
    refuses the checkpoint if any tensor was not taken (it would be silently ignored)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], family: str):
        self._tensors = tensors
        self._family = family
        self._taken: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def take(self, name: str, shape: Iterable[int]) -> np.ndarray:
        shape = tuple(shape)
        if name not in self._tensors:
            raise UserError(f"model weights lack tensor '{name}' that this {self._family} "
                            "config needs: the checkpoint does not match its config.json")
        tensor = np.asarray(self._tensors[name], dtype=np.float32)
        if tensor.shape != shape:
            raise UserError(f"tensor '{name}' has shape {tensor.shape} but the config.json "
                            f"implies {shape}: the checkpoint does not match its config")
        self._taken.add(name)
        return tensor

    def check_all_taken(self) -> None:
        left = sorted(set(self._tensors) - self._taken)
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise UserError(f"model weights have tensor '{left[0]}'{more} that the "
                            f"{self._family} model does not use: its config.json describes "
                            "another variant, which prefix_jax does not compute")


def read_hf_dir(path: str) -> tuple[object, dict[str, np.ndarray]]:
    """(AutoConfig of the directory, its tensors as float32 numpy by HF name)."""
    return read_config(path), read_tensors(path)
