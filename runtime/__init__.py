"""Sluice runtime: model, checkpoints, tokenizers, the paged engine and its APIs.

Entry points:
- `LLM` + `SamplingParams`: offline batches (``LLM("tiny").generate(prompts, params)``);
- `AsyncEngine`: streaming generation for servers;
- `load_model`: a built-in name or a Hugging Face directory to a `Model` with
  ``.logits(token_ids)``; `greedy_generate`: the one-at-a-time reference decoder.

They are imported on first use (PEP 562 ``__getattr__``), not with the package:
importing any ``sluice.runtime.*`` module runs this file, and eager imports here made
every command, ``sluice --help`` included, wait for JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "llm", "AsyncEngine": "async_engine", "CompletionOutput": "outputs",
    "EngineConfig": "engine", "LLMEngine": "engine", "Model": "loader",
    "ModelConfig": "config", "RequestOutput": "outputs", "SamplingParams": "sampling_params",
    "greedy_generate": "generate", "load_model": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
