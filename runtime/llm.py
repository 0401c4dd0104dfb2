"""The offline Python API, shaped like vLLM's::

    from sluice.runtime import LLM, SamplingParams
    llm = LLM(model="tiny")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=16))
    print(outs[0].outputs[0].text)

``model`` is anything `load_model` takes (a built-in or packaged name, a
checkpoint directory, a ``.gguf`` file) or a loaded `Model`. Compiled step
shapes persist across processes in JAX's compilation cache
(`sluice.runtime.compile_cache`) unless ``compile_cache=False``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from sluice.runtime.compile_cache import enable_compile_cache
from sluice.runtime.engine import EngineConfig, LLMEngine, Prompt
from sluice.runtime.loader import Model, load_model
from sluice.runtime.outputs import RequestOutput
from sluice.runtime.sampling_params import SamplingParams

Messages = list[dict[str, Any]]


class LLM:
    """Load a model and run batches of prompts to completion."""

    def __init__(self, model: str | Path | Model = "tiny", *, dtype: str | None = None,
                 seed: int = 0, compile_cache: bool = True, **engine_kwargs: Any):
        if compile_cache:  # before anything compiles, so the warm-up's shapes are cached
            enable_compile_cache()
        self.model = model if isinstance(model, Model) else load_model(model, dtype=dtype,
                                                                       seed=seed)
        self.engine = LLMEngine(self.model, EngineConfig(**engine_kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        All prompts are validated before any is queued, so a bad one raises
        ``ValueError`` and nothing runs.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params: {len(sampling_params)} given for "
                             f"{len(prompts)} prompts")
        groups = [self.engine.prepare(str(next(self._ids)), p, sp)
                  for p, sp in zip(prompts, sampling_params)]
        for g in groups:
            self.engine.enqueue(g)
        order = {g.request_id: i for i, g in enumerate(groups)}
        results: list[RequestOutput | None] = [None] * len(groups)
        with tqdm(total=len(groups), desc="generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        bar.update(1)
        return results

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.tokenizer.encode(
            self.tokenizer.apply_chat_template(m), add_special_tokens=False)} for m in convs]
        return self.generate(prompts, sampling_params, use_tqdm)
