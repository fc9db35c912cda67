r"""Compiled memory plans of the prefix train step at real model sizes, without the weights.

  JAX_PLATFORMS=cpu python -m prefix_jax.bench.plan --model=llama-3.1-8b --devices=64 \
      --seq_lens=512,2048 --remats=none,full

Builds the real train step (train.train_step: the prefix, the optimizer, the task loss, the
shardings of `config.mesh.rules`) for a public Llama-family shape (models/llama_shapes.py, or
`tiny`) from `jax.ShapeDtypeStruct`s only, lowers and compiles it for a mesh of `--devices`
simulated CPU devices (data=1 x fsdp x tensor), and prints per device, from XLA's own
accounting (`compiled.memory_analysis()`): the frozen base, the trainable prefix + its optimizer
state, the batch, XLA's temporary bytes, and the peak (arguments + outputs - donated aliases +
temporaries). Nothing is allocated, so a 70B plan runs on a laptop; only compile time grows.

The largest batch that fits each per-device memory of --budgets_gib (v5e 16, v4 32, H100 80,
H200 141 GiB) comes from a linear fit over two compiles (1 and 2 rows per device): every term
but the temporaries is fixed, and the temporaries of this step grow linearly in the rows.
`--check_fit` also compiles the largest predicted row count (above 2) and prints its true peak
as one more row, to check the line.

It also inspects the sharding of every compiled input: a base weight that a device holds whole
while the mesh has more than one device is reported, and the tool exits with status 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

from absl import flags

from prefix_jax import bench, cli

FLAGS = cli.flag_values()
_MODEL = flags.DEFINE_string("model", "llama-3.2-1b", "A public shape of "
                             "models/llama_shapes.py (smollm2-1.7b, llama-3.2-1b, llama-3.1-8b, "
                             "llama-3.1-70b) or 'tiny'.", flag_values=FLAGS)
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated CPU devices of the mesh.",
                                flag_values=FLAGS)
_TENSOR = flags.DEFINE_integer("tensor", 1, "Tensor-parallel mesh axis; fsdp takes the rest.",
                               flag_values=FLAGS)
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["512"], "Sequence lengths, one row each.",
                              flag_values=FLAGS)
_REMATS = flags.DEFINE_list("remats", ["full"], "model.remat settings, one row each.",
                            flag_values=FLAGS)
_ROWS = flags.DEFINE_integer("rows", 0, "Also plan exactly this many rows per device "
                             "(0: only the 1- and 2-row compiles of the fit).", flag_values=FLAGS)
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "bfloat16", "Storage dtype of the base: "
                                   "float32, bfloat16 or int8 (models/int8.py).",
                                   flag_values=FLAGS)
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Activation dtype.", flag_values=FLAGS)
_PREFIX_LEN = flags.DEFINE_integer("prefix_len", 10, "Prefix slots P.", flag_values=FLAGS)
_BUDGETS = flags.DEFINE_list("budgets_gib", ["16", "32", "80", "141"],
                             "Per-device memories (GiB) for the largest-batch columns.",
                             flag_values=FLAGS)
_CHECK_FIT = flags.DEFINE_bool("check_fit", False, "Compile the predicted largest batch of the "
                               "largest budget it fits and print its peak.", flag_values=FLAGS)
_CONFIG = flags.DEFINE_string("config", bench.MAIN_EXPERIMENT, "The experiment FILE[:ARG] "
                              "whose prefix and optimizer are planned.", flag_values=FLAGS)
_UNIT = flags.DEFINE_enum("unit", "GiB", ["GiB", "MiB"], "Unit of the byte columns.",
                          flag_values=FLAGS)

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one compiled train step."""

    rows: int  # batch rows per device
    base: int  # the frozen base's shards
    state: int  # trainable prefix + optimizer state + step
    batch: int
    arguments: int  # XLA: every input (base + state + batch)
    outputs: int
    alias: int  # outputs written into donated inputs (the state)
    temp: int  # XLA's temporaries (activations, gradients, collectives' buffers)
    compile_s: float
    replicated: tuple[str, ...]  # base weights a device holds whole on a multi-device mesh

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.alias + self.temp


