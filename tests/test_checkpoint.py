"""Checkpoint loading: the orbax cache, and clear errors for bad checkpoints.

Every bad-input case loads through the default path (``use_cache=True``) and
must fail before anything is written to the cache.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import edit_json
from sluice.runtime import load_model
from sluice.runtime.checkpoint import CheckpointError, to_device
from sluice.runtime.config import ConfigError

IDS = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 200, 3, 17, 250]


def _load(path, cache_dir, **kw):
    return load_model(path, dtype="float32", use_cache=True, cache_dir=cache_dir,
                      progress=False, **kw)


def _assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        # placed alike: JAX compiles another program for committed and uncommitted
        # arguments, so a converted first start's step programs would never be found in
        # the compilation cache by an orbax-restored second start
        assert (x.committed, x.sharding) == (y.committed, y.sharding)


# --------------------------------------------------------------------------- cache


def test_second_load_comes_from_orbax_cache(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("qwen2_bias_sharded")
    cache = tmp_path / "cache"
    first = _load(path, cache)
    assert not first.from_cache
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith(path.name)

    second = _load(path, cache)
    assert second.from_cache
    assert second.config == first.config
    _assert_trees_equal(first.params, second.params)
    assert np.array_equal(first.logits(IDS), second.logits(IDS))

    # The cache is a faithful copy of the safetensors weights.
    direct = load_model(path, dtype="float32", use_cache=False, progress=False)
    _assert_trees_equal(direct.params, second.params)


def test_cache_is_keyed_on_weights_and_dtype(small_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    assert not _load(small_checkpoint, cache).from_cache
    assert _load(small_checkpoint, cache).from_cache

    # Another dtype is another entry.
    bf16 = load_model(small_checkpoint, dtype="bfloat16", cache_dir=cache, progress=False)
    assert not bf16.from_cache and bf16.params["embed"].dtype == np.dtype("bfloat16")
    assert len(list(cache.iterdir())) == 2

    # Rewritten weights invalidate the entry: the new values are loaded, not the stale ones.
    f = small_checkpoint / "model.safetensors"
    tensors = load_file(f)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, f, metadata={"format": "pt"})
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    reloaded = _load(small_checkpoint, cache)
    assert not reloaded.from_cache
    np.testing.assert_array_equal(np.asarray(reloaded.params["final_norm"]),
                                  tensors["model.norm.weight"])


def test_unwritable_cache_still_loads(small_checkpoint, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    m = _load(small_checkpoint, blocker / "cache")
    assert not m.from_cache and m.logits(IDS[:3]).shape == (3, m.config.vocab_size)


# --------------------------------------------------------------------------- bad input


def _expect(path, cache, exc, *needles):
    with pytest.raises(exc) as info:
        _load(path, cache)
    msg = str(info.value)
    for n in needles:
        assert str(n) in msg, f"{n!r} not in error message {msg!r}"
    assert not cache.exists() or not any(cache.iterdir()), "a failed load wrote to the cache"
    return msg


def test_missing_config(small_checkpoint, tmp_path):
    (small_checkpoint / "config.json").unlink()
    _expect(small_checkpoint, tmp_path / "c", FileNotFoundError,
            small_checkpoint / "config.json")


def test_invalid_config_json(small_checkpoint, tmp_path):
    (small_checkpoint / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    _expect(small_checkpoint, tmp_path / "c", ValueError, "config.json", "invalid JSON")


def test_missing_tokenizer(small_checkpoint, tmp_path):
    (small_checkpoint / "tokenizer.json").unlink()
    _expect(small_checkpoint, tmp_path / "c", FileNotFoundError,
            small_checkpoint / "tokenizer.json")


def test_no_safetensors(small_checkpoint, tmp_path):
    (small_checkpoint / "model.safetensors").unlink()
    _expect(small_checkpoint, tmp_path / "c", CheckpointError, small_checkpoint, "safetensors")


def test_unknown_architecture(small_checkpoint, tmp_path):
    edit_json(small_checkpoint / "config.json", architectures=["GPT2LMHeadModel"],
              model_type="gpt2")
    _expect(small_checkpoint, tmp_path / "c", ConfigError, "config.json", "GPT2LMHeadModel",
            "unsupported architecture")


@pytest.mark.parametrize("field, value, tensor, implied", [
    ("hidden_size", 96, "lm_head.weight", "[300, 96]"),
    ("intermediate_size", 100, "mlp.down_proj.weight", "[64, 100]"),
    ("vocab_size", 299, "lm_head.weight", "[299, 64]"),
])
def test_config_weight_shape_mismatch(small_checkpoint, tmp_path, field, value, tensor, implied):
    edit_json(small_checkpoint / "config.json", **{field: value})
    _expect(small_checkpoint, tmp_path / "c", CheckpointError,
            small_checkpoint / "model.safetensors", tensor, f"config.json implies {implied}")


def test_config_with_fewer_layers_than_weights(small_checkpoint, tmp_path):
    edit_json(small_checkpoint / "config.json", num_hidden_layers=1)
    _expect(small_checkpoint, tmp_path / "c", CheckpointError,
            small_checkpoint / "model.safetensors", "unexpected tensor", "model.layers.1.")


@pytest.mark.parametrize("keep", ["header_only", "most"])
def test_truncated_safetensors(small_checkpoint, tmp_path, keep):
    f = small_checkpoint / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:40] if keep == "header_only" else data[:-1000])
    _expect(small_checkpoint, tmp_path / "c", CheckpointError, f, "unreadable safetensors")


def test_missing_tensor(small_checkpoint, tmp_path):
    f = small_checkpoint / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    _expect(small_checkpoint, tmp_path / "c", CheckpointError, small_checkpoint,
            "lacks 1 tensors", "model.layers.1.self_attn.k_proj.weight")


def test_untied_config_needs_lm_head(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("qwen2_sliding_tied")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    edit_json(path / "config.json", tie_word_embeddings=False)
    _expect(path, tmp_path / "c", CheckpointError, path, "lm_head.weight")


@pytest.fixture
def sharded_copy(hf_checkpoint, tmp_path):
    _, src = hf_checkpoint("qwen2_bias_sharded")
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    return dst


def test_index_lists_missing_shard(sharded_copy, tmp_path):
    index = json.loads((sharded_copy / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded_copy / shard).unlink()
    _expect(sharded_copy, tmp_path / "c", CheckpointError, sharded_copy / shard, "missing")


def test_index_names_unknown_shard(sharded_copy, tmp_path):
    ipath = sharded_copy / "model.safetensors.index.json"
    index = json.loads(ipath.read_text())
    index["weight_map"]["model.norm.weight"] = "model-99999-of-99999.safetensors"
    ipath.write_text(json.dumps(index))
    _expect(sharded_copy, tmp_path / "c", CheckpointError, "model-99999-of-99999.safetensors")


def test_invalid_index_file(sharded_copy, tmp_path):
    (sharded_copy / "model.safetensors.index.json").write_text('{"metadata": {}}')
    _expect(sharded_copy, tmp_path / "c", CheckpointError, "model.safetensors.index.json",
            "weight_map")


@pytest.mark.parametrize("changes, kind", [
    # transformers >= 5 layout
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "yarn"),
    # transformers 4 layout
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
], ids=["rope_parameters", "rope_scaling"])
def test_invalid_rope_scaling_type(small_checkpoint, tmp_path, changes, kind):
    edit_json(small_checkpoint / "config.json", **changes)
    _expect(small_checkpoint, tmp_path / "c", ConfigError, "config.json", "rope_scaling", kind)


@pytest.mark.parametrize("changes", [
    {"max_window_layers": 1, "layer_types": ["full_attention", "sliding_attention"]},
    {"max_window_layers": 1, "layer_types": None},  # transformers 4: no layer_types
], ids=["layer_types", "max_window_layers"])
def test_qwen2_mixed_sliding_layers_rejected(hf_checkpoint, tmp_path, changes):
    """Qwen2 slides only layers >= max_window_layers; a mix is not silently misserved."""
    _, src = hf_checkpoint("qwen2_bias_sharded")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    edit_json(path / "config.json", **changes)
    _expect(path, tmp_path / "c", ConfigError, "config.json", "layer_types")


def test_to_device_places_weights_on_jaxs_default_device():
    """Converted weights go to JAX's default device, committed (as orbax restores
    them): the ``jax.default_device`` context's device or platform, not always the
    first device."""
    devices = jax.devices()
    assert len(devices) > 1  # conftest forces several CPU devices

    def placed() -> set:
        params = to_device({"embed": np.ones(3, np.float32)}, {"w": np.zeros((2, 2), np.float32)})
        leaves = jax.tree_util.tree_leaves(params)
        assert len(leaves) == 2 and all(x.committed for x in leaves)
        return {d for x in leaves for d in x.devices()}

    assert placed() == {jax.local_devices()[0]}
    with jax.default_device(devices[2]):
        assert placed() == {devices[2]}
    with jax.default_device("cpu"):
        assert placed() == {jax.local_devices(backend="cpu")[0]}
