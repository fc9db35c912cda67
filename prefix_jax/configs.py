"""Config pieces shared by experiment files, `parse_arg`, and validation with clear errors.

Experiment files (`experiments/*.py`) define `get_config(arg)` and build their ConfigDict from
the pieces here, so a field means the same thing in every experiment.
"""

from __future__ import annotations

import math
import os

import ml_collections

from prefix_jax.errors import UserError

# `prefix.positions` (prefix/positions.py says what each means)
POSITIONS = ("default", "auto", "zero", "after_prefix")
# the file names of an HF PEFT adapter directory (serving/peft_format.py)
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# names a folder holding one subfolder per task (e2e/, sst2/, dart/), as scripts/get_data.sh
# writes it
DATA_ENV = "PREFIX_JAX_DATA"


def default_data_dir(task: str) -> str:
    """Where a task's data is found without flags (an experiment's default `data.dir`).

    Search order, first match wins:
      1. the flag `--config.data.dir=DIR` (it replaces this default, so it always wins);
      2. `$PREFIX_JAX_DATA/<task>` when that environment variable is set (used even if the
         folder is missing, so a wrong setting is reported rather than silently skipped);
      3. `./data/<task>` in the current directory;
      4. `data/<task>` in the checkout (where `scripts/get_data.sh` writes by default);
      5. `../shared/data/<task>` beside the checkout (where the workplace keeps the data).
    When none exists, the checkout's `data/<task>`: the error then names the folder that
    scripts/get_data.sh fills.
    """
    root = os.environ.get(DATA_ENV)
    if root:
        return os.path.normpath(os.path.join(os.path.abspath(root), task))
    candidates = [os.path.join(os.getcwd(), "data", task),
                  os.path.join(_REPO_ROOT, "data", task),
                  os.path.join(_REPO_ROOT, "..", "shared", "data", task)]
    for path in candidates:
        if os.path.isdir(path):
            return os.path.normpath(path)
    return os.path.normpath(candidates[1])


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """`"prefix_len=10,runlocal"` -> ConfigDict, typed by `defaults` (big_vision style).

    A bare name sets a bool default to True; unknown names are an error.
    """
    result = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (arg or "").split(",")):
        name, eq, value = item.partition("=")
        if name not in defaults:
            raise UserError(f"config arg '{name}' is not one of {sorted(defaults)}: fix the "
                            "--config=FILE:ARGS string")
        default = defaults[name]
        if not eq:
            if not isinstance(default, bool):
                raise UserError(f"config arg '{name}' needs a value: write {name}=...")
            result[name] = True
            continue
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                result[name] = value.lower() in ("true", "1")
            else:
                result[name] = type(default)(value)
        except ValueError:
            raise UserError(f"config arg {name}={value!r} is not a "
                            f"{type(default).__name__}") from None
    return result


def model_config(path: str = "smollm2") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        path=path,  # 'smollm2' (packaged GGUF), 'tiny', 'tiny-mha', a .gguf file or an HF dir
        dtype="float32",  # activation dtype: float32 is fastest on CPU, bfloat16 on accelerators
        param_dtype="float32",  # storage dtype of the frozen base ('bfloat16' halves its memory;
        # 'int8': dense kernels int8 with per-channel scales, Llama family; the prefix and its
        # optimizer state stay float32)
        remat="dots",  # recompute in the backward pass: 'none', 'full' or 'dots' (keep only
        # weight-matmul outputs). 'dots' measured on the 2-core CPU, SmolLM2 4x128 prefix step:
        # 46% less temporary memory than 'none' and ~4% faster (docs/performance.md)
    ))


# Logical dimension name -> mesh axis or axes (None = replicated along it); see sharding.py and
# each backbone config's `logical_axes` for the names. FSDP shards the batch and every `embed`
# dimension of the base; tensor parallelism splits heads, MLP columns and the vocabulary; the
# (small) prefix is replicated.
DEFAULT_MESH_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("prefix", None),
    ("head_dim", None),
)


def mesh_config() -> ml_collections.ConfigDict:
    """Device mesh axes (see sharding.py); -1 = all remaining devices."""
    return ml_collections.ConfigDict(dict(
        data=-1,  # data parallel: batch rows split, parameters replicated
        fsdp=1,  # fully sharded data parallel: batch rows and base parameters split
        tensor=1,  # tensor parallel: attention heads and MLP columns split
        rules=DEFAULT_MESH_RULES,  # logical dimension name -> mesh axis (MaxText-style)
    ))