def _shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree`'s arrays under `shardings` (the largest shard, the same
    on every device for the even splits sharding.logical_spec makes)."""
    import jax

    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def replicated_weights(frozen, shardings, n_devices: int) -> tuple[str, ...]:
    """Paths of base weights (2+ dimensions) that a device holds at full size although the mesh
    has `n_devices` > 1: what the FSDP/tensor rules are meant to rule out."""
    import jax

    from prefix_jax.training.partition import path_str

    if n_devices == 1:
        return ()
    found = []
    flat_shardings = jax.tree.leaves(shardings)
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(frozen)[0],
                                      flat_shardings):
        if len(leaf.shape) >= 2 and sharding.shard_shape(leaf.shape) == tuple(leaf.shape):
            found.append(path_str(path))
    return tuple(found)


def model_config(name: str, dtype: str, param_dtype: str):
    """The LlamaConfig of shape `name`; an int8 base (`param_dtype`) runs Int8Dense layers."""
    from prefix_jax import models
    from prefix_jax.models import llama_shapes

    cfg = models.tiny_config(dtype=dtype) if name == "tiny" else llama_shapes.config(name, dtype)
    return dataclasses.replace(cfg, int8=param_dtype == "int8")


def compile_plan(config, cfg, rows: int, seq: int) -> Plan:
    """Lower and compile the train step of `config` on the model `cfg` for `rows` rows per
    device of `seq` tokens, from abstract arrays only, and read XLA's per-device accounting."""
    import jax

    from prefix_jax import models, train
    from prefix_jax.models import llama_shapes
    from prefix_jax.tasks import text_to_text
    from prefix_jax.training import partition
    from prefix_jax.training import sharding as shd

    mesh = shd.make_mesh(config.mesh)
    rules = shd.parse_rules(config.mesh.rules)
    base = llama_shapes.abstract_params(cfg, config.model.param_dtype)
    loaded = models.LoadedModel(cfg, models.Llama(cfg, remat=config.model.remat), base,
                                tokenizer=None, source=f"shape of {_MODEL.value}")
    # Without a mesh create_train_state leaves the base abstract (it is only split, never
    # read; the prefix is initialized at random) and makes the small trainable state for real.
    setup = train.create_train_state(config, loaded)
    # The placement create_train_state makes with a mesh, done on shapes instead of arrays.
    train_shardings, frozen_shardings = partition.split(
        shd.tree_shardings({"base": base, "prefix": setup.state.trainable["prefix"]},
                           train.param_axes(cfg), mesh, rules), setup.labels)
    abstract = functools.partial(jax.tree.map, lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype))
    state = abstract(setup.state)
    state_shardings = shd.state_shardings(state, train_shardings, mesh)
    n_batch = rows * shd.batch_shards(mesh)
    batch = abstract(bench.random_lm_batch(cfg.vocab_size, n_batch, seq))
    batch_shardings = jax.tree.map(lambda _: shd.batch_sharding(mesh), batch)

    step = functools.partial(train.train_step, model=setup.model, tx=setup.tx,
                             loss_fn=text_to_text.lm_loss)
    jitted = jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                     out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # as train.py traces its step (sharding.under_mesh)
        compiled = jitted.lower(state, setup.frozen, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    compiled_state, compiled_frozen, compiled_batch = compiled.input_shardings[0]
    return Plan(rows=rows,
                base=_shard_bytes(setup.frozen, compiled_frozen),
                state=_shard_bytes(state, compiled_state),
                batch=_shard_bytes(batch, compiled_batch),
                arguments=memory.argument_size_in_bytes,
                outputs=memory.output_size_in_bytes,
                alias=memory.alias_size_in_bytes,
                temp=memory.temp_size_in_bytes,
                compile_s=compile_s,
                replicated=replicated_weights(setup.frozen, compiled_frozen, mesh.size))


def largest_rows(one: Plan, two: Plan, budget: int) -> int:
    """Rows per device that fit `budget` bytes, from the line through the 1- and 2-row peaks
    (0 when even the fixed bytes do not fit)."""
    per_row = max(two.peak - one.peak, 1)
    fixed = one.peak - per_row
    return max((budget - fixed) // per_row, 0)


def plan_config(model: str, remat: str, tensor: int):
    config = bench.experiment_config(_CONFIG.value, model)
    config.model.path = model
    config.model.remat = remat
    config.model.param_dtype = _PARAM_DTYPE.value
    config.model.dtype = _DTYPE.value
    config.prefix.init = "random"
    config.prefix.length = _PREFIX_LEN.value
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, tensor
    return config


def _in_unit(n: int) -> str:
    return f"{n / (GIB if _UNIT.value == 'GiB' else 2**20):.2f}"


def main() -> None:
    try:
        seq_lens = [int(s) for s in _SEQ_LENS.value]
        budgets = [float(b) for b in _BUDGETS.value]
    except ValueError:
        cli.fail("--seq_lens and --budgets_gib must be numbers, e.g. --seq_lens=512,2048 "
                 "--budgets_gib=16,80")
    if _DEVICES.value < 1 or _DEVICES.value % _TENSOR.value:
        cli.fail(f"--devices={_DEVICES.value} must be >= 1 and a multiple of "
                 f"--tensor={_TENSOR.value}")
    if _PARAM_DTYPE.value not in ("float32", "bfloat16", "int8"):
        cli.fail(f"--param_dtype={_PARAM_DTYPE.value} must be float32, bfloat16 or int8")
    if _DTYPE.value not in ("float32", "bfloat16"):
        cli.fail(f"--dtype={_DTYPE.value} must be float32 or bfloat16")
    bad = [r for r in _REMATS.value if r not in ("none", "full", "dots")]
    if bad:
        cli.fail(f"--remats={','.join(_REMATS.value)}: {bad[0]!r} is not none, full or dots")
    import jax

    from prefix_jax.models import llama_shapes

    # The simulated devices exist only if this is set before the CPU backend starts.
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    if jax.device_count() != _DEVICES.value:
        cli.fail(f"{jax.device_count()} devices are present, not --devices={_DEVICES.value}: "
                 "run with JAX_PLATFORMS=cpu and without XLA_FLAGS forcing a device count")

    cfg = model_config(_MODEL.value, _DTYPE.value, _PARAM_DTYPE.value)
    n_params = sum(math.prod(x.shape) for x in
                   jax.tree.leaves(llama_shapes.abstract_params(cfg, _PARAM_DTYPE.value)))
    print(f"{_MODEL.value}: {n_params / 1e9:.3f}B base params in {_PARAM_DTYPE.value}, "
          f"activations {_DTYPE.value}, prefix P={_PREFIX_LEN.value}; mesh data=1 x fsdp="
          f"{_DEVICES.value // _TENSOR.value} x tensor={_TENSOR.value} ({_DEVICES.value} "
          f"simulated devices); {_UNIT.value} per device")
    budget_cols = " | ".join(f"max rows @{b:g}" for b in budgets)
    print(f"| seq | remat | rows/dev | base | prefix+opt | batch | XLA temp | peak | compile s "
          f"| {budget_cols} |")
    print("|" + "---|" * (9 + len(budgets)))
    replicated: set[str] = set()
    for seq in seq_lens:
        for remat in _REMATS.value:
            config = plan_config(_MODEL.value, remat, _TENSOR.value)
            one = compile_plan(config, cfg, 1, seq)
            two = compile_plan(config, cfg, 2, seq)
            fits = [largest_rows(one, two, int(b * GIB)) for b in budgets]
            plans = [one, two]
            if _ROWS.value and _ROWS.value not in (1, 2):
                plans.append(compile_plan(config, cfg, _ROWS.value, seq))
            if _CHECK_FIT.value:
                target = max((f for f in fits if f > 2), default=0)
                if target:
                    plans.append(compile_plan(config, cfg, target, seq))
            for plan in plans:
                replicated.update(plan.replicated)
                fit_cols = " | ".join(str(f) for f in fits) if plan is one else \
                    " | ".join("" for _ in fits)
                print(f"| {seq} | {remat} | {plan.rows} | {_in_unit(plan.base)} | "
                      f"{_in_unit(plan.state)} | {_in_unit(plan.batch)} | {_in_unit(plan.temp)} | "
                      f"{_in_unit(plan.peak)} | {plan.compile_s:.1f} | {fit_cols} |", flush=True)
    print("max rows: linear fit of the peak over the 1- and 2-row compiles (global batch = rows "
          f"x {_DEVICES.value // _TENSOR.value} fsdp shards)")
    if replicated:
        print("replicated full-size base weights on a device: " + ", ".join(sorted(replicated)))
        raise SystemExit(1)
    print("replicated full-size base weights on a device: none" if _DEVICES.value > 1 else
          "replication check: one device, nothing to check")


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
