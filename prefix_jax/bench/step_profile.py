r"""Where the time of a prefix-tuning train step goes, op by op (XLA's own per-op profile).

  python -m prefix_jax.bench.step_profile [--steps=2] [--model=smollm2]

Builds the train step exactly as prefix_jax.bench.train does (the fixed batch 4 x 128, P=10),
runs it once to compile, then traces `--steps` steps with `jax.profiler`. Every op XLA ran is
one trace event; each is classified by the instructions of the computation it runs (from the
compiled HLO): `matmul` (a dot or convolution inside), `softmax/reduce` (an exponential or a
reduction), `layout` (copies, transposes), `gather/scatter/slice` (data movement by index,
dynamic slices of the stacked layer weights), `elementwise` (the rest). It prints the share of
each class, the ops that take most of the time, and the matmul time against the step.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time

from absl import flags

from prefix_jax import bench, cli

FLAGS = cli.flag_values()
_STEPS = flags.DEFINE_integer("steps", 2, "Traced steps.", flag_values=FLAGS)
_MODEL = flags.DEFINE_string("model", "smollm2", "model.path (tiny: a smoke run).",
                             flag_values=FLAGS)
_CONFIG = flags.DEFINE_string("config", bench.MAIN_EXPERIMENT, "The experiment FILE[:ARG].",
                              flag_values=FLAGS)
_TOP = flags.DEFINE_integer("top", 15, "How many of the slowest ops to list.", flag_values=FLAGS)

# Checked in this order: the first class whose pattern occurs in an op's computation wins.
CLASSES = (
    ("matmul", re.compile(r"\b(dot|convolution)\(")),
    ("softmax/reduce", re.compile(r"\b(exponential|reduce|log)\(")),
    ("gather/scatter/slice",
     re.compile(r"\b(gather|scatter|dynamic-slice|dynamic-update-slice|slice|pad)\(")),
    ("layout", re.compile(r"\b(copy|transpose)\(")),
)
_CONTROL = re.compile(r"^(while|call|conditional)(\.\d+)?$")


def computations(hlo: str) -> dict[str, str]:
    """Each computation's body by name, from HLO text."""
    out, name, lines = {}, None, []
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name, lines = head.group(1), []
        elif line.startswith("}") and name:
            out[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return out


def op_bodies(hlo: str) -> dict[str, str]:
    """Each instruction's name -> its own text plus the computations it calls (fused bodies)."""
    comps = computations(hlo)
    out = {}
    for body in comps.values():
        for line in body.splitlines():
            m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", line)
            if not m:
                continue
            text = line
            for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
                text += "\n" + comps.get(called, "")
            out[m.group(1)] = text
    return out


def classify(text: str) -> str:
    for name, pattern in CLASSES:
        if pattern.search(text):
            return name
    return "elementwise"


def trace_durations(trace_dir: str, names: set[str]) -> dict[str, tuple[float, int]]:
    """(total microseconds, number of runs) per op name, over the trace's complete events of
    known ops (an op inside a loop runs once per iteration)."""
    path = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    total: dict[str, float] = collections.defaultdict(float)
    runs: dict[str, int] = collections.defaultdict(int)
    for e in events:
        if e.get("ph") == "X" and e["name"] in names and not _CONTROL.match(e["name"]):
            total[e["name"]] += e.get("dur", 0.0)
            runs[e["name"]] += 1
    return {name: (total[name], runs[name]) for name in total}


def main() -> None:
    if _STEPS.value < 1 or _TOP.value < 1:
        cli.fail("--steps and --top must be >= 1")
    import jax

    from prefix_jax import models
    from prefix_jax.bench import train as bench_train

    config = bench_train.jax_config(_CONFIG.value, _MODEL.value)
    loaded = models.load(config.model)
    batch = bench_train.fixed_batch(loaded.config.vocab_size)
    system = bench_train.JaxSystem(loaded, config)
    hlo = system.step_fn.lower(system.state, system.setup.frozen, batch).compile().as_text()
    system.run([batch])
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        system.run([batch] * _STEPS.value)
        wall = (time.perf_counter() - start) / _STEPS.value
        jax.profiler.stop_trace()
        bodies = op_bodies(hlo)
        durations = trace_durations(trace_dir, set(bodies))
    print_profile(bodies, durations, _STEPS.value, wall, "step", _TOP.value)


def print_profile(bodies: dict[str, str], durations: dict[str, tuple[float, int]], calls: int,
                  wall: float, unit: str, top: int) -> None:
    """The per-class table and the slowest ops, per `unit` (one of `calls` traced calls)."""
    per_call = {name: us / 1e6 / calls for name, (us, _) in durations.items()}
    by_class: dict[str, float] = collections.defaultdict(float)
    for name, seconds in per_call.items():
        by_class[classify(bodies[name])] += seconds
    op_total = sum(per_call.values())
    print(f"{unit} {wall:.3f} s wall; ops traced {op_total:.3f} s per {unit} "
          f"(threads may overlap ops; the difference to wall is dispatch and waiting)")
    print(f"\n| class | s per {unit} | share of op time |\n|---|---|---|")
    for name, seconds in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {seconds:.3f} | {seconds / op_total:.0%} |")
    print(f"\n| the {top} slowest ops | class | s per {unit} | runs per {unit} | what it computes |"
          "\n|---|---|---|---|---|")
    for name, seconds in sorted(per_call.items(), key=lambda kv: -kv[1])[:top]:
        first = bodies[name].splitlines()[0].strip()
        shape = re.search(r"= (\S+)", first)
        print(f"| {name} | {classify(bodies[name])} | {seconds:.3f} | "
              f"{durations[name][1] / calls:g} | {shape.group(1)[:60] if shape else ''} |")


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
