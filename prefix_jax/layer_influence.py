r"""Which layers does a trained prefix act through? Measured, not argued: the dev loss of the
run with each layer's prefix removed, and with only that layer's prefix kept.

  python -m prefix_jax.layer_influence --workdir=runs/e2e_smollm2 --out=docs/layer_influence

Writes `OUT/layer_influence.json` (every loss), `OUT/layer_influence.md` (a table) and
`OUT/layer_influence.png` (per layer: the loss increase when it is removed, and the loss
decrease from the base when it alone keeps the prefix). Losses are the mean cross-entropy of the
target tokens of the first `--limit` dev pairs, teacher-forced. Removing a layer's prefix masks
its slots in that layer's attention (the same mask `prefix.layers` uses), so "every layer
removed" is the base model at the run's positions.
"""

from __future__ import annotations

import io
import os

from absl import flags

from prefix_jax import cli

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained prefix run's directory.",
                               flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Directory for the table, JSON and plot.",
                           flag_values=FLAGS)
_LIMIT = flags.DEFINE_integer("limit", 200, "First N dev pairs.", flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Dev pairs per forward pass.",
                                   flag_values=FLAGS)


def measure(workdir: str, limit: int, batch_size: int) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from prefix_jax import models, prefix
    from prefix_jax.data import pipeline
    from prefix_jax.errors import UserError
    from prefix_jax.serving import bank
    from prefix_jax.tasks import e2e, text_to_text
    from prefix_jax.tasks.base import Model

    run = bank.load_run(workdir)
    config, base = run.config, run.base
    if config.data.task != "e2e":
        raise UserError(f"--workdir={workdir} is a {config.data.task!r} run; layer influence "
                        "reads E2E dev pairs")
    if not run.prefix_module.length:
        raise UserError(f"--workdir={workdir} has no prefix (prefix.length=0)")
    n_layers = base.config.n_layers
    options = prefix.decode_options(config.prefix, base.config)
    model = Model(base.module, run.prefix_module, options)
    params = {"base": base.params, "prefix": run.prefix_params}
    trained = options.prefix_layers or tuple(range(n_layers))

    pairs = e2e.read_pairs(config.data.dir, "dev")[:limit]
    rows = text_to_text.tokenize_pairs(pairs, base.tokenizer, 10**6, "dev")
    pad = models.pad_id(base.tokenizer)
    batches = [pipeline.collate(rows[i:i + batch_size], config.data.bucket_multiple, pad)
               for i in range(0, len(rows), batch_size)]

    @jax.jit
    def loss_sum(params, batch, layer_on):
        return text_to_text.target_loss_sum(model, params, batch, layer_on=layer_on)

    def dev_loss(layers) -> float:
        on = np.zeros(n_layers, bool)
        on[list(layers)] = True
        sums = [loss_sum(params, {k: jnp.asarray(v) for k, v in b.items()}, jnp.asarray(on))
                for b in batches]
        return float(sum(s for s, _ in sums) / sum(c for _, c in sums))

    # The base model itself (no prefix slots at all), at the run's positions.
    empty = dataclasses.replace(run.prefix_module, length=0)
    empty_params = prefix.init(empty, jax.random.key(0))  # zero-size arrays
    base_model = Model(base.module, empty, options)

    @jax.jit
    def base_loss_sum(batch):
        return text_to_text.target_loss_sum(
            base_model, {"base": base.params, "prefix": empty_params}, batch)

    sums = [base_loss_sum({k: jnp.asarray(v) for k, v in b.items()}) for b in batches]
    result = {"workdir": os.path.abspath(workdir), "step": run.step, "dev_pairs": len(rows),
              "trained_layers": list(trained), "base": float(sum(s for s, _ in sums)
                                                              / sum(c for _, c in sums)),
              "full": dev_loss(trained), "all_removed": dev_loss(()), "layers": []}
    for layer in trained:
        result["layers"].append({
            "layer": layer,
            "removed": dev_loss([x for x in trained if x != layer]),
            "only": dev_loss([layer])})
    return result


def write(result: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefix_jax.training import workdir as workdir_io

    workdir_io.write_json(out, "layer_influence.json", result)
    full, base = result["full"], result["base"]
    lines = [f"Dev loss of {result['workdir']} (step {result['step']}, "
             f"{result['dev_pairs']} dev pairs): base {base:.4f}, full prefix {full:.4f}.", "",
             "| layer | loss without this layer's prefix | increase | loss with only this "
             "layer's prefix | decrease from base |", "|---|---|---|---|---|"]
    for row in result["layers"]:
        lines.append(f"| {row['layer']} | {row['removed']:.4f} | {row['removed'] - full:+.4f} | "
                     f"{row['only']:.4f} | {base - row['only']:+.4f} |")
    workdir_io.write_text(out, "layer_influence.md", "\n".join(lines) + "\n")

    layers = [r["layer"] for r in result["layers"]]
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    axes[0].bar(layers, [r["removed"] - full for r in result["layers"]], color="tab:red")
    axes[0].set_ylabel("loss increase\nwhen removed")
    axes[1].bar(layers, [base - r["only"] for r in result["layers"]], color="tab:blue")
    axes[1].set_ylabel("loss decrease from\nbase, this layer only")
    axes[1].set_xlabel("layer")
    fig.suptitle(f"Layer-wise influence of the prefix (base {base:.3f}, full {full:.3f})")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    workdir_io.write_bytes(out, "layer_influence.png", png.getvalue())
    plt.close(fig)


def main() -> None:
    if not _WORKDIR.value or not _OUT.value:
        cli.fail("--workdir and --out are required: the trained run and the output directory")
    if _LIMIT.value < 1 or _BATCH_SIZE.value < 1:
        cli.fail("--limit and --batch_size must be >= 1")
    if not os.path.isdir(_WORKDIR.value):
        cli.fail(f"--workdir={_WORKDIR.value} is not a directory; give a training run's workdir")
    if os.path.exists(_OUT.value) and not os.path.isdir(_OUT.value):
        cli.fail(f"--out={_OUT.value} is a file; give a directory for the table and plot")
    result = measure(_WORKDIR.value, _LIMIT.value, _BATCH_SIZE.value)
    write(result, _OUT.value)
    print(f"base {result['base']:.4f}  full {result['full']:.4f}  all removed "
          f"{result['all_removed']:.4f}; table and plot in {_OUT.value}")


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
