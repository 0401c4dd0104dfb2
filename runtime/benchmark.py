"""In-process offline throughput measurement (``sluice bench throughput``).

Random prompts of a fixed length are generated to a fixed length with
``ignore_eos`` so every run does the same work; the timer covers the whole batch
after start-up (compilation happens at engine start or in an untimed warm-up
batch). The warm-up batch has prompts of the same lengths that share no token
with the timed ones: reusing the timed prompts made the timed batch hit the
prefix cache, which both flattered it and, with ``--no-warmup``, compiled the
step shapes of cache hits inside the timed batch (half the real throughput).
"""

from __future__ import annotations

import time

import numpy as np

from sluice.runtime.llm import LLM
from sluice.runtime.sampling_params import SamplingParams


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, input_len).tolist() for _ in range(num_prompts)]


def throughput(llm: LLM, prompts: list[list[int]], output_len: int,
               warmup_batch: bool = True) -> dict:
    """Generate ``output_len`` tokens for every prompt; return timing and token counts."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    if warmup_batch:  # compiles any shape the start-up warm-up did not cover
        vocab = llm.model.config.vocab_size
        llm.generate([{"prompt_token_ids": [(t + 1) % vocab for t in p]} for p in prompts],
                     params)
    start = time.perf_counter()
    outs = llm.generate(batch, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "num_prompts": len(prompts),
        "elapsed_s": elapsed,
        "output_tokens": generated,
        "prompt_tokens": prompt_tokens,
        "output_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": (generated + prompt_tokens) / elapsed,
        "requests_per_s": len(prompts) / elapsed,
    }
