r"""Export a trained prefix as an HF PEFT prefix-tuning adapter.

  python -m prefix_jax.export --workdir=runs/e2e --out=adapters/e2e
  python -m prefix_jax.export --workdir=runs/multi --task_index=1 --out=adapters/task1

Writes `adapter_model.safetensors` and `adapter_config.json` (peft_format.py) from the run's
newest checkpoint, `base_model_name_or_path` naming the base portably (an HF id, a directory's or
a GGUF file's name), plus `prefix_jax.json` (the base's resolved path, the run, the step) and a
README.md model card (base, task, data, the run's results.json metrics, config). Load it in torch
with `PeftModel.from_pretrained(base_model, OUT)` where `base_model` holds the same weights as
the run's `model.path`. Only runs whose real tokens start at P export (PEFT numbers them so):
`prefix.positions` `default` (every decoder run since issue 14) or `after_prefix`; runs recorded
with `auto` on a Llama-family model (the old default) or `zero` are refused. Mistakes end with
one `error:` line, exit status 2, and nothing written.
"""

from __future__ import annotations

import os

from absl import flags

from prefix_jax import cli

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "New directory for the PEFT adapter.", flag_values=FLAGS)
_TASK_INDEX = flags.DEFINE_integer("task_index", None,
                                   "Multi-task runs: which task's prefix (0-based).",
                                   flag_values=FLAGS)


def export(workdir: str, out: str, task: int | None = None) -> str:
    """Write the adapter of `workdir`'s newest checkpoint (task `task` of a multi-task run) into
    `out`; returns a one-line summary."""
    from prefix_jax.errors import UserError

    if os.path.isdir(out) and os.listdir(out):  # checked before the (slow) imports
        raise UserError(f"--out={out} exists and is not empty; give a new directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out={out} is a file; give a new directory")
    from prefix_jax import configs
    from prefix_jax.prefix import positions
    from prefix_jax.serving import bank, model_card, peft_format
    from prefix_jax.training import partition
    from prefix_jax.training import workdir as workdir_io
    config = bank.read_config(workdir)
    n_tasks = len(configs.task_dirs(config))
    if n_tasks > 1 and task is None:
        raise UserError(f"--workdir={workdir} trained {n_tasks} prefixes (one per task); a PEFT "
                        f"adapter holds one: export them one at a time with --task_index "
                        f"K (K = 0..{n_tasks - 1})")
    task = task or 0
    if not 0 <= task < n_tasks:
        raise UserError(f"--task_index={task} is out of range: the run has {n_tasks} task(s) "
                        f"(K = 0..{n_tasks - 1})")
    # Every mode computes fixed keys/values per layer (hidden states projected, a prompt run
    # through the model, an MLP's output): that is what PEFT stores, so each exports exactly.
    # What PEFT cannot express: a prefix in some layers only, or seen only by the target.
    if config.prefix.get("layers", "all") != "all" or \
            config.prefix.get("placement", "prefix") != "prefix":
        raise UserError(f"--workdir={workdir} trained prefix.layers={config.prefix.layers!r}, "
                        f"prefix.placement={config.prefix.placement!r}; a PEFT prefix-tuning "
                        "adapter is a prefix at every layer seen by every token (layers='all', "
                        "placement='prefix')")
    if config.prefix.length == 0:
        raise UserError(f"--workdir={workdir} has prefix.length=0: there is no prefix to export")

    def check_positions(used: str) -> None:
        if used != "after_prefix":
            raise UserError(
                f"--workdir={workdir} was trained with prefix.positions="
                f"{config.prefix.positions!r} ({used}: real tokens from position 0), but PEFT "
                "numbers them from P; queries carry their position (RoPE / learned embeddings), "
                "so this adapter would give different outputs in PEFT. Retrain with "
                "--config.prefix.positions=after_prefix (or 'default', new runs' default)")

    if config.prefix.positions in ("zero", "after_prefix"):  # known without loading the model
        check_positions(config.prefix.positions)
    loaded = bank.load([workdir])
    check_positions(positions.resolve(config.prefix.positions, loaded.base.config))
    label_tree = partition.labels({"base": loaded.base.params}, config.trainable)
    if partition.trainable_paths(label_tree):
        raise UserError(f"--workdir={workdir} also trained base weights (trainable="
                        f"{config.trainable!r}); a PEFT prefix adapter holds only the prefix")
    kv = loaded.row(task)
    if kv.k.shape[0] != loaded.base.config.n_layers:
        raise UserError(f"--workdir={workdir} has a prefix at {kv.k.shape[0]} of "
                        f"{loaded.base.config.n_layers} layers; a PEFT adapter has one at every "
                        "layer")
    base_name = peft_format.base_model_name(config.model.path, loaded.base.source)
    results = None
    if os.path.isfile(os.path.join(workdir, "results.json")):
        results = workdir_io.read_json(workdir, "results.json", fix=(
            "restore it or delete it (the model card then says the run has no results)"))
    provenance = {"base_model_path": loaded.base.source, "model.path": config.model.path,
                  "workdir": os.path.abspath(workdir), "step": loaded.steps[0],
                  "task_index": task, "prefix.positions": config.prefix.positions}
    card = model_card.render(config, results, base_name=base_name,
                             base_path=loaded.base.source, workdir=workdir,
                             step=loaded.steps[0], task_index=task,
                             data_dir=configs.task_dirs(config)[task],
                             n_virtual_tokens=kv.k.shape[2], n_layers=kv.k.shape[0])
    peft_format.write_adapter(out, kv, loaded.base.config, base_name, provenance, card)
    return (f"wrote {out}: PEFT prefix-tuning adapter, {kv.k.shape[2]} virtual tokens x "
            f"{kv.k.shape[0]} layers, from step {loaded.steps[0]} of {workdir} "
            f"(base_model_name_or_path {base_name!r})")


def main() -> None:
    if not _WORKDIR.value or not _OUT.value:
        cli.fail("--workdir and --out are required: the run to export and a new directory")
    if not os.path.isdir(_WORKDIR.value):
        cli.fail(f"--workdir={_WORKDIR.value} is not a directory; give a training run's workdir")
    print(export(_WORKDIR.value, _OUT.value, _TASK_INDEX.value))


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
