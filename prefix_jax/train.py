"""`train_and_evaluate(config, workdir)`: one readable train loop, in labelled sections.

The frozen base is read in place by every step; only the trainable tree and its optimizer state
are updated, donated and checkpointed (see partition.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from prefix_jax import configs, models, prefix, tasks
from prefix_jax.data import pipeline
from prefix_jax.errors import UserError
from prefix_jax.prefix import positions
from prefix_jax.serving import peft_format
from prefix_jax.tasks import evals
from prefix_jax.tasks.base import EvalContext, LossFn, Model, Task
from prefix_jax.training import (
    checkpoint,
    distributed,
    lock,
    optim,
    partition,
    preemption,
    run_identity,
)
from prefix_jax.training import sharding as shd
from prefix_jax.training import workdir as workdir_io
from prefix_jax.training.metric_writer import MetricWriter


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any  # full {"base", "prefix"} structure, MaskedNode where frozen
    opt_state: optax.OptState


def train_step(state: TrainState, frozen, batch: dict[str, jax.Array], model: Model,
               tx: optax.GradientTransformation, loss_fn: LossFn
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step of the task's `loss_fn` (tasks.base.Task.loss)."""
    dropout_rng = None
    if model.prefix.dropout:
        dropout_rng = jax.random.fold_in(jax.random.key(model.dropout_seed), state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.trainable, frozen, batch, model,
                                              dropout_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    step_metrics = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads)}
    return TrainState(state.step + 1, trainable, opt_state), step_metrics


_PREFIX_AXES = shd.regex_axes(prefix.LOGICAL_AXES)


def param_axes(base_config) -> Callable[[str, int], tuple]:
    """(path, ndim) -> logical dimension names of a leaf of `{"base": ..., "prefix": ...}`
    (for sharding); the base's from its own backbone's table, `base_config.logical_axes`."""
    base_axes = shd.regex_axes(base_config.logical_axes)

    def axes(path: str, ndim: int):
        scope, _, rest = path.partition("/")
        return (base_axes if scope == "base" else _PREFIX_AXES)(rest, ndim)

    return axes


def place_base(loaded: models.LoadedModel, mesh, rules) -> models.LoadedModel:
    """The loaded base placed onto the mesh, each device taking its shard. The host arrays of
    `loaded.params` are replaced in place, one at a time (the base never exists twice)."""
    shardings = shd.tree_shardings({"base": loaded.params}, param_axes(loaded.config), mesh,
                                   rules)["base"]
    shd.place(loaded.params, shardings, consume=True)
    return loaded


@dataclasses.dataclass(frozen=True)
class Setup:
    model: Model
    labels: Any  # "train"/"freeze" per leaf of {"base", "prefix"}
    tx: optax.GradientTransformation
    state: TrainState
    frozen: Any  # full structure, MaskedNode where trainable
    state_shardings: Any = None  # TrainState of NamedShardings when placed on a mesh
    layer_masks: Any = None  # path -> [L] bool: stacked leaves of which only some layers train


