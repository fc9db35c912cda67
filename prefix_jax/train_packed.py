"""`train_packed(configs, workdirs)`: R prefix runs trained in one jitted step over one frozen base.

Each run keeps everything that makes it a run: its own prefix init and seed, its own data
stream (subset, order, grain iterator state), its own optimizer and hyperparameters (learning
rate, warmup, schedule length = its `train.num_steps`), and its own ordinary workdir (lock,
config.json, run_log.jsonl, metrics.jsonl, checkpoints carrying its run identity). The step
stacks the R trainable trees on a leading axis and `jax.vmap`s the task's loss and gradient
over them with the frozen base shared (its matmuls see R x the rows, which is the point: small
training sets give small batches); each run's optimizer update then runs with its own optax
transformation. Runs with a different `train.num_steps` pack too: a run that is done (or that
resumed ahead of the others after a kill) is held by a per-run `active` flag and not updated.

When the training steps are done, each run is finished by `train.train_and_evaluate` itself:
it resumes the run's final checkpoint (so zero steps are left) and runs the evaluators, writes
params.json, eval_untuned.json and results.json exactly as a run trained alone would. Rerunning
a killed group resumes every run from its own newest checkpoint.

What a packed group must share is everything the program's shapes or the shared base depend
on; `PER_RUN_FIELDS` lists the config fields that may differ, any other difference is refused
naming the field. Single process only (a pod run trains one run at a time).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from prefix_jax import configs, models, tasks, train
from prefix_jax.data import pipeline
from prefix_jax.errors import UserError
from prefix_jax.models import tiny
from prefix_jax.tasks import evals
from prefix_jax.tasks.base import EvalContext, Model, Task
from prefix_jax.training import (
    checkpoint,
    lock,
    optim,
    partition,
    preemption,
    run_identity,
)
from prefix_jax.training import sharding as shd
from prefix_jax.training import workdir as workdir_io
from prefix_jax.training.metric_writer import MetricWriter

# Config fields (or sections, with a trailing ".") that may differ between packed runs: none of
# them changes an array shape of the step or the frozen base it shares. Everything else (model,
# prefix mode/length/layers/reparam, trainable, batch size, max_len, task, mesh...) must agree.
PER_RUN_FIELDS = ("seed", "optim.", "train.num_steps", "train.log_every", "train.eval_every",
                  "train.checkpoint_every", "train.keep_checkpoints", "data.train_examples",
                  "data.subsample_seed", "prefix.init", "prefix.init_text", "prefix.init_std",
                  "eval.", "evals.")

# Param paths that stand for the base's weights: a run that trains them shares no frozen base
# worth packing (each run would carry its own copy of the model).
_BASE_PROBES = ("base/layers/q_proj/kernel", "base/layers/-1/q_proj/kernel",
                "base/embed/embedding")


def _per_run(path: str) -> bool:
    return any(path == f or (f.endswith(".") and path.startswith(f)) for f in PER_RUN_FIELDS)


def random_base(model_cfg: ml_collections.ConfigDict) -> bool:
    """Whether the model is a random test model, whose whole base is drawn from `seed` (so
    runs of different seeds have different bases and cannot share one)."""
    return model_cfg.path in (*tiny.DECODER_NAMES, "tiny-bert")


def _must_agree(config: ml_collections.ConfigDict, key: str) -> bool:
    return not _per_run(key) or (key == "seed" and random_base(config.model))


def pack_key(config: ml_collections.ConfigDict) -> str:
    """Equal for configs that can be packed together (the fields that must agree)."""
    shared = {k: v for k, v in run_identity.flatten(config).items() if _must_agree(config, k)}
    return repr(sorted(shared.items()))


def trains_base(config: ml_collections.ConfigDict) -> bool:
    """Whether `config.trainable` selects the base's own weights (fine-tuning, FT-top2)."""
    return any(re.search(config.trainable, probe) for probe in _BASE_PROBES)


def packing_problem(configs_: Sequence[ml_collections.ConfigDict]) -> str | None:
    """Why these configs cannot train as one packed group (naming the field), or None."""
    if trains_base(configs_[0]):
        return (f"trainable={configs_[0].trainable!r} trains the base's weights, so there is "
                "no frozen base to share")
    first = run_identity.flatten(configs_[0])
    for i, config in enumerate(configs_[1:], 1):
        other = run_identity.flatten(config)
        for key in sorted(set(first) | set(other)):
            if _must_agree(configs_[0], key) and first.get(key) != other.get(key):
                why = (" (the random test model's base is drawn from it)" if key == "seed"
                       else "")
                return (f"run {i} has {key}={other.get(key)!r} but run 0 has "
                        f"{key}={first.get(key)!r}; runs that differ in {key}{why} cannot be "
                        "packed")
    return None


