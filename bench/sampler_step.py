"""Time of one sampler call per step, by sampling feature, at a given batch size.

The sampler is one compiled program for every feature mix (`sluice.runtime.sampler`),
so the question is what each feature costs at run time next to a greedy-only
batch in the same run (the peer): every row of a batch uses the feature named.
Logits are random, vocabulary 49152 (SmolLM2's), penalty rows carry 100 prompt
and 20 output tokens, and the penalty matrix is 2048 wide (the engine's default
max_model_len). A step is what the model runner pays: building the per-row
tensors on the host, then the call. Reports the best of ``--repeats`` calls (the least disturbed by
other load) and the one-off compile time per batch size.

    .venv/bin/python bench/sampler_step.py --batch 1 32
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sluice.runtime.sampler import ALL_ALLOWED, SamplingTensors, mask_words, pack_token_mask, sample
from sluice.runtime.sampling_params import SamplingParams

FEATURES = {
    "greedy": SamplingParams(temperature=0),
    "temperature": SamplingParams(temperature=0.8),
    "top_k_top_p_min_p": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
    "penalties": SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=0.5),
    "logprobs": SamplingParams(temperature=0, logprobs=5),
    "token_mask": SamplingParams(temperature=0),
}


def best_ms(f, repeats: int) -> float:
    jax.block_until_ready(f())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def measure(batch: int, vocab: int, width: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    logits = jnp.asarray(3 * rng.standard_normal((batch, vocab)).astype(np.float32))
    ones = jnp.full((batch, mask_words(vocab)), ALL_ALLOWED, jnp.int32)
    grammar = jnp.asarray(pack_token_mask(rng.random((batch, vocab)) < 0.1))
    fn = jax.jit(sample)
    start = time.perf_counter()
    fn.lower(logits, SamplingTensors.build([], batch, vocab, width), ones).compile()
    out = {"batch": batch, "compile_s": round(time.perf_counter() - start, 2)}
    for name, params in FEATURES.items():
        rows = [(params, i, 10, list(range(100)), list(range(20))) for i in range(batch)]
        mask = grammar if name == "token_mask" else ones
        step = lambda: fn(logits, SamplingTensors.build(rows, batch, vocab, width), mask)  # noqa: E731
        out[f"{name}_ms"] = round(best_ms(step, repeats), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    for b in args.batch:
        print(json.dumps(measure(b, args.vocab, args.width, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
