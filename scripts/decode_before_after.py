r"""Time the E2E test-set decoding of whichever checkout is on PYTHONPATH (before/after a change).

  PYTHONPATH=/path/to/old JAX_PLATFORMS=cpu python scripts/decode_before_after.py 20 5 10
  PYTHONPATH=$PWD         JAX_PLATFORMS=cpu python scripts/decode_before_after.py 20 5 10

Arguments: MRS NUM_BEAMS BATCH [PREFIX_NPZ]. Decodes the first MRS E2E test MRs with
`decoding.generate` (SmolLM2, EOS stops, max 64 new tokens) and prints one JSON line: the wall
time, XLA's temporary memory of one compiled batch, the texts (compare the two checkouts' texts
for equality). The prefix is the untrained "table-to-text:" prefix of 10 slots, or a trained
one saved as arrays `k` and `v` in PREFIX_NPZ (`np.savez(PATH, k=kv.k, v=kv.v)` of
`serving.bank.load([WORKDIR]).row(0)`), so that both checkouts decode the same trained prefix;
real tokens start at position P (the default for decoders). Uses only APIs both sides have.
"""

import json
import sys
import time

import jax.numpy as jnp
import numpy as np

from prefix_jax import configs, models, prefix
from prefix_jax.models.core import KV
from prefix_jax.serving import decoding
from prefix_jax.tasks import e2e


def main(n_mrs: int, beams: int, batch: int, prefix_npz: str | None = None) -> None:
    base = models.load(configs.model_config("smollm2"))
    if prefix_npz:
        arrays = np.load(prefix_npz)
        kv = KV(jnp.asarray(arrays["k"]), jnp.asarray(arrays["v"]))
    else:
        kv = prefix.text_activations(base, "table-to-text:", 10)
    sources, _ = e2e.group_references(e2e.read_pairs(configs.default_data_dir("e2e"), "test"))
    prompts = [e2e.format_source(s) for s in sources[:n_mrs]]
    settings = decoding.settings_for(base.tokenizer, 64, num_beams=beams, length_penalty=1.0,
                                     prefix=prefix.DecodeOptions(position_offset=kv.k.shape[2]))
    ids = base.tokenizer(prompts[:batch], add_special_tokens=False).input_ids
    tokens, valid = decoding.left_pad(ids, settings.pad_id)
    compiled = decoding.decode.lower(base.module, base.params, kv, jnp.asarray(tokens),
                                     jnp.asarray(valid), settings).compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    start = time.perf_counter()
    texts = decoding.generate(base.module, base.params, kv, base.tokenizer, prompts, batch,
                              settings)
    print(json.dumps({"checkout": decoding.__file__, "mrs": n_mrs, "beams": beams,
                      "batch": batch, "seconds": round(time.perf_counter() - start, 1),
                      "temp_mib_one_batch": round(temp_mib, 1), "texts": texts}))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]), *sys.argv[4:5])
