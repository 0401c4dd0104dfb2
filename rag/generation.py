"""How generative agents reach Sluice's serving runtime.

``Generator`` is the one call agents need: ``await generate(requests)`` runs a batch of
``GenerationRequest(context, question, max_tokens, seed)`` and returns one ``Generation``
(text, prompt and completion token counts, mean token log-probability) per request, in
order. Requests of one batch run concurrently, so several answerer agents share engine steps.

- ``EngineGenerator(AsyncEngine)``: streams through the server's own ``AsyncEngine`` (the
  HTTP route uses the engine that serves ``/v1/completions``), so RAG traffic is scheduled
  with the rest.
- ``LLMGenerator(LLM)``: the offline ``LLM`` for the Python API, tests and benchmarks; the
  blocking ``LLM.generate`` runs on a worker thread under a lock (``LLM`` is not re-entrant).

The prompt is ``"Context: <passages>\\nQuestion: <q>\\nAnswer:"``; the context is cut, in
tokens, so prompt plus ``max_tokens`` fits the model's ``max_model_len``. Agent 0 decodes
greedily; agent ``i > 0`` samples at temperature ``SAMPLE_TEMPERATURE`` with seed ``i`` so
parallel agents can disagree and a vote means something.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sluice.runtime.async_engine import AsyncEngine
from sluice.runtime.llm import LLM
from sluice.runtime.sampling_params import SamplingParams
from sluice.runtime.tokenizer import Tokenizer

SAMPLE_TEMPERATURE = 0.7


@dataclass(frozen=True)
class GenerationRequest:
    context: str
    question: str
    max_tokens: int
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    mean_logprob: float


class Generator(Protocol):
    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]: ...


def build_prompt(tokenizer: Tokenizer, request: GenerationRequest,
                 max_model_len: int) -> list[int]:
    """Prompt token ids with the context cut to leave room for the question and answer."""
    tail = tokenizer.encode(f"\nQuestion: {request.question}\nAnswer:", add_special_tokens=False)
    head = tokenizer.encode(f"Context: {request.context}")
    room = max_model_len - request.max_tokens - len(tail)
    if room < 1:
        raise ValueError(f"max_tokens: {request.max_tokens} plus the question leave no room "
                         f"for context within max_model_len={max_model_len}")
    return head[:room] + tail


def sampling(request: GenerationRequest) -> SamplingParams:
    if request.seed == 0:
        return SamplingParams(max_tokens=request.max_tokens, temperature=0.0, logprobs=0)
    return SamplingParams(max_tokens=request.max_tokens, temperature=SAMPLE_TEMPERATURE,
                          seed=request.seed, logprobs=0)


def _generation(prompt_tokens: int, text: str, logprobs: list | None) -> Generation:
    values = [lp.logprob for lp in logprobs or []]
    mean = sum(values) / len(values) if values else float("-inf")
    return Generation(text.strip(), prompt_tokens, len(values), mean)


class EngineGenerator:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.tokenizer = engine.model.tokenizer
        self.max_model_len = engine.max_model_len
        self._ids = itertools.count()

    async def _one(self, request: GenerationRequest) -> Generation:
        ids = build_prompt(self.tokenizer, request, self.max_model_len)
        last = None
        stream = await self.engine.generate({"prompt_token_ids": ids}, sampling(request),
                                            request_id=f"rag-{next(self._ids)}")
        async for out in stream:
            last = out
        comp = last.outputs[0]
        return _generation(len(ids), comp.text, comp.logprobs)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))


class LLMGenerator:
    def __init__(self, llm: LLM):
        self.llm = llm
        self._lock = threading.Lock()

    def _run(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        limit = self.llm.engine.max_model_len
        prompts = [{"prompt_token_ids": build_prompt(self.llm.tokenizer, r, limit)}
                   for r in requests]
        with self._lock:
            outs = self.llm.generate(prompts, [sampling(r) for r in requests])
        return [_generation(len(p["prompt_token_ids"]), o.outputs[0].text, o.outputs[0].logprobs)
                for p, o in zip(prompts, outs)]

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return await asyncio.to_thread(self._run, requests)