def distributed_config() -> ml_collections.ConfigDict:
    """Multi-host runs: JAX's own runtime (jax.distributed), one process per host."""
    return ml_collections.ConfigDict(dict(
        initialize="auto",  # 'auto' (on a multi-host TPU pod or when coordinator_address is
        # set), 'on' (always: JAX detects TPU/SLURM/Open MPI clusters) or 'off'
        coordinator_address="",  # host:port of process 0, for clusters JAX cannot detect
        num_processes=0,  # with coordinator_address: how many processes
        process_id=-1,  # with coordinator_address: this process's index
        stop_check_every=10,  # several processes: steps between their agreement on a
        # preemption stop (one tiny all-gather that waits for the step in flight)
    ))


def prefix_config(length: int = 10) -> ml_collections.ConfigDict:
    """The prefix variant (see prefix.py): every ablation of Li & Liang is one field here."""
    return ml_collections.ConfigDict(dict(
        mode="kv",  # 'kv': keys/values per layer; 'hidden': hidden states per layer, projected
        # by the layer's frozen norm and K/V; 'input': embeddings at the input (prompt tuning)
        length=length,  # number of prefix slots P (0 = the base model)
        layers="all",  # kv/hidden: 'all', 'top:K', 'bottom:K' (K layers or 'top:50%') or a
        # list like '0,3,-1'
        placement="prefix",  # 'prefix', or 'infix': seen only by the queries that predict the
        # target (from the last source token on), not by the source (Li & Liang, Table 5)
        reparam="none",  # 'none' (direct parameters) or 'mlp' (embedding -> MLP -> prefix)
        mlp_hidden=512,  # reparam='mlp': hidden width (Li & Liang: 512)
        dropout=0.0,  # dropout on the prefix during training (P-tuning v2: 0.1)
        init="random",  # 'random' (normal, std init_std), 'zero', 'vocab' (values of sampled
        # vocabulary tokens) or 'text' (values of the tokens of init_text)
        init_std=1.0,  # std of the random init (PEFT's nn.Embedding default is 1.0)
        init_text="table-to-text:",  # init='text': words whose activations start the prefix
        init_fit_steps=300,  # reparam='mlp' with init 'text'/'vocab': Adam steps fitting the MLP
        positions="default",  # real tokens start at 0 ('zero') or at P ('after_prefix', as
        # HF/PEFT, needed to export to / load from PEFT); 'default': after_prefix for decoders,
        # zero for encoders; 'auto' (old runs' default): zero for Llama (see positions.py)
        init_from_peft="",  # a PEFT prefix-tuning adapter dir to start from (overrides init;
        # needs mode kv and after_prefix positions), e.g. to evaluate a PEFT-trained adapter
    ))


def optim_config(lr: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        lr=lr,  # peak learning rate of AdamW
        warmup_steps=10,  # linear warmup from 0
        final_lr_fraction=0.0,  # linear decay to lr * this at train.num_steps
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,  # AdamW decoupled weight decay
        grad_clip_norm=1.0,  # global-norm clipping of trainable gradients; 0 = off
    ))


def train_config(num_steps: int, batch_size: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_steps=num_steps,  # optimizer steps in the whole run
        batch_size=batch_size,  # sequences per step, over all devices and hosts
        log_every=10,  # steps between train metrics in metrics.jsonl
        eval_every=0,  # steps between dev evaluations during training; 0 = only at the end
        checkpoint_every=100,  # steps between checkpoints (one is always written at the end)
        keep_checkpoints=2,  # newest checkpoints kept by orbax
    ))


def eval_config(num_examples: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_examples=num_examples,  # dev MRs decoded and scored (first N in file order); 0 = none
        batch_size=50,  # prompts decoded together
        max_new_tokens=64,  # decoding stops at EOS or after this many tokens
        num_beams=1,  # dev decoding during training: 1 = greedy, > 1 = beam search
        length_penalty=1.0,  # beam search: score = sum log p / length ** length_penalty
        test_at_end=False,  # after training, the whole test set with the reportable metrics
        test_num_beams=5,  # beam size of that test evaluation (Li & Liang: 5)
        test_batch_size=10,  # prompts decoded together in that evaluation (x beams rows)
        num_samples=5,  # generations printed to the terminal (all are saved in the workdir)
        eval_untuned=True,  # also score the base model without a prefix, for comparison
    ))


def evals_config(**evaluators: dict) -> ml_collections.ConfigDict:
    """`config.evals`: named evaluators as data, e.g. `evals_config(dev={"type": "generation"},
    dev_loss={"type": "loss"})` (tasks/evals.py lists the fields). A config without `evals`
    gets the evaluators `eval_config` has always meant: dev generation (or accuracy) during
    training, and the test set with the reportable metrics when `eval.test_at_end`."""
    return ml_collections.ConfigDict(evaluators)


