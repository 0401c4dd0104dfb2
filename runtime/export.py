"""Writing a `Model` as a Hugging Face checkpoint directory (config.json,
model.safetensors, tokenizer.json, generation_config.json).

This turns the built-in random models into files that `load_model` and
`transformers` both read, which is how benchmarks run the reference
implementation on exactly Sluice's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401  (numpy bfloat16 for safetensors)
import numpy as np
from safetensors.numpy import save_file

from sluice.runtime.checkpoint import _LAYER_MAP, _TOP_MAP
from sluice.runtime.config import ModelConfig
from sluice.runtime.loader import Model
from sluice.runtime.model import checkpoint_shapes, fused_slot


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    """The ``config.json`` dict that `ModelConfig.from_hf_dict` maps back to ``cfg``."""
    if cfg.architecture != "LlamaForCausalLM":
        raise ValueError(f"architecture: export supports LlamaForCausalLM, not {cfg.architecture}")
    d = {
        "architectures": [cfg.architecture], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.qkv_bias,
        "hidden_act": "silu", "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids), "torch_dtype": dtype,
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        d["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor,
                             "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_max_position_embeddings}
    return d


def hf_state_dict(model: Model) -> dict[str, np.ndarray]:
    """Parameters under Hugging Face tensor names, in HF's [out, in] layout."""
    out: dict[str, np.ndarray] = {}
    for name, (leaf, transpose) in _TOP_MAP.items():
        if leaf in model.params:
            t = np.asarray(model.params[leaf])
            out[name] = np.ascontiguousarray(t.T if transpose else t)
    present = checkpoint_shapes(model.config)["layers"]
    for suffix, (leaf, transpose) in _LAYER_MAP.items():
        if leaf not in present:
            continue
        stored, cols = fused_slot(model.config, leaf)
        stacked = np.asarray(model.params["layers"][stored])[..., cols]
        for i in range(model.config.num_layers):
            t = stacked[i]
            out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(t.T if transpose else t)
    return out


def save_hf_checkpoint(model: Model, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = str(model.dtype)
    (path / "config.json").write_text(json.dumps(hf_config(model.config, dtype), indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": list(model.eos_token_ids)}))
    save_file(hf_state_dict(model), str(path / "model.safetensors"), metadata={"format": "pt"})
    model.tokenizer.hf.save(str(path / "tokenizer.json"))
    return path