@dataclasses.dataclass
class _Run:
    """One run of the group: its config, workdir and everything only it owns."""

    config: ml_collections.ConfigDict
    workdir: str
    task: Task
    during: dict
    loaded: models.LoadedModel  # the load for its seed (its trainable base leaves come from it)
    model: Model
    tx: optax.GradientTransformation
    state: Any  # train.TrainState
    frozen: Any  # its own load's frozen tree (the same values as the shared one)
    data_iter: Any
    ckpt: Any
    meta: dict
    writer: MetricWriter | None = None
    pending: list = dataclasses.field(default_factory=list)
    checked: list = dataclasses.field(default_factory=list)
    tokens: int = 0
    clock: float = 0.0
    saved_step: int = 0

    @property
    def num_steps(self) -> int:
        return self.config.train.num_steps


def packed_step(states: tuple, frozen, batch: dict[str, jax.Array], active: jax.Array,
                models_: tuple[Model, ...], txs: tuple[optax.GradientTransformation, ...],
                loss_fn) -> tuple[tuple, dict[str, jax.Array]]:
    """One optimizer step of every active run. `batch` holds the runs' batches stacked on a
    leading R axis; the loss and gradients are vmapped over (trainable, batch, dropout key)
    with the frozen base shared; each run's update is its own optimizer's (train.train_step's
    math, run by run). An inactive run's state comes back unchanged."""
    trainables = jax.tree.map(lambda *xs: jnp.stack(xs), *[s.trainable for s in states])
    model = models_[0]  # the runs' Models differ only in their dropout seed
    rngs = None
    if model.prefix.dropout:
        rngs = jnp.stack([jax.random.fold_in(jax.random.key(m.dropout_seed), s.step)
                          for m, s in zip(models_, states)])

    def loss_and_grads(trainable, run_batch, rng):
        return jax.value_and_grad(loss_fn)(trainable, frozen, run_batch, model, rng)

    losses, grads = jax.vmap(loss_and_grads, in_axes=(0, 0, 0 if rngs is not None else None))(
        trainables, batch, rngs)
    new_states, grad_norms = [], []
    for r, (state, tx) in enumerate(zip(states, txs)):
        run_grads = jax.tree.map(lambda g, r=r: g[r], grads)
        updates, opt_state = tx.update(run_grads, state.opt_state, state.trainable)
        stepped = train.TrainState(state.step + 1, optax.apply_updates(state.trainable, updates),
                             opt_state)
        new_states.append(jax.tree.map(lambda n, o, r=r: jnp.where(active[r], n, o),
                                       stepped, state))
        grad_norms.append(optax.global_norm(run_grads))
    return tuple(new_states), {"train/loss": losses, "train/grad_norm": jnp.stack(grad_norms)}


def run_stream(config: ml_collections.ConfigDict, task: Task, tokenizer: Any
               ) -> grain.DatasetIterator:
    """A packed run's own stream of training batches (its subset, seed and length; one
    process holds every row, since packed groups train in one process)."""
    return pipeline.train_iterator(
        task.train_examples(tokenizer), config.train.batch_size, config.seed,
        config.data.bucket_multiple, models.pad_id(tokenizer), config.train.num_steps, 0, 1,
        task.collate, task.widths)


def stack_batches(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The runs' batches on a leading axis, each zero-padded to the widest along every axis.
    Zero padding is masked padding in every task's batch (segment id 0, target weight 0), so a
    run's loss and gradients do not change; only the padded width of its batch does."""
    stacked = {}
    for key in batches[0]:
        arrays = [b[key] for b in batches]
        shape = np.max([a.shape for a in arrays], axis=0)
        stacked[key] = np.stack([np.pad(a, [(0, n - s) for s, n in zip(a.shape, shape)])
                                 for a in arrays])
    return stacked


def _check_inputs(configs_: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str]
                  ) -> None:
    if len(configs_) != len(workdirs) or not configs_:
        raise UserError(f"{len(configs_)} configs for {len(workdirs)} workdirs: give one "
                        "workdir per run")
    if len(set(workdirs)) != len(workdirs):
        raise UserError("two packed runs share a workdir; give each run its own")
    problem = packing_problem(configs_)
    if problem:
        raise UserError(f"these runs cannot be packed: {problem}; run them one by one "
                        "(sweep --pack=false)")
    if jax.process_count() > 1:
        raise UserError("packed runs train in one process; run a pod's runs one by one")