def jsonl_data(data_dir: str = "", prompt: str = "{source}\nAnswer:"
               ) -> ml_collections.ConfigDict:
    """The `data` section of a `jsonl` run: text-to-text from your JSONL files
    (tasks/jsonl.py)."""
    return ml_collections.ConfigDict(dict(
        task="jsonl",
        dir=data_dir,  # folder the *_file paths below are relative to ('' = current directory)
        train_file="train.jsonl",  # one JSON object per line; '' = no such split
        dev_file="dev.jsonl",
        test_file="test.jsonl",
        source_field="source",  # the JSON field put into the prompt
        target_field="target",  # the text to generate: a string or a list of references
        prompt=prompt,  # the source's template, one {source}; the target follows after a space
        max_len=128,  # longest prompt+target in tokens; longer training rows are an error
        train_examples=0,  # use only the first N shuffled training pairs; 0 = all
        subsample_seed=0,  # which random N pairs train_examples takes (apart from seed)
        bucket_multiple=16,  # batches are padded to a multiple of this (bounds recompiles)
    ))


def jsonl_classification_data(data_dir: str = "") -> ml_collections.ConfigDict:
    """The `data` section of a `jsonl_classification` run: text -> label from your JSONL files
    (tasks/jsonl.py); pair it with `model.num_labels=0` (the label count of the train file)."""
    return ml_collections.ConfigDict(dict(
        task="jsonl_classification",
        dir=data_dir,  # folder the *_file paths below are relative to ('' = current directory)
        train_file="train.jsonl",  # one JSON object per line; '' = no such split
        dev_file="dev.jsonl",
        test_file="",  # '' = none (a test file needs labels too)
        text_field="text",  # the JSON field classified
        label_field="label",  # its class: a string or an integer
        labels=(),  # the label set, sorted; () = the train file's (the run records it here)
        max_len=64,  # tokens per text incl. special tokens; longer ones are truncated
        train_examples=0,  # use only N shuffled training rows; 0 = all
        subsample_seed=0,  # which random N rows train_examples takes (apart from seed)
        bucket_multiple=8,  # batches are padded to a multiple of this (bounds recompiles)
    ))


def task_dirs(config: ml_collections.ConfigDict) -> list[str]:
    """Task k's data directory: `data.dir`, then each of `data.extra_dirs` (comma-separated).
    A run with several tasks trains one prefix per task, rows of a batch mixing tasks."""
    extra = config.data.get("extra_dirs", "")  # absent from configs older than multi-task runs
    return [config.data.dir] + [d.strip() for d in extra.split(",") if d.strip()]