def create_train_state(config: ml_collections.ConfigDict, loaded: models.LoadedModel,
                       mesh=None) -> Setup:
    """Prefix init, labels from `config.trainable`, the split, the optimizer and its state.

    With a `mesh`, every array is placed by `config.mesh.rules` (the optimizer state created
    directly in its parameters' shardings); without one, on the default device.
    """
    prefix_module = prefix.build(config.prefix, loaded.config,
                                 len(configs.task_dirs(config)))
    params = {"base": loaded.params,
              "prefix": prefix.init(prefix_module, jax.random.key(config.seed), config.prefix,
                                    loaded)}
    if config.prefix.get("init_from_peft"):  # absent from configs older than PEFT interop
        params["prefix"] = peft_format.prefix_params(config.prefix, loaded.config, params["prefix"])
    layer_masks = partition.layer_masks(params, config.trainable)
    labels = partition.labels(params, config.trainable, layer_masks)
    trainable, frozen = partition.split(params, labels)
    if partition.count(trainable) == 0:
        raise UserError(f"trainable={config.trainable!r} matches no parameter; paths look like "
                        "'prefix/key', 'base/layers/q_proj/kernel' or, for one layer of a "
                        "stacked leaf, 'base/layers/-1/q_proj/kernel'")
    tx = optim.make(config.optim, config.train.num_steps, labels, layer_masks)
    model = Model(loaded.module, prefix_module,
                  prefix.decode_options(config.prefix, loaded.config), config.seed)

    def fresh_state(trainable):
        return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))

    if mesh is None:
        return Setup(model, labels, tx, fresh_state(trainable), frozen,
                     layer_masks=layer_masks)
    rules = shd.parse_rules(config.mesh.rules)
    train_shardings, frozen_shardings = partition.split(
        shd.tree_shardings(params, param_axes(loaded.config), mesh, rules), labels)
    trainable = shd.place(trainable, train_shardings)
    frozen = shd.place(frozen, frozen_shardings)
    state_shardings = shd.state_shardings(jax.eval_shape(fresh_state, trainable),
                                          train_shardings, mesh)
    state = jax.jit(fresh_state, out_shardings=state_shardings)(trainable)
    return Setup(model, labels, tx, state, frozen, state_shardings, layer_masks)


class DivergedError(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _crash_report(workdir: str, is_main: bool, report: dict) -> str:
    """`workdir/crash_report.json` (written by process 0) with the hint to resume; its path."""
    if is_main:
        workdir_io.write_json(workdir, "crash_report.json", {
            **report, "hint": "lower optim.lr or raise optim.warmup_steps, then rerun: the run "
                              "resumes from the last good checkpoint"})
    return os.path.join(workdir, "crash_report.json")


def check_losses_finite(pending: list[tuple[int, jax.Array]], workdir: str, ckpt,
                        is_main: bool
                  ) -> list[float]:
    """The pending losses as floats; at the first non-finite one, a crash report and an error."""
    losses = []
    for step, loss in pending:
        value = float(loss)
        if not np.isfinite(value):
            last_good = ckpt.latest_step()
            path = _crash_report(workdir, is_main, {
                "step": step, "loss": str(value), "last_good_checkpoint": last_good,
                "recent_losses": losses[-20:]})
            raise DivergedError(f"train loss is {value} at step {step}; last good checkpoint: "
                                f"step {last_good}; report in {path}; lower optim.lr and rerun")
        losses.append(value)
    return losses


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Whether every float of `tree` is finite: one fused reduction on the devices."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def check_state_finite(state: TrainState, workdir: str, ckpt, is_main: bool, why: str
                        ) -> None:
    """A DivergedError (and a crash report) when the trainable state or its optimizer state
    holds a NaN or Inf: such a state is never saved (`why`: "save", "evaluate")."""
    if bool(_all_finite((state.trainable, state.opt_state))):
        return
    step, last_good = int(state.step), ckpt.latest_step()
    path = _crash_report(workdir, is_main, {"step": step, "state": "non-finite",
                                            "last_good_checkpoint": last_good})
    raise DivergedError(f"the trainable state holds NaN or Inf after step {step} (refusing to "
                        f"{why} it); last good checkpoint: step {last_good}; report in {path}; "
                        "lower optim.lr and rerun")


