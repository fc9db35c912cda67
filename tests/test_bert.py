"""BERT encoder parity with transformers (random weights, with and without a KV prefix; the real
all-MiniLM-L6-v2), and SST-2 classification through the shared train loop."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from prefix_jax import configs, models
from prefix_jax.errors import UserError
from prefix_jax.models import bert, hf_bert
from prefix_jax.models.core import KV, bidirectional_mask
from prefix_jax.tasks import sst2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2_DIR = configs.default_data_dir("sst2")


def _hf_bert_dir(tmp_path):
    """A random transformers BertModel (12 -> 4 heads, GELU, post-LN) saved as safetensors."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, type_vocab_size=2)
    model = transformers.BertModel(hf_cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # non-trivial LayerNorm params and token-type embeddings
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "token_type" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model, str(tmp_path)


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 99, size=(3, 7)).astype(np.int32)
    mask = np.ones((3, 7), np.int32)
    mask[1, 5:] = 0  # padded rows
    mask[2, 2:] = 0
    types = (np.arange(7)[None] >= 3).astype(np.int32).repeat(3, 0)
    return tokens, mask, types


def _ours(module, params, tokens, mask, types, kv=None, offset=0):
    positions = np.broadcast_to(np.arange(tokens.shape[1]) + offset, tokens.shape)
    n_prefix = 0 if kv is None else kv.k.shape[2]
    return np.asarray(module.apply({"params": params}, tokens, positions,
                                   bidirectional_mask(mask, n_prefix), prefix=kv,
                                   token_types=types))


def _real(x, mask):
    return x[mask.astype(bool)]  # padding positions' outputs are never read


def test_random_bert_matches_transformers(tmp_path):
    import torch

    ref, path = _hf_bert_dir(tmp_path)
    cfg, params = hf_bert.load_bert_dir(path, "float32", seed=0)
    tokens, mask, types = _batch()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                   token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    got = _ours(bert.Bert(cfg), params, tokens, mask, types)
    np.testing.assert_allclose(_real(got, mask), _real(want, mask), atol=1e-4, rtol=0)


@pytest.mark.parametrize("positions", ["zero", "after_prefix"])
def test_prefix_matches_transformers_cache(tmp_path, positions):
    """The prefix is what HF BERT sees as cached keys/values (P-tuning v2 / PEFT's
    past_key_values): every real token attends to it; real positions start at 0, or at P as
    HF does by default with a cache."""
    import torch
    from transformers import DynamicCache

    ref, path = _hf_bert_dir(tmp_path)
    cfg, params = hf_bert.load_bert_dir(path, "float32", seed=0)
    tokens, mask, types = _batch()
    n_prefix = 5
    rng = np.random.default_rng(1)
    shape = (cfg.n_layers, 1, n_prefix, cfg.n_heads, cfg.head_dim)
    kv = KV(rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32))

    cache = DynamicCache(config=ref.config)
    for layer in range(cfg.n_layers):  # HF layout [B, H, P, D]
        k = torch.tensor(kv.k[layer]).expand(3, -1, -1, -1).transpose(1, 2)
        v = torch.tensor(kv.v[layer]).expand(3, -1, -1, -1).transpose(1, 2)
        cache.update(k.contiguous(), v.contiguous(), layer)
    full_mask = np.concatenate([np.ones((3, n_prefix), np.int32), mask], axis=1)
    kwargs = {}
    if positions == "zero":
        kwargs["position_ids"] = torch.arange(7)[None].expand(3, -1)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(full_mask),
                   token_type_ids=torch.tensor(types), cache=cache,
                   **kwargs).last_hidden_state.numpy()
    offset = n_prefix if positions == "after_prefix" else 0
    got = _ours(bert.Bert(cfg), params, tokens, mask, types, kv, offset)
    np.testing.assert_allclose(_real(got, mask), _real(want, mask), atol=1e-4, rtol=0)
    without = _ours(bert.Bert(cfg), params, tokens, mask, types, None, offset)
    assert np.abs(_real(without - got, mask)).max() > 1e-2  # the prefix is really seen


