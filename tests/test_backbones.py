"""The backbone protocol: each model declares its capabilities and its own sharding table, the
prefix and positions read those instead of model classes, and the loader registry sends each
kind of `model.path` to its loader."""

import json
import re

import jax
import pytest

from prefix_jax import configs, models, prefix
from prefix_jax.errors import UserError
from prefix_jax.models import bert, gpt2, llama, tiny
from prefix_jax.models.backbone import BackboneConfig, Capabilities
from prefix_jax.prefix import positions
from prefix_jax.training import partition, sharding
from tests.helpers import runlocal_config

EXPECTED = {
    "tiny": Capabilities(kind="decoder", positions="rotary",
                         prefix_modes=("kv", "hidden", "input")),
    "tiny-gpt2": Capabilities(kind="decoder", positions="learned", prefix_modes=("kv",)),
    "tiny-bert": Capabilities(kind="encoder", positions="learned", prefix_modes=("kv",)),
}


def _load(path: str) -> models.LoadedModel:
    return models.load(configs.model_config(path))


@pytest.mark.parametrize("path", list(EXPECTED))
def test_each_backbone_declares_capabilities_and_its_own_axes(path):
    loaded = _load(path)
    assert isinstance(loaded.config, BackboneConfig)
    assert loaded.config.capabilities == EXPECTED[path]
    # The model's own table names every matrix, alone; and it gives what the merged table of
    # all backbones gave before each model carried its own.
    own = sharding.regex_axes(loaded.config.logical_axes)
    merged = sharding.regex_axes(llama.LOGICAL_AXES + gpt2.LOGICAL_AXES + bert.LOGICAL_AXES)
    leaves = jax.tree_util.tree_flatten_with_path(loaded.params)[0]
    for key_path, leaf in leaves:
        name = partition.path_str(key_path)
        if leaf.ndim >= 2:
            assert any(re.search(p, name) for p, _ in loaded.config.logical_axes), name
        assert own(name, leaf.ndim) == merged(name, leaf.ndim), name


@pytest.mark.parametrize("path", ["tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("mode", ["hidden", "input"])
def test_an_unsupported_prefix_mode_is_refused_in_one_line(path, mode):
    config = runlocal_config(prefix__mode=mode, prefix__positions="after_prefix")
    with pytest.raises(UserError, match=rf"prefix.mode='{mode}' is not implemented") as err:
        prefix.build(config.prefix, _load(path).config)
    assert "\n" not in str(err.value) and "prefix.mode='kv'" in str(err.value)


def test_supported_modes_build():
    cfg = _load("tiny").config
    for mode in cfg.capabilities.prefix_modes:
        config = runlocal_config(prefix__mode=mode)
        assert prefix.build(config.prefix, cfg).mode == mode


def test_auto_positions_follow_the_capabilities():
    """`after_prefix` only for learned positions in a decoder (GPT-2) and for prompt tuning."""
    assert positions.resolve("auto", tiny.tiny_gpt2_config()) == "after_prefix"
    assert positions.resolve("auto", tiny.tiny_config()) == "zero"
    assert positions.resolve("auto", tiny.tiny_bert_config()) == "zero"
    assert positions.resolve("auto", tiny.tiny_config(), "input") == "after_prefix"


def test_text_init_needs_a_decoder():
    loaded = _load("tiny-bert")
    config = runlocal_config(prefix__init="text")
    module = prefix.build(config.prefix, loaded.config)
    with pytest.raises(UserError, match="reads a decoder's activations"):
        prefix.init(module, jax.random.key(0), config.prefix, loaded)


def _hf_dir(tmp_path, name: str, model_type: str):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(d)


def test_each_matcher_picks_its_loader(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    cases = {
        "tiny": "tiny decoder", "tiny-mha": "tiny decoder", "tiny-gpt2": "tiny decoder",
        "tiny-bert": "bert", "minilm": "bert", "smollm2": "gguf", str(gguf): "gguf",
        _hf_dir(tmp_path, "bert", "bert"): "bert",
        _hf_dir(tmp_path, "gpt2", "gpt2"): "hf gpt2",
        _hf_dir(tmp_path, "qwen", "qwen2"): "hf llama",
    }
    for path, name in cases.items():
        assert models.loader_for(path)[0] == name, path


def test_registry_loads_tiny_models_with_their_sources():
    for path, kind in [("tiny", "Llama"), ("tiny-gpt2", "GPT2"), ("tiny-bert", "Bert")]:
        loaded = models.load(configs.model_config(path), seed=3)
        assert type(loaded.module).__name__ == kind
        assert loaded.source == f"{path}(seed=3)"
        assert loaded.module.remat == "dots"  # the config's, not the loader's


def test_unknown_paths_get_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or directory; use 'smollm2'"):
        models.loader_for(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no such file or directory"):
        models.loader_for(str(tmp_path / "missing.gguf"))
    plain = tmp_path / "weights.bin"
    plain.write_bytes(b"")
    with pytest.raises(UserError, match=r"is neither a \.gguf file nor a directory") as err:
        models.loader_for(str(plain))
    assert "\n" not in str(err.value)