def write_checkpoint(save: Callable, ckpt, step: int, state: TrainState, data_iter,
                     meta: dict) -> None:
    try:
        save(ckpt, step, state, data_iter, meta)
    except OSError as e:
        raise UserError(f"writing the step-{step} checkpoint to {ckpt.directory} failed ({e}); "
                        "free disk space or use another --workdir and rerun: the previous "
                        "checkpoint is kept") from e


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Explicit seams into one run, for callers that need more than a config (fault injection,
    instrumented steps, a task or model built elsewhere). The defaults are the plain run."""

    task: Task | None = None  # instead of tasks.get(config)
    load_model: Callable[..., models.LoadedModel] = models.load  # (config.model, seed=)
    wrap_step: Callable[[Callable], Callable] | None = None  # wraps (state, frozen, batch) ->
    # (state, metrics) before it is jitted
    save_checkpoint: Callable = checkpoint.save  # (manager, step, state, data_iter, meta)
    after_checkpoint: Callable[[int], None] | None = None  # once step's checkpoint is on disk


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: Hooks | None = None, allow_changes: Sequence[str] = ()
                       ) -> dict[str, float]:
    """Train the configured prefix on the configured task, run its evaluators, return the
    final metrics.

    Rerunning in the same workdir resumes; a config whose run identity differs from the
    checkpoint's (run_identity.py) is refused unless every differing field (or its section)
    is named in `allow_changes`.
    """
    hooks = hooks or Hooks()
    # ---- Inputs: everything a user can get wrong is checked before the workdir is touched.
    configs.validate(config)
    run_identity.check_allowed_names(allow_changes, config)
    # as given, like the sweep tool computes it for its entries
    results_identity = run_identity.results_identity(config)
    workdir_io.check(workdir)
    task = hooks.task or tasks.get(config)  # reads and checks the data files
    # after the task recorded what it read from the data (e.g. data.labels), as config.json
    # holds it: a checkpoint is compared with that
    identity = run_identity.identity(config)
    during, at_end = evals.build(config, task)  # reads the evaluation files
    distributed.initialize(config.distributed)  # before any device is touched
    mesh = shd.make_mesh(config.mesh)
    if config.train.batch_size % shd.batch_shards(mesh):
        raise UserError(f"train.batch_size={config.train.batch_size} is not divisible by the "
                        f"{shd.batch_shards(mesh)} batch shards of mesh {dict(mesh.shape)} "
                        "(data x fsdp); use a multiple of it")
    loaded = hooks.load_model(config.model, seed=config.seed)
    tasks.check_model(task, loaded)
    check_max_len(config, loaded)
    train_data = task.train_examples(loaded.tokenizer)

    # ---- The workdir lock: one live run per workdir, held until this function returns.
    held = _lock_workdir(workdir)
    try:
        return _train_locked(config, workdir, hooks, allow_changes, identity, results_identity,
                             task, during, at_end, mesh, loaded, train_data)
    finally:
        held.release()


def check_max_len(config: ml_collections.ConfigDict, loaded: models.LoadedModel) -> None:
    """A UserError when the prefix and `data.max_len` do not fit the model's positions."""
    first_position = positions.offset(config.prefix, loaded.config)  # P under after_prefix
    if first_position + config.data.max_len > loaded.config.max_seq_len:
        raise UserError(f"data.max_len={config.data.max_len} (starting at position "
                        f"{first_position}) exceeds the model's maximum sequence length "
                        f"{loaded.config.max_seq_len}; lower data.max_len")


def _lock_workdir(workdir: str) -> lock.Lock:
    """Process 0 takes the lock; every process learns whether it got it."""
    held, refusal = lock.NO_LOCK, None
    if jax.process_index() == 0:
        try:
            held = lock.acquire(workdir)
        except UserError as e:
            refusal = e
    if jax.process_count() > 1:
        taken = int(multihost_utils.broadcast_one_to_all(np.int32(refusal is None)))
        if not taken and refusal is None:
            raise UserError("process 0 could not take the workdir lock (its error line names "
                            "the run holding it)")
    if refusal is not None:
        raise refusal
    return held