@pytest.mark.real_model
def test_real_minilm_matches_transformers():
    """all-MiniLM-L6-v2 from its PyPI package: last hidden states and the mean-pooled sentence
    embedding equal transformers' BertModel on SST-2 dev sentences."""
    import torch
    from transformers import BertModel

    loaded = models.load(configs.model_config("minilm"))
    ref = BertModel.from_pretrained(hf_bert.minilm_dir()).eval()
    sentences = [e.sentence for e in sst2.read(SST2_DIR, "dev")[:4]]
    enc = loaded.tokenizer(sentences, padding=True, return_tensors="np")
    mask = enc.attention_mask.astype(np.int32)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(enc.input_ids),
                   attention_mask=torch.tensor(enc.attention_mask)).last_hidden_state.numpy()
    got = _ours(loaded.module, loaded.params, enc.input_ids, mask, enc.token_type_ids)
    np.testing.assert_allclose(_real(got, mask), _real(want, mask), atol=1e-4, rtol=0)
    m = mask[..., None].astype(np.float32)
    pooled_want = (want * m).sum(1) / m.sum(1)  # sentence-transformers' mean pooling
    pooled_got = (got * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(pooled_got, pooled_want, atol=1e-4, rtol=0)
    assert loaded.config.n_layers == 6 and loaded.config.d_model == 384


def test_mean_pooling_ignores_padding():
    cfg = bert.BertConfig(vocab_size=20, d_model=8, n_layers=1, n_heads=2, head_dim=4, d_ff=16)
    module = bert.Bert(cfg)
    params = bert.init_params(module, jax.random.key(0))
    hidden = np.random.default_rng(0).normal(size=(1, 4, 8)).astype(np.float32)
    seg = np.array([[1, 1, 0, 0]], np.int32)
    padded = hidden.copy()
    padded[:, 2:] = 1e3  # garbage where the padding is
    a = module.apply({"params": params}, hidden, seg, method=bert.Bert.classify)
    b = module.apply({"params": params}, padded, seg, method=bert.Bert.classify)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_sst2_runlocal_trains_and_writes_accuracy(tmp_path):
    from experiments import sst2_minilm_prefix
    from prefix_jax import train

    config = sst2_minilm_prefix.get_config("runlocal")
    result = train.train_and_evaluate(config, str(tmp_path))
    assert 0 <= result["eval/accuracy"] <= 100 and np.isfinite(result["eval/loss"])
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["eval/accuracy"] == result["eval/accuracy"]
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert any("eval/accuracy" in r for r in rows)
    assert sum("train/loss" in r for r in rows) == 3
    with open(tmp_path / "params.json") as f:
        paths = json.load(f)["trainable_paths"]
    assert sorted(paths) == ["base/classifier/bias", "base/classifier/kernel", "prefix/key",
                             "prefix/value"]


def test_sst2_bad_row_is_one_error_line(tmp_path):
    data = tmp_path / "sst2"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\na fine film\t1\nno label here\n")
    (data / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    with pytest.raises(UserError, match=r"train.tsv:3: expected 2 tab-separated fields"):
        sst2.read(str(data), "train")
    (data / "train.tsv").write_text("sentence\tlabel\na fine film\tpositive\n")
    with pytest.raises(UserError, match=r"train.tsv:2: label 'positive' is not 0 or 1"):
        sst2.read(str(data), "train")

    workdir = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "prefix_jax.main",
         f"--config={REPO}/experiments/sst2_minilm_prefix.py:runlocal",
         f"--config.data.dir={data}", f"--workdir={workdir}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "label 'positive' is not 0 or 1" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()


def test_sst2_task_needs_an_encoder(tmp_path):
    from experiments import sst2_minilm_prefix
    from prefix_jax import train

    data = tmp_path / "sst2"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"{split}.tsv").write_text("sentence\tlabel\n" + "a fine film\t1\n" * 8)
    config = sst2_minilm_prefix.get_config("runlocal").unlock()
    config.model.path = "tiny"
    config.data.dir = str(data)
    with pytest.raises(UserError, match="needs an encoder model"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
