"""Loading Hugging Face safetensors checkpoints into Sluice's parameter pytree,
and caching the converted parameters with orbax-checkpoint.

Loading checks every shard's header (names, shapes, coverage) before reading
any data, then streams tensors shard by shard into one preallocated host buffer
per parameter and moves each finished parameter to the device, so peak host
memory stays near one copy of the weights. Any problem raises
`CheckpointError` naming the file; nothing is returned half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
import orbax.checkpoint as ocp
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from sluice.runtime.config import ModelConfig
from sluice.runtime.devices import default_device
from sluice.runtime.model import (PARAMS_LAYOUT, Params, checkpoint_shapes, fused_slot,
                                  param_shapes)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


# HF tensor name (layer index stripped) -> (our leaf, transpose?)
_LAYER_MAP = {
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "self_attn.o_proj.bias": ("bo", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}
# Gemma 3: norms around both blocks, per-head q/k norms; every norm weight is stored
# as w where the model multiplies by 1 + w (converted here to the multiplier).
_GEMMA3_LAYER_MAP = {
    **_LAYER_MAP,
    "post_attention_layernorm.weight": ("post_attn_norm", False),
    "pre_feedforward_layernorm.weight": ("mlp_norm", False),
    "post_feedforward_layernorm.weight": ("post_mlp_norm", False),
    "self_attn.q_norm.weight": ("q_norm", False),
    "self_attn.k_norm.weight": ("k_norm", False),
}
_TOP_MAP = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("final_norm", False),
    "lm_head.weight": ("lm_head", True),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def shard_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, from the index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: invalid index file: {e}") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files found")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard listed in the index is missing")
    return files


def _target(name: str, cfg: ModelConfig) -> tuple[str, int | None, bool] | None:
    """(leaf, layer or None, transpose) for an HF tensor name; None to ignore."""
    if name in _TOP_MAP:
        leaf, transpose = _TOP_MAP[name]
        if leaf == "lm_head" and cfg.tie_word_embeddings:
            return None  # tied: the head is the embedding
        return leaf, None, transpose
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _layer_map(cfg):
        leaf, transpose = _layer_map(cfg)[m.group(2)]
        return leaf, int(m.group(1)), transpose
    if name.endswith("rotary_emb.inv_freq"):
        return None  # a buffer older checkpoints saved; recomputed from the config
    return "", None, False  # unknown


def _layer_map(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    return _GEMMA3_LAYER_MAP if cfg.architecture == "Gemma3ForCausalLM" else _LAYER_MAP


def _hf_name(leaf: str, layer: int | None, cfg: ModelConfig) -> str:
    """The Hugging Face tensor name of one of our leaves (for error messages)."""
    if layer is None:
        return next(n for n, (lf, _) in _TOP_MAP.items() if lf == leaf)
    return f"model.layers.{layer}." + next(n for n, (lf, _) in _layer_map(cfg).items()
                                           if lf == leaf)


def _plan(files: list[Path], cfg: ModelConfig) -> dict[Path, list[tuple[str, str, int | None, bool]]]:
    """Validate all headers; map each file to (hf name, leaf, layer, transpose) entries."""
    shapes = checkpoint_shapes(cfg)
    flat_shapes = {**{k: v for k, v in shapes.items() if k != "layers"}, **shapes["layers"]}
    expected = {(leaf, layer) for leaf in shapes["layers"] for layer in range(cfg.num_layers)}
    expected |= {(leaf, None) for leaf in shapes if leaf != "layers"}
    plan: dict[Path, list] = {}
    seen: set = set()
    for f in files:
        entries = []
        try:
            with safe_open(str(f), framework="numpy") as st:
                for name in st.keys():
                    tgt = _target(name, cfg)
                    if tgt is None:
                        continue
                    leaf, layer, transpose = tgt
                    if (leaf, layer) not in expected:
                        raise CheckpointError(f"{f}: unexpected tensor {name!r} for {cfg.architecture} "
                                              f"with {cfg.num_layers} layers")
                    shape = tuple(st.get_slice(name).get_shape())
                    want = flat_shapes[leaf][1:] if layer is not None else flat_shapes[leaf]
                    want_hf = want[::-1] if transpose else want
                    if shape != tuple(want_hf):
                        raise CheckpointError(f"{f}: tensor {name!r} has shape {list(shape)}, "
                                              f"config.json implies {list(want_hf)}")
                    seen.add((leaf, layer))
                    entries.append((name, leaf, layer, transpose))
        except SafetensorError as e:
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from e
        plan[f] = entries
    missing = sorted(expected - seen, key=str)
    if missing:
        leaf, layer = missing[0]
        raise CheckpointError(f"{files[0].parent}: checkpoint lacks {len(missing)} tensors, "
                              f"first: {_hf_name(leaf, layer, cfg)!r}")
    return plan


def load_safetensors(path: str | Path, cfg: ModelConfig, dtype=jnp.float32,
                     progress: bool = True) -> Params:
    """Read a Hugging Face checkpoint directory into the parameter pytree."""
    path = Path(path)
    files = shard_files(path)
    plan = _plan(files, cfg)
    np_dtype = np.dtype(jnp.dtype(dtype))
    norm_offset = 1.0 if cfg.architecture == "Gemma3ForCausalLM" else 0.0
    shapes = param_shapes(cfg)
    layer_bufs = {k: np.empty(s, np_dtype) for k, s in shapes["layers"].items()}
    top: dict[str, np.ndarray] = {}
    total = sum(len(e) for e in plan.values())
    with tqdm(total=total, desc=f"loading {path.name}", unit="tensor", disable=not progress) as bar:
        for f, entries in plan.items():
            try:
                with safe_open(str(f), framework="numpy") as st:
                    for name, leaf, layer, transpose in entries:
                        t = st.get_tensor(name)
                        if norm_offset and leaf.endswith("norm"):
                            t = t.astype(np.float32) + norm_offset
                        t = (t.T if transpose else t).astype(np_dtype)
                        if layer is None:
                            top[leaf] = t
                        else:
                            stored, cols = fused_slot(cfg, leaf)
                            layer_bufs[stored][layer][..., cols] = t
                        bar.update(1)
            except SafetensorError as e:
                raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from e
    return to_device(top, layer_bufs)


def to_device(top: dict[str, np.ndarray], layers: dict[str, np.ndarray]) -> Params:
    """Converted host arrays as parameters, committed to the default device as
    `restore_params` returns them: JAX compiles another program for committed than
    for uncommitted arguments, so a second start (restored from orbax) would miss
    every step program a first start (converted) put in the compilation cache. The
    dicts are emptied as they go, so one host copy of each weight exists at a time.
    The default device is JAX's (`devices.default_device`)."""
    device = default_device()
    params = {k: jax.device_put(top.pop(k), device) for k in list(top)}
    params["layers"] = {k: jax.device_put(layers.pop(k), device) for k in list(layers)}
    return params


