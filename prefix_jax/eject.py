r"""Eject the MLP of a reparameterized prefix: a new workdir whose checkpoint holds only the flat
prefix the MLP computes (Li & Liang train through the MLP and serve its output).

  python -m prefix_jax.eject --workdir=runs/e2e_prefix_mlp --out=runs/e2e_prefix_mlp_flat

The new workdir has the run's config with `prefix.reparam='none'` (and no prefix dropout), the
same step, the flat prefix as trainable state with a fresh optimizer state (a run resumed from
it continues training the flat prefix), and the same data-iterator state. Generation, evaluation,
export and banks read it like any run; the keys/values are those of the MLP run (tested).
"""

from __future__ import annotations

import os

from absl import flags

from prefix_jax import cli

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_string("workdir", None, "A run with prefix.reparam='mlp'.",
                               flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "New workdir for the flat prefix.", flag_values=FLAGS)


def eject_workdir(workdir: str, out: str) -> dict:
    """Write the ejected run into `out` (absent or empty); returns a summary."""
    import jax
    import orbax.checkpoint as ocp

    from prefix_jax import prefix, train
    from prefix_jax.errors import UserError
    from prefix_jax.serving import bank
    from prefix_jax.training import checkpoint, partition, run_identity
    from prefix_jax.training import workdir as workdir_io

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out={out} exists and is not an empty directory; pick a new path "
                        "(nothing was written)")
    config = bank.read_config(workdir)
    if config.prefix.reparam != "mlp":
        raise UserError(f"--workdir={workdir} has prefix.reparam={config.prefix.reparam!r}: "
                        "its prefix is already flat, there is no MLP to eject")
    run = bank.load_run(workdir)
    loaded, step, meta = run.base, run.step, run.meta
    _, flat = prefix.eject(run.prefix_module, run.prefix_params)

    flat_config = run.config  # the run's own config, made flat
    flat_config.prefix.reparam = "none"
    flat_config.prefix.dropout = 0.0
    # The trainable tree of the flat run, as its own train loop builds it (so it resumes); its
    # init values are replaced, so the cheapest init builds it.
    structure_config = flat_config.copy_and_resolve_references()
    structure_config.prefix.init = "random"
    setup = train.create_train_state(structure_config, loaded)
    trainable = dict(setup.state.trainable)
    if partition.count(trainable.get("base", {})):
        raise UserError(f"--workdir={workdir} also trains base weights; eject supports "
                        "prefix-only runs")
    trainable["prefix"] = jax.tree.map(lambda new, old: new.astype(old.dtype), flat,
                                       dict(setup.state.trainable["prefix"]))
    flat_state = train.TrainState(jax.numpy.asarray(step, jax.numpy.int32), trainable,
                                  setup.tx.init(trainable))

    source = os.path.join(os.path.abspath(workdir), "checkpoints")
    data_state = ocp.CheckpointManager(source, item_names=("state", "data", "meta")).restore(
        step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
    n_mlp = partition.count(run.prefix_params)
    n_flat = partition.count(flat)
    summary = {"source": os.path.abspath(workdir), "step": step, "mlp_params": n_mlp,
               "flat_params": n_flat}
    # Built under a temporary name and renamed when complete: an interrupted eject leaves no
    # half-written workdir at `out` that a later run would resume from.
    with workdir_io.new_directory(out) as staging:
        workdir_io.write_text(staging, "config.json", flat_config.to_json_best_effort(indent=2))
        mgr = checkpoint.manager(str(staging), flat_config.train.keep_checkpoints)
        # the flat run is its own experiment (prefix.reparam='none'): it resumes under its config
        new_meta = dict(meta, trainable_shapes=checkpoint.shapes(flat_state.trainable),
                        identity=run_identity.identity(flat_config))
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flat_state),
                                               data=ocp.args.JsonSave(data_state),
                                               meta=ocp.args.JsonSave(new_meta)))
        mgr.wait_until_finished()
        mgr.close()
        workdir_io.write_json(staging, "eject.json", summary)
    return summary


def main() -> None:
    if not _WORKDIR.value or not _OUT.value:
        cli.fail("--workdir and --out are required: the MLP run and a new workdir")
    summary = eject_workdir(_WORKDIR.value, _OUT.value)
    print(f"ejected step {summary['step']}: {summary['mlp_params']:,} MLP-prefix parameters -> "
          f"{summary['flat_params']:,} flat prefix parameters in {_OUT.value}")


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
