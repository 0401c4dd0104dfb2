"""Sluice runtime: model, checkpoints, tokenizers, and (later layers) the engine.

Entry points: `load_model` (built-in name or Hugging Face directory) returning a
`Model` with ``.logits(token_ids)``; `greedy_generate` for a one-at-a-time
reference continuation.
"""

from sluice.runtime.config import ModelConfig
from sluice.runtime.generate import greedy_generate
from sluice.runtime.loader import Model, load_model

__all__ = ["Model", "ModelConfig", "greedy_generate", "load_model"]
