"""prefix_jax from Python: plain functions over the pieces the command-line tools use.

    from prefix_jax import api

    api.train(config, "runs/x")       # train.train_and_evaluate, as python -m prefix_jax.main
    run = api.load("runs/x")          # or api.load(["runs/a", "runs/b"]): a bank of prefixes
    api.generate(run, ["name[The Eagle], food[Indian]"])  # as python -m prefix_jax.generate
    kv = api.prefix_kv(run)           # the prefix's keys/values per layer, numpy

`load` is `serving.bank.load`, `generate` is `serving.decoding.generate` with the settings the
generate tool builds, `train` is `train.train_and_evaluate`: no second code path, so what the
API returns is what the tools write. Mistakes a user can make (a bad workdir, a prefix row out of
range) raise `prefix_jax.errors.UserError` with the one-line message the tools print; a decoding
setting out of range raises ValueError.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from prefix_jax import models, prefix
from prefix_jax.models.core import KV
from prefix_jax.serving import bank as bank_lib
from prefix_jax.serving import decoding


@dataclasses.dataclass(frozen=True)
class Handle:
    """Trained prefixes on their frozen base: what `load` returns and the other functions take.

    Row i of the bank is `workdirs[i]`'s prefix (a multi-task run of T tasks gives T rows)."""

    workdirs: tuple[str, ...]
    bank: bank_lib.Bank

    @property
    def base(self) -> models.LoadedModel:
        """The frozen base: `config`, `module`, `params`, `tokenizer`, `source`."""
        return self.bank.base

    @property
    def tokenizer(self):
        return self.bank.base.tokenizer

    @property
    def prefixes(self) -> KV:
        """Every row's prefix keys/values, `KV([L, N, P, K, D])` (JAX arrays)."""
        return self.bank.prefixes

    @property
    def options(self) -> prefix.DecodeOptions:
        """Positions (`position_offset`), prefix layers and placement, shared by every row."""
        return self.bank.options

    @property
    def configs(self) -> tuple[ml_collections.ConfigDict, ...]:
        """Each run's config (its workdir's config.json)."""
        return self.bank.configs

    @property
    def num_rows(self) -> int:
        return int(self.bank.prefixes.k.shape[1])


def load(workdirs: str | os.PathLike | Sequence[str | os.PathLike]) -> Handle:
    """The newest checkpoint of one workdir, or of several runs of one base model as a bank (one
    prefix row each, in order), with the base model and its tokenizer loaded once."""
    if isinstance(workdirs, (str, os.PathLike)):
        workdirs = [workdirs]
    paths = tuple(os.fspath(w) for w in workdirs)
    return Handle(paths, bank_lib.load(list(paths)))


def generate(handle: Handle, sources: Sequence[str], *, prefix_rows: Sequence[int] | None = None,
             num_beams: int = 1, length_penalty: float = 1.0, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             max_new_tokens: int = 64, seed: int = 0, batch_size: int = 16,
             raw: bool = False) -> list[str]:
    """One generation per source, as `python -m prefix_jax.generate` makes them.

    sources: task sources (an E2E MR, a JSONL source), put into the prompt each row's run
        trained with; with `raw=True`,
        exact prompt texts instead (no formatting).
    prefix_rows: the bank row (0-based, the order of `load`'s workdirs) each source uses, so
        several prefixes share one batch; None = row 0 for every source.
    num_beams > 1: beam search (`length_penalty`); do_sample: sampling with `temperature`,
        `top_k` (0 = off), `top_p` (1 = off) and `seed`; else greedy. Decoding stops at the
        tokenizer's EOS or after `max_new_tokens`; `batch_size` prompts are decoded together.
    """
    from prefix_jax import tasks

    sources = list(sources)
    if not sources:
        return []
    rows = [0] * len(sources) if prefix_rows is None else list(prefix_rows)
    if len(rows) != len(sources):
        raise ValueError(f"{len(rows)} prefix_rows for {len(sources)} sources; give one each")
    bank_lib.assignments(handle.num_rows, rows)
    settings = decoding.settings_for(
        handle.tokenizer, max_new_tokens, prefix=handle.options, num_beams=num_beams,
        length_penalty=length_penalty, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p)
    if raw:
        prompts = sources
    else:  # each row's prompt as its run trained on it (E2E's MR prompt, a JSONL data.prompt)
        prompt_of = [tasks.get(c, training=False).prompt for c in handle.configs]
        prompts = [prompt_of[r](s) for s, r in zip(sources, rows)]
    return decoding.generate(handle.base.module, handle.base.params, handle.prefixes,
                             handle.tokenizer, prompts, batch_size, settings, prefix_rows=rows,
                             seed=seed)


def prefix_kv(handle: Handle, row: int = 0) -> KV:
    """Row `row`'s prefix as the keys and values every layer attends to: `KV(k, v)` of float32
    numpy arrays `[L, P, n_kv_heads, head_dim]` (what a PEFT adapter stores, per layer). Keys
    carry no rotary position: they are what the attention reads before the real tokens."""
    bank_lib.assignments(handle.num_rows, [row])
    kv = handle.bank.row(row)
    return KV(np.asarray(kv.k[:, 0], np.float32), np.asarray(kv.v[:, 0], np.float32))


def train(config: dict | ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train and evaluate one run (`train.train_and_evaluate`, what `python -m prefix_jax.main`
    calls): `config` is a whole config, as an experiment's `get_config(arg)` returns it, or that
    as a plain dict (`get_config(...).to_dict()`, edited); rerunning resumes. Returns the final
    metrics (also in `workdir/results.json`)."""
    from prefix_jax import train as train_lib

    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    return train_lib.train_and_evaluate(config, os.fspath(workdir))