def _train_locked(config: ml_collections.ConfigDict, workdir: str, hooks: Hooks,
                  allow_changes: Sequence[str], identity: dict, results_identity: str,
                  task: Task, during: dict, at_end: dict, mesh, loaded: models.LoadedModel,
                  train_data) -> dict[str, float]:
    """The run itself, once its inputs are checked and the workdir is locked."""
    # ---- Model, prefix and the trainable/frozen split, placed on the mesh: the base sharded
    # by config.mesh.rules straight from the host arrays, the trainable state beside it.
    fingerprint = checkpoint.base_fingerprint(loaded.params)  # host arrays, before placement
    loaded = place_base(loaded, mesh, shd.parse_rules(config.mesh.rules))
    setup = create_train_state(config, loaded, mesh)
    model, labels, state, frozen = setup.model, setup.labels, setup.state, setup.frozen
    n_train = partition.count(state.trainable, setup.layer_masks)
    n_base = partition.count(loaded.params)

    # ---- Data iterator and checkpoint restore (a mismatched checkpoint stops the run here,
    # before anything in the workdir is written).
    data_iter = pipeline.train_iterator(
        train_data, config.train.batch_size, config.seed, config.data.bucket_multiple,
        models.pad_id(loaded.tokenizer), config.train.num_steps,
        jax.process_index(), jax.process_count(), task.collate, task.widths)
    ckpt = checkpoint.manager(workdir, config.train.keep_checkpoints)
    meta = {"base_fingerprint": fingerprint,
            "model_source": loaded.source,
            "trainable_shapes": checkpoint.shapes(state.trainable),
            "identity": identity,
            "versions": run_identity.versions()}
    restored = checkpoint.restore_latest(ckpt, state, data_iter, meta, allow_changes)
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *args, **kwargs: None)
    if restored is not None:
        state = restored.state
        say(f"resumed from step {restored.step} ({ckpt.directory})")
        for change in restored.accepted_changes:
            say(f"resumed with a changed setting: {change}")

    # ---- Workdir and logs (only process 0 writes). Every start appends to the run log;
    # config.json is the current start's config.
    layout = shd.layout(mesh, frozen, state)
    if is_main:
        run_identity.append_run_log(workdir, run_identity.run_record(
            config, sys.argv, {"processes": layout["processes"], "devices": layout["devices"],
                               "kind": jax.devices()[0].device_kind, "mesh": layout["mesh"]},
            restored.step if restored else None,
            restored.accepted_changes if restored else ()))
        workdir_io.write_text(workdir, "config.json", config.to_json_best_effort(indent=2))
        workdir_io.write_json(workdir, "sharding.json", layout)
        workdir_io.write_json(workdir, "params.json", {
            "trainable": n_train, "base": n_base, "trainable_percent": 100 * n_train / n_base,
            "trainable_paths": partition.trainable_paths(labels)})
    writer = MetricWriter(workdir, enabled=is_main, resume_step=int(state.step))
    logging.info("model %s: %d base params; trainable %d (%.4f%% of base): %s", loaded.source,
                 n_base, n_train, 100 * n_train / n_base, partition.trainable_paths(labels))
    say(f"trainable parameters: {n_train:,} ({100 * n_train / n_base:.3f}% of the "
        f"{n_base:,} in the base)")
    say(f"mesh {layout['mesh']} over {layout['devices']} devices, {layout['processes']} "
        f"process(es)); frozen base {layout['base_bytes_per_device_max'] / 2**20:.1f} MiB per "
        f"device of {layout['base_bytes'] / 2**20:.1f} MiB")

    # ---- Step function: jitted once per batch shape, the trainable state donated.
    step = functools.partial(train_step, model=model, tx=setup.tx, loss_fn=task.loss)
    step_fn = jax.jit(hooks.wrap_step(step) if hooks.wrap_step else step, donate_argnums=(0,),
                      out_shardings=(setup.state_shardings, shd.replicated(mesh)))
    step_fn = shd.under_mesh(mesh, step_fn)  # traced with the mesh set: rows stay split

    def run_evals(evaluators: dict, step: int, with_prefix: bool = True) -> dict[str, float]:
        if with_prefix:  # never a score of a NaN prefix
            check_state_finite(state, workdir, ckpt, is_main, "evaluate")
        ctx = EvalContext(workdir if is_main else None, is_main, step, say, with_prefix)
        params = partition.merge(state.trainable, frozen)
        scores = {}
        for evaluate in evaluators.values():
            scores.update(evaluate(model, params, loaded.tokenizer, ctx))
        return scores

    # ---- The untuned model, once per workdir, as the baseline printed beside the result.
    untuned = workdir_io.read_json_if_valid(workdir, "eval_untuned.json")  # None: recompute
    if config.eval.eval_untuned and during and untuned is None:
        untuned = run_evals(during, 0, with_prefix=False)
        writer.write(0, {f"eval_untuned/{k}": v for k, v in untuned.items()})
        if is_main:
            workdir_io.write_json(workdir, "eval_untuned.json", untuned)

    # ---- Train loop. Losses stay on the device until a log or checkpoint step, where every
    # pending one is checked: a non-finite loss stops the run before its state is saved.
    start = int(state.step)
    num_steps = config.train.num_steps
    seen_shapes: set[tuple[int, ...]] = set()
    pending: list[tuple[int, jax.Array]] = []
    checked_losses: list[float] = []
    tokens_since, time_since = 0, time.perf_counter()
    bar = tqdm(total=num_steps, initial=start, desc="train", disable=not is_main,
               dynamic_ncols=True)
    last_eval: dict[str, float] = {}
    with preemption.stop_on_signals(every=config.distributed.stop_check_every) as stop:
        for step in range(start + 1, num_steps + 1):
            local = next(data_iter)
            shapes = tuple(x.shape for x in local.values())
            if shapes not in seen_shapes:
                seen_shapes.add(shapes)
                logging.info("compiling the train step for batch shapes %s (%s)", shapes,
                             ", ".join(local))
            state, step_metrics = step_fn(state, frozen, shd.global_batch(local, mesh))
            pending.append((step, step_metrics["train/loss"]))
            tokens_since += int((local["segment_ids"] > 0).sum()) * jax.process_count()
            bar.update(1)

            log_now = step % config.train.log_every == 0 or step == num_steps
            stop_now = stop.agreed(step)  # the same step on every process of a pod
            save_now = (step % config.train.checkpoint_every == 0 or step == num_steps
                        or stop_now)
            if log_now or save_now:
                checked_losses += check_losses_finite(pending, workdir, ckpt, is_main)
                pending.clear()
            if log_now:
                elapsed = time.perf_counter() - time_since
                scalars = {"train/loss": float(np.mean(checked_losses)),
                           "train/grad_norm": float(step_metrics["train/grad_norm"]),
                           "train/tokens_per_sec": tokens_since / elapsed,
                           "train/lr": float(optim.schedule(config.optim, num_steps)(step - 1))}
                writer.write(step, scalars)
                bar.set_postfix(loss=f"{scalars['train/loss']:.3f}",
                                tok_s=f"{scalars['train/tokens_per_sec']:.0f}")
                checked_losses, tokens_since, time_since = [], 0, time.perf_counter()
            if save_now:
                check_state_finite(state, workdir, ckpt, is_main, "save")
                write_checkpoint(hooks.save_checkpoint, ckpt, step, state, data_iter, meta)
                if hooks.after_checkpoint:
                    ckpt.wait_until_finished()
                    hooks.after_checkpoint(step)
            if stop_now:
                ckpt.wait_until_finished()
                bar.close()
                writer.close()
                raise preemption.Stopped(step, stop.signum)
            if config.train.eval_every and step % config.train.eval_every == 0 \
                    and step != num_steps:
                last_eval = run_evals(during, step)
                writer.write(step, {f"eval/{k}": v for k, v in last_eval.items()})
                time_since = time.perf_counter()  # eval time is not training throughput
    bar.close()
    ckpt.wait_until_finished()

    # ---- Final evaluation: the 'train'-phase evaluators once more, then the 'end' ones.
    final = run_evals(during, num_steps) if during else last_eval
    writer.write(num_steps, {f"eval/{k}": v for k, v in final.items()})
    writer.close()
    result = {**{f"eval/{k}": v for k, v in final.items()}, "step": num_steps}
    if untuned is not None:
        result.update({f"eval_untuned/{k}": v for k, v in untuned.items()})
    for name, evaluate in at_end.items():
        scores = run_evals({name: evaluate}, num_steps)
        result.update({f"{name}/{k}": v for k, v in scores.items()})
    if is_main:
        # what the results depend on, so sweep.py can tell them from another entry's
        workdir_io.write_json(workdir, "results.json",
                              {**result, "results_identity": results_identity})
    before = {k.split("/")[1]: v for k, v in result.items() if k.startswith("eval_untuned/")}
    if final and before:
        line = " | ".join(f"{k} {before[k]:.1f} -> {v:.1f}" for k, v in final.items())
        what = "; ".join(e.description for e in during.values())
        say(f"\ndev ({what}), untuned -> prefix-tuned: {line}")
    return result