def check_peft_adapter(prefix_cfg: ml_collections.ConfigDict) -> None:
    """What `prefix.init_from_peft` needs that is known before the model loads, so such mistakes
    fail in a second (serving/peft_format.py reads the adapter itself)."""
    path = prefix_cfg.init_from_peft
    where = f"prefix.init_from_peft={path}"
    files = (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)
    if not all(os.path.isfile(os.path.join(path, f)) for f in files):
        raise UserError(f"{where} is not a PEFT adapter directory (needs {files[0]} and "
                        f"{files[1]}); point it at a directory written by peft's "
                        "save_pretrained or `python -m prefix_jax.export`")
    if prefix_cfg.positions == "zero":
        raise UserError(f"{where} with prefix.positions='zero': PEFT numbers real tokens from "
                        "P; set prefix.positions=after_prefix")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(config: ml_collections.ConfigDict) -> None:
    """Type and range checks of every field a user sets; raises UserError naming the field."""
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    p, t, o, e, d = config.prefix, config.train, config.optim, config.eval, config.data
    _check(is_int(p.length) and p.length >= 0,
           f"prefix.length={p.length!r}: must be an integer >= 0 (e.g. --config.prefix.length=10)")
    _check(p.positions in POSITIONS,
           f"prefix.positions={p.positions!r}: must be one of {POSITIONS}")
    _check(isinstance(p.get("init_from_peft", ""), str),
           f"prefix.init_from_peft={p.get('init_from_peft')!r}: must be a PEFT adapter dir")
    if p.get("init_from_peft"):
        check_peft_adapter(p)
    _check(p.init_std >= 0, f"prefix.init_std={p.init_std}: must be >= 0")
    for name, allowed in (("mode", ("kv", "hidden", "input")), ("placement", ("prefix", "infix")),
                          ("reparam", ("none", "mlp")),
                          ("init", ("random", "zero", "vocab", "text"))):
        _check(p[name] in allowed, f"prefix.{name}={p[name]!r}: must be one of {allowed}")
    _check(isinstance(p.dropout, float) and 0 <= p.dropout < 1,
           f"prefix.dropout={p.dropout!r}: must be a float in [0, 1)")
    _check(is_int(p.mlp_hidden) and p.mlp_hidden > 0,
           f"prefix.mlp_hidden={p.mlp_hidden!r}: must be an integer > 0")
    _check(is_int(p.init_fit_steps) and p.init_fit_steps >= 0,
           f"prefix.init_fit_steps={p.init_fit_steps!r}: must be an integer >= 0")
    for name in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        value = t[name]
        _check(is_int(value) and value > 0, f"train.{name}={value!r}: must be an integer > 0")
    _check(is_int(t.eval_every) and t.eval_every >= 0,
           f"train.eval_every={t.eval_every!r}: must be an integer >= 0 (0 = only at the end)")
    def is_finite(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    _check(is_finite(o.lr) and o.lr > 0, f"optim.lr={o.lr}: must be a finite number > 0")
    for name in ("b1", "b2"):
        _check(is_finite(o[name]) and 0 <= o[name] < 1,
               f"optim.{name}={o[name]}: must be in [0, 1) (Adam's moment decay)")
    _check(is_finite(o.eps) and o.eps > 0, f"optim.eps={o.eps}: must be a finite number > 0")
    _check(is_finite(o.grad_clip_norm) and o.grad_clip_norm >= 0,
           f"optim.grad_clip_norm={o.grad_clip_norm}: must be a finite number >= 0 (0 = off)")
    _check(is_finite(o.weight_decay),
           f"optim.weight_decay={o.weight_decay}: must be a finite number")
    _check(is_int(o.warmup_steps) and o.warmup_steps >= 0,
           f"optim.warmup_steps={o.warmup_steps!r}: must be an integer >= 0")
    _check(0 <= o.final_lr_fraction <= 1,
           f"optim.final_lr_fraction={o.final_lr_fraction}: must be in [0, 1]")
    _check(is_int(e.num_examples) and e.num_examples >= 0,
           f"eval.num_examples={e.num_examples!r}: must be an integer >= 0")
    _check(is_int(e.batch_size) and e.batch_size > 0,
           f"eval.batch_size={e.batch_size!r}: must be an integer > 0")
    _check(is_int(e.max_new_tokens) and e.max_new_tokens > 0,
           f"eval.max_new_tokens={e.max_new_tokens!r}: must be an integer > 0")
    for name in ("num_beams", "test_num_beams", "test_batch_size"):
        _check(is_int(e[name]) and e[name] > 0,
               f"eval.{name}={e[name]!r}: must be an integer > 0")
    _check(isinstance(e.test_at_end, bool),
           f"eval.test_at_end={e.test_at_end!r}: must be True or False")
    _check(is_int(d.max_len) and d.max_len > 1,
           f"data.max_len={d.max_len!r}: must be an integer > 1")
    _check(isinstance(d.get("extra_dirs", ""), str),
           f"data.extra_dirs={d.get('extra_dirs')!r}: must be a comma-separated string of dirs")
    _check(is_int(d.train_examples) and d.train_examples >= 0,
           f"data.train_examples={d.train_examples!r}: must be an integer >= 0 (0 = all)")
    _check(is_int(d.bucket_multiple) and d.bucket_multiple > 0,
           f"data.bucket_multiple={d.bucket_multiple!r}: must be an integer > 0 (batches are "
           "padded to a multiple of it; 1 = no padding beyond the longest row)")
    _check(is_int(config.seed) and config.seed >= 0,
           f"seed={config.seed!r}: must be an integer >= 0 (it seeds the prefix init and the "
           "batch order)")
    _check(is_int(d.get("subsample_seed", 0)) and d.get("subsample_seed", 0) >= 0,
           f"data.subsample_seed={d.get('subsample_seed')!r}: must be an integer >= 0")
    m = config.model
    _check(m.dtype in ("float32", "bfloat16"),
           f"model.dtype={m.dtype!r}: must be 'float32' or 'bfloat16'")
    _check(m.param_dtype in ("float32", "bfloat16", "int8"),
           f"model.param_dtype={m.param_dtype!r}: must be 'float32', 'bfloat16' or 'int8'")
    _check(m.remat in ("none", "full", "dots"),
           f"model.remat={m.remat!r}: must be 'none', 'full' or 'dots'")
    dist = config.distributed
    _check(is_int(dist.stop_check_every) and dist.stop_check_every > 0,
           f"distributed.stop_check_every={dist.stop_check_every!r}: must be an integer > 0")
    _check(dist.initialize in ("auto", "on", "off"),
           f"distributed.initialize={dist.initialize!r}: must be 'auto', 'on' or 'off'")
    if dist.coordinator_address:
        _check(is_int(dist.num_processes) and dist.num_processes > 0
               and is_int(dist.process_id) and 0 <= dist.process_id < dist.num_processes,
               f"distributed.coordinator_address is set: distributed.num_processes "
               f"({dist.num_processes!r}) must be > 0 and distributed.process_id "
               f"({dist.process_id!r}) in [0, num_processes)")
    _check(isinstance(config.trainable, str) and config.trainable,
           "trainable: must be a non-empty regex over parameter paths (e.g. '^prefix/')")
