r"""Memory of the prefix train step under the memory options, from XLA's own accounting.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m prefix_jax.bench.memory [--model=smollm2] [--batch_size=8] [--seq_lens=128,512]

Prints, for the real base model: bytes of the frozen base per device on an fsdp=8 mesh vs a
data=8 mesh (needs 8 devices, e.g. the XLA flag above), and for one device the compiled step's
temporary memory with remat none/full/dots at each sequence length, and the base's bytes, the
loss of one batch and the greedy tokens of E2E dev prompts (untuned) with a float32, bfloat16
and int8 base (`--parts` picks sections). Compile-time numbers: no timing.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from prefix_jax import bench, cli

FLAGS = cli.flag_values()
_MODEL = flags.DEFINE_string("model", "smollm2", "model.path.", flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows of the measured batch.",
                                   flag_values=FLAGS)
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["128", "512"], "Sequence lengths, one row each.",
                              flag_values=FLAGS)
_PARTS = flags.DEFINE_list("parts", ["mesh", "remat", "dtypes"], "Sections to print: mesh "
                           "(needs 8 devices), remat, dtypes.", flag_values=FLAGS)
_GREEDY_ROWS = flags.DEFINE_integer("greedy_rows", 8, "E2E dev prompts decoded greedily per "
                                    "base dtype.", flag_values=FLAGS)
_GREEDY_TOKENS = flags.DEFINE_integer("greedy_tokens", 32, "Tokens generated per prompt.",
                                      flag_values=FLAGS)
_CONFIG = flags.DEFINE_string("config", bench.MAIN_EXPERIMENT, "The experiment FILE[:ARG] "
                              "whose train step is measured.", flag_values=FLAGS)


def _config(model: str, **fields):
    config = bench.experiment_config(_CONFIG.value, model)
    config.prefix.init = "random"
    config.prefix.init_std = 0.02
    for dotted, value in fields.items():
        section, name = dotted.split("__")
        config[section][name] = value
    return config


def _greedy(loaded, prompts: list[str]):
    """Greedy continuations `[B, greedy_tokens]` of `prompts` by the untuned base."""
    import jax.numpy as jnp
    import numpy as np

    from prefix_jax import models
    from prefix_jax.serving import decoding

    ids = loaded.tokenizer(prompts, add_special_tokens=False).input_ids
    tokens, valid = decoding.left_pad(ids, models.pad_id(loaded.tokenizer))
    settings = decoding.settings_for(loaded.tokenizer, _GREEDY_TOKENS.value)
    out = decoding.decode(loaded.module, loaded.params, None, jnp.asarray(tokens),
                          jnp.asarray(valid), settings)
    return np.asarray(out.tokens)


def _temp_bytes(setup, batch) -> int:
    import jax

    from prefix_jax.tasks import text_to_text

    fn = jax.jit(jax.value_and_grad(text_to_text.lm_loss), static_argnums=(3,))
    lowered = fn.lower(setup.state.trainable, setup.frozen, batch, setup.model)
    return lowered.compile().memory_analysis().temp_size_in_bytes


def main() -> None:
    try:
        seq_lens = [int(s) for s in _SEQ_LENS.value]
    except ValueError:
        cli.fail(f"--seq_lens={','.join(_SEQ_LENS.value)} must be integers, e.g. 128,512")
    import jax
    import jax.numpy as jnp

    from prefix_jax import models, train
    from prefix_jax.tasks import text_to_text
    from prefix_jax.training import sharding

    mib = 2**20

    if "mesh" in _PARTS.value and jax.device_count() >= 8:
        print("frozen base per device (MiB):")
        for mesh_fields in ({"mesh__data": 8}, {"mesh__data": 1, "mesh__fsdp": 8}):
            config = _config(_MODEL.value, **mesh_fields)
            mesh = sharding.make_mesh(config.mesh)
            loaded = train.place_base(models.load(config.model), mesh,
                                      sharding.parse_rules(config.mesh.rules))
            held = sharding.bytes_per_device(loaded.params)
            total = sum(x.nbytes for x in jax.tree.leaves(loaded.params))
            print(f"  mesh {dict(mesh.shape)}: max {max(held.values()) / mib:.1f} of "
                  f"{total / mib:.1f} ({max(held.values()) / total:.3f})")

    if "remat" in _PARTS.value:
        print(f"temporary memory of one prefix step, batch {_BATCH_SIZE.value} (MiB):")
        loaded = models.load(_config(_MODEL.value).model)  # loaded once; options applied below
        for seq in seq_lens:
            batch = bench.random_lm_batch(len(loaded.tokenizer), _BATCH_SIZE.value, seq)
            row = []
            for remat in ("none", "full", "dots"):
                config = _config(_MODEL.value, model__remat=remat)
                with_remat = dataclasses.replace(loaded, module=loaded.module.clone(remat=remat))
                setup = train.create_train_state(config, with_remat)
                row.append(f"{remat} {_temp_bytes(setup, batch) / mib:.0f}")
            print(f"  seq {seq}: " + ", ".join(row))

    if "dtypes" not in _PARTS.value:
        return
    from prefix_jax import configs
    from prefix_jax.tasks import e2e

    print(f"float32 vs bfloat16 vs int8 base (loss of one batch; greedy tokens of "
          f"{_GREEDY_ROWS.value} E2E dev prompts x {_GREEDY_TOKENS.value}, untuned):")
    pairs = e2e.read_pairs(configs.default_data_dir("e2e"), "dev")[:_GREEDY_ROWS.value]
    prompts = [text_to_text.format_source(p.source) for p in pairs]
    reference = None
    for dtype in ("float32", "bfloat16", "int8"):
        config = _config(_MODEL.value, model__param_dtype=dtype)
        base_model = models.load(config.model)  # int8: quantized by the loader
        batch = bench.random_lm_batch(len(base_model.tokenizer), _BATCH_SIZE.value, 128)
        setup = train.create_train_state(config, base_model)
        base = sum(x.nbytes for x in jax.tree.leaves(setup.frozen))
        loss = text_to_text.lm_loss(setup.state.trainable, setup.frozen,
                                    jax.tree.map(jnp.asarray, batch), setup.model)
        kinds = sorted({str(x.dtype) for x in jax.tree.leaves(setup.state)})
        greedy = _greedy(base_model, prompts)
        if reference is None:
            reference = greedy
        same = (greedy == reference)
        print(f"  {dtype}: base {base / mib:.0f} MiB, train state dtypes {kinds}, "
              f"loss {float(loss):.4f}, greedy tokens equal to float32's: "
              f"{same.mean():.3f} ({int(same.all(axis=1).sum())}/{len(prompts)} rows identical)",
              flush=True)


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