def fingerprint(path: Path, dtype) -> str:
    """Identity of a checkpoint's weights (names, sizes, mtimes) and dtype; ``path`` is
    a directory of shards or one weights file (GGUF)."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in ([path] if path.is_file() else shard_files(path)):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(str(jnp.dtype(dtype)).encode())
    h.update(PARAMS_LAYOUT.encode())
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SLUICE_CACHE_DIR", Path.home() / ".cache" / "sluice"))


def save_params(params: Params, directory: Path) -> None:
    """Write converted parameters with orbax (atomically: a crash leaves no partial cache)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory.resolve(), params)
        ckpt.wait_until_finished()


def restore_params(directory: Path, cfg: ModelConfig, dtype) -> Params:
    """Read parameters saved by `save_params`, checked against the config's shapes."""
    shapes = param_shapes(cfg)
    target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), shapes,
                                    is_leaf=lambda x: isinstance(x, tuple))
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(directory.resolve(), target)


def cache_entry(path: Path, dtype, cache_dir: Path | None = None) -> Path:
    """Where the converted parameters of ``path`` in ``dtype`` are cached."""
    return (cache_dir or default_cache_dir()) / f"{path.name}-{fingerprint(path, dtype)}"


def load_checkpoint(path: str | Path, cfg: ModelConfig, dtype=jnp.float32,
                    cache_dir: Path | None = None, progress: bool = True) -> tuple[Params, bool]:
    """Load parameters, through the orbax cache when possible.

    Returns (params, from_cache). ``cache_dir=None`` uses `default_cache_dir`.
    """
    path = Path(path)
    cached = cache_entry(path, dtype, cache_dir)
    if cached.is_dir():
        return restore_params(cached, cfg, dtype), True
    params = load_safetensors(path, cfg, dtype, progress)
    save_params(params, cached)
    return params, False