def train_packed(configs_: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
                 hooks=None) -> list[dict[str, float]]:
    """Train the runs of `configs_` (each in its workdir) in one program, then finish each as
    an ordinary run (its evaluators, results.json); returns each run's final metrics.
    `hooks` (train.Hooks): `load_model`, `save_checkpoint` and `after_checkpoint` apply to
    every run (after_checkpoint gets the run's step once every run's save of it is on disk)."""
    hooks = hooks or train.Hooks()
    if hooks.task is not None or hooks.wrap_step is not None:
        raise UserError("train_packed takes no task or wrap_step hook (each run reads its own "
                        "data)")
    for config in configs_:
        configs.validate(config)
    _check_inputs(configs_, workdirs)
    for workdir in workdirs:
        workdir_io.check(workdir)
    held = []
    try:
        for workdir in workdirs:
            held.append(lock.acquire(workdir))
        loads = _train_group(configs_, workdirs, hooks)
    finally:
        for h in held:
            h.release()
    # Each run finished by the single-run path, resuming its final checkpoint (no step left).
    results = []
    for config, workdir in zip(configs_, workdirs):
        finish_hooks = dataclasses.replace(hooks, load_model=_cached(loads, hooks.load_model))
        results.append(train.train_and_evaluate(config, workdir, finish_hooks))
    return results


def _cached(loads: dict[int, models.LoadedModel], load_model):
    """A model loader that hands back the group's loads (one per seed) instead of reloading."""
    def load(model_cfg, seed):
        return loads[seed] if seed in loads else load_model(model_cfg, seed=seed)
    return load


def _train_group(configs_: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
                 hooks) -> dict[int, models.LoadedModel]:
    config0 = configs_[0]
    mesh = shd.make_mesh(config0.mesh)
    rules = shd.parse_rules(config0.mesh.rules)
    # One load per distinct seed: a loader may draw part of the base from the seed (a random
    # test model, a classifier head); its frozen part must then still be the same for all.
    loads, fingerprints = {}, {}
    for seed in sorted({c.seed for c in configs_}):
        loaded = hooks.load_model(config0.model, seed=seed)
        fingerprints[seed] = checkpoint.base_fingerprint(loaded.params)
        loads[seed] = train.place_base(loaded, mesh, rules)
    runs: list[_Run] = []
    frozen, frozen_prints = None, {}
    for config, workdir in zip(configs_, workdirs):
        task = tasks.get(config)
        identity = run_identity.identity(config)
        during, _ = evals.build(config, task)
        loaded = loads[config.seed]
        tasks.check_model(task, loaded)
        train.check_max_len(config, loaded)
        setup = train.create_train_state(config, loaded, mesh)
        if frozen is None:
            frozen = setup.frozen
        if len(loads) > 1 and config.seed not in frozen_prints:  # one load: one base
            frozen_prints[config.seed] = checkpoint.base_fingerprint(setup.frozen)
        if len(set(frozen_prints.values())) > 1:
            raise UserError(f"{workdir}: its frozen base differs from the first run's (the "
                            f"model's loader draws it from seed={config.seed}); runs with "
                            "different bases cannot be packed; run them one by one "
                            "(sweep --pack=false)")
        data_iter = run_stream(config, task, loaded.tokenizer)
        ckpt = checkpoint.manager(workdir, config.train.keep_checkpoints)
        meta = {"base_fingerprint": fingerprints[config.seed], "model_source": loaded.source,
                "trainable_shapes": checkpoint.shapes(setup.state.trainable),
                "identity": identity, "versions": run_identity.versions()}
        run = _Run(config, workdir, task, during, loaded, setup.model, setup.tx, setup.state,
                   setup.frozen, data_iter, ckpt, meta)
        restored = checkpoint.restore_latest(ckpt, run.state, data_iter, meta)
        if restored is not None:
            run.state = restored.state
            print(f"{workdir}: resumed from step {restored.step}")
        run.saved_step = int(run.state.step)
        runs.append(run)
    for run in runs:
        start = int(run.state.step)
        run_identity.append_run_log(run.workdir, run_identity.run_record(
            run.config, sys.argv, {"processes": 1, "devices": len(jax.devices()),
                                   "kind": jax.devices()[0].device_kind,
                                   "mesh": dict(mesh.shape), "packed_with": len(runs)},
            start or None, ()))
        workdir_io.write_text(run.workdir, "config.json", run.config.to_json_best_effort(indent=2))
        run.writer = MetricWriter(run.workdir, resume_step=start)
        run.clock = time.perf_counter()
    try:
        _loop(runs, frozen, mesh, hooks)
    finally:
        for run in runs:
            run.ckpt.wait_until_finished()
            run.writer.close()
    return loads


