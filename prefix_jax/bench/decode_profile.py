r"""Where the time of one decoding batch goes, op by op (XLA's own per-op profile).

  python -m prefix_jax.bench.decode_profile --workdir=RUN [--num_beams=5] [--batch_size=10]

Decodes one batch of E2E test prompts (the first `--batch_size` MRs, EOS stops, at most
`--max_new_tokens` new tokens) with SmolLM2 and the prefix of `--workdir` (a trained run; without
it the untrained 10-slot "table-to-text:" prefix), with the run's decode options and
`evaluate --split=test`'s defaults (beam 5, batches of 10, length penalty 1; one batch of the
first MRs rather than length-sorted batches): compiled once, then `--calls` calls traced with
`jax.profiler`. Each op is classified as in
prefix_jax.bench.step_profile (matmul, softmax/reduce, gather/scatter/slice, layout,
elementwise); the ops inside the decoding loop run once per generated token, so their totals
are the per-token costs summed over the batch's steps.
"""

from __future__ import annotations

import tempfile
import time

from absl import flags

from prefix_jax import cli
from prefix_jax.bench import step_profile

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run whose prefix decodes.",
                               flag_values=FLAGS)
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 5, "Beams (1 = greedy).", flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 10, "Prompts in the batch.", flag_values=FLAGS)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "New tokens at most.",
                                       flag_values=FLAGS)
_CALLS = flags.DEFINE_integer("calls", 1, "Traced calls.", flag_values=FLAGS)
_TOP = flags.DEFINE_integer("top", 15, "How many of the slowest ops to list.", flag_values=FLAGS)


def main() -> None:
    if min(_NUM_BEAMS.value, _BATCH_SIZE.value, _MAX_NEW_TOKENS.value, _CALLS.value,
           _TOP.value) < 1:
        cli.fail("--num_beams, --batch_size, --max_new_tokens, --calls and --top must be >= 1")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from prefix_jax import configs, models, prefix
    from prefix_jax.serving import bank, decoding
    from prefix_jax.tasks import e2e

    base = models.load(configs.model_config("smollm2"))
    if _WORKDIR.value:
        run = bank.load([_WORKDIR.value])
        kv, options = run.row(0), run.options
    else:
        kv = prefix.text_activations(base, "table-to-text:", 10)
        options = prefix.DecodeOptions(position_offset=kv.k.shape[2])
    sources, _ = e2e.group_references(e2e.read_pairs(configs.default_data_dir("e2e"), "test"))
    prompts = [e2e.format_source(s) for s in sources[:_BATCH_SIZE.value]]
    settings = decoding.settings_for(base.tokenizer, _MAX_NEW_TOKENS.value,
                                     num_beams=_NUM_BEAMS.value, length_penalty=1.0,
                                     prefix=options)
    ids = base.tokenizer(prompts, add_special_tokens=False).input_ids
    tokens, valid = decoding.left_pad(ids, settings.pad_id)
    args = (base.module, base.params, kv, jnp.asarray(tokens), jnp.asarray(valid), settings)
    hlo = decoding.decode.lower(*args).compile().as_text()
    out = jax.block_until_ready(decoding.decode(*args))
    generated = np.asarray(out.tokens)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        for _ in range(_CALLS.value):
            jax.block_until_ready(decoding.decode(*args))
        wall = (time.perf_counter() - start) / _CALLS.value
        jax.profiler.stop_trace()
        bodies = step_profile.op_bodies(hlo)
        durations = step_profile.trace_durations(trace_dir, set(bodies))
    lengths = (generated != settings.pad_id).sum(axis=-1)
    print(f"batch of {len(prompts)} prompts x {_NUM_BEAMS.value} beams, prompt width "
          f"{tokens.shape[1]}, prefix {kv.k.shape[2]} slots; output lengths (tokens) "
          f"min {lengths.min()} max {lengths.max()}")
    step_profile.print_profile(bodies, durations, _CALLS.value, wall, "batch", _TOP.value)


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
