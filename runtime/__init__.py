"""Sluice runtime: model, checkpoints, tokenizers, the paged engine and its APIs.

Entry points:
- `LLM` + `SamplingParams`: offline batches (``LLM("tiny").generate(prompts, params)``);
- `AsyncEngine`: streaming generation for servers;
- `load_model`: a built-in name or a Hugging Face directory to a `Model` with
  ``.logits(token_ids)``; `greedy_generate`: the one-at-a-time reference decoder.
"""

from sluice.runtime.async_engine import AsyncEngine
from sluice.runtime.config import ModelConfig
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.generate import greedy_generate
from sluice.runtime.llm import LLM
from sluice.runtime.loader import Model, load_model
from sluice.runtime.outputs import CompletionOutput, RequestOutput
from sluice.runtime.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "CompletionOutput", "EngineConfig", "LLMEngine", "Model",
           "ModelConfig", "RequestOutput", "SamplingParams", "greedy_generate", "load_model"]