def _loop(runs: list[_Run], frozen, mesh, hooks) -> None:
    step_fn = jax.jit(functools.partial(
        packed_step, models_=tuple(r.model for r in runs), txs=tuple(r.tx for r in runs),
        loss_fn=runs[0].task.loss), donate_argnums=(0,))
    first = min(int(r.state.step) for r in runs)
    last = max(r.num_steps for r in runs)
    print(f"packed: {len(runs)} runs in one step, group steps {first + 1}..{last}")
    seen_shapes: set = set()
    with preemption.stop_on_signals(every=runs[0].config.distributed.stop_check_every) as stop:
        for group_step in range(first + 1, last + 1):
            active = [int(r.state.step) < group_step <= r.num_steps for r in runs]
            batches = {i: next(r.data_iter) for i, r in enumerate(runs) if active[i]}
            filler = next(iter(batches.values()))  # an idle run computes on a real batch
            stacked = stack_batches([batches.get(i, filler) for i in range(len(runs))])
            shapes = tuple(x.shape for x in stacked.values())
            if shapes not in seen_shapes:
                seen_shapes.add(shapes)
                logging.info("compiling the packed step for batch shapes %s", shapes)
            # the R axis is not a batch axis: every device of the mesh sees the whole stack
            batch = jax.device_put(stacked, shd.replicated(mesh))
            states, metrics = step_fn(tuple(r.state for r in runs), frozen, batch,
                                      jnp.asarray(active))
            stop_now = stop.agreed(group_step)
            for i, run in enumerate(runs):
                run.state = states[i]
                if active[i]:
                    run.pending.append((group_step, metrics["train/loss"][i]))
                    run.tokens += int((batches[i]["segment_ids"] > 0).sum())
                    _after_step(run, group_step, metrics["train/grad_norm"][i], stop_now, hooks)
            if stop_now:
                for run in runs:
                    if int(run.state.step) > run.saved_step:
                        _save(run, hooks)
                for run in runs:
                    run.ckpt.wait_until_finished()
                raise preemption.Stopped(group_step, stop.signum)


def _after_step(run: _Run, step: int, grad_norm, stop_now: bool, hooks) -> None:
    """The single-run loop's per-step bookkeeping for one run: log, checkpoint, evaluate."""
    config = run.config
    log_now = step % config.train.log_every == 0 or step == run.num_steps
    save_now = step % config.train.checkpoint_every == 0 or step == run.num_steps or stop_now
    if log_now or save_now:
        run.checked += train.check_losses_finite(run.pending, run.workdir, run.ckpt, True)
        run.pending.clear()
    if log_now:
        elapsed = time.perf_counter() - run.clock
        run.writer.write(step, {
            "train/loss": float(np.mean(run.checked)), "train/grad_norm": float(grad_norm),
            "train/tokens_per_sec": run.tokens / elapsed,
            "train/lr": float(optim.schedule(config.optim, run.num_steps)(step - 1))})
        run.checked, run.tokens, run.clock = [], 0, time.perf_counter()
    if save_now and not stop_now:
        _save(run, hooks)
    if config.train.eval_every and step % config.train.eval_every == 0 and step != run.num_steps \
            and run.during:
        train.check_state_finite(run.state, run.workdir, run.ckpt, True, "evaluate")
        ctx = EvalContext(run.workdir, True, step, print, True)
        params = partition.merge(run.state.trainable, run.frozen)
        scores = {}
        for evaluate in run.during.values():
            scores.update(evaluate(run.model, params, run.loaded.tokenizer, ctx))
        run.writer.write(step, {f"eval/{k}": v for k, v in scores.items()})
        run.clock = time.perf_counter()  # eval time is not training throughput


def _save(run: _Run, hooks) -> None:
    step = int(run.state.step)
    train.check_state_finite(run.state, run.workdir, run.ckpt, True, "save")
    train.write_checkpoint(hooks.save_checkpoint, run.ckpt, step, run.state, run.data_iter,
                           run.meta)
    run.saved_step = step
    if hooks.after_checkpoint:
        run.ckpt.wait_until_finished()
        hooks.after_checkpoint(step)
