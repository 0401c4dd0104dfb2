"""Constrained (a nested JSON schema) vs unconstrained decoding in one run (issue 19).

Run from the repository root::

    .venv/bin/python bench/structured.py [--batches 1,32] [--output-len 64]

On ``smollm2-135m-random`` with SmolLM2's real 49,152-token vocabulary (the
packaged GGUF's tokenizer, so each mask covers the whole vocabulary as with
the real model; the built-in random model's byte-level tokenizer would make
masks trivially cheap), for each batch size: the same prompts decoded
unconstrained and under `SCHEMA` (objects in an array in an object, enums,
bounded numbers, a string pattern), sampled at temperature 1 with fixed seeds,
``ignore_eos`` off. Reported per configuration:

- ``tokens_per_s``: generated tokens / wall time of the steps (warm: a first
  pass of each configuration, which compiles the step shapes it uses and fills
  the grammar cache, runs before the timed one);
- ``mask_ms_per_step``: host time in the engine's mask hook
  (`StructuredOutputManager.fill_masks`: matchers catching up with the last
  tokens, then all rows' masks) per step;
- ``hidden_fraction``: how much of that mask time the step did not pay:
  1 - (constrained step time - unconstrained step time) / mask time, clipped to
  [0, 1]. The hook runs after the forward is dispatched and before sampling, so
  on an accelerator the forward runs meanwhile; on a CPU host the "device" is
  the same cores, so little can hide.

Writes bench/results/structured.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np

from sluice.runtime import SamplingParams, load_model
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.gguf import open_gguf
from sluice.runtime.loader import PACKAGED_MODELS
from sluice.runtime.structured_output import StructuredOutputManager, StructuredOutputs

OUT = Path(__file__).resolve().parent / "results" / "structured.json"
ITEM = {"type": "object", "properties": {
    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
    "qty": {"type": "integer", "minimum": 1, "maximum": 999},
    "price": {"type": "number"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["sku", "qty", "price", "tags"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {
    "order_id": {"type": "integer"},
    "customer": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "tier": {"type": "string", "enum": ["free", "pro", "enterprise"]},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "tier", "address"], "additionalProperties": False},
    "items": {"type": "array", "items": ITEM, "minItems": 1, "maxItems": 8},
    "paid": {"type": "boolean"}},
    "required": ["order_id", "customer", "items", "paid"], "additionalProperties": False}


class TimedMasks:
    """Wraps the engine's mask hook to time it."""

    def __init__(self, manager: StructuredOutputManager):
        self.manager, self.seconds, self.calls = manager, 0.0, 0
        self.fill = manager.fill_masks
        manager.fill_masks = self

    def __call__(self, requests):
        t = time.perf_counter()
        try:
            return self.fill(requests)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
        timer: TimedMasks) -> dict:
    """One pass: every prompt at once, stepped to the end."""
    timer.seconds, timer.calls = 0.0, 0
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}-{time.monotonic_ns()}", {"prompt_token_ids": p}, sp)
    steps, tokens, texts = 0, 0, []
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                tokens += sum(len(c.token_ids) for c in o.outputs)
                texts += [c.text for c in o.outputs]
        steps += 1
    wall = time.perf_counter() - t
    return {"tokens": tokens, "steps": steps, "wall_s": wall, "tokens_per_s": tokens / wall,
            "step_ms": wall / steps * 1e3, "mask_ms_per_step": timer.seconds / steps * 1e3,
            "texts": texts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    tokenizer = open_gguf(PACKAGED_MODELS["smollm2-135m-instruct"]()).tokenizer
    model = dataclasses.replace(load_model("smollm2-135m-random"), tokenizer=tokenizer)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=max(batches), seed=0, warmup=False,
                                           max_model_len=args.input_len + args.output_len + 16,
                                           max_num_batched_tokens=max(512, args.input_len * 8)))
    timer = TimedMasks(engine.structured)
    rng = np.random.default_rng(0)
    constraint = StructuredOutputs(json=SCHEMA)
    results = []
    for b in batches:
        prompts = [rng.integers(0, 49152, args.input_len).tolist() for _ in range(b)]
        row = {"batch": b}
        for name, so in (("unconstrained", None), ("constrained", constraint)):
            params = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len,
                                     structured_outputs=so) for i in range(b)]
            run(engine, prompts, params, timer)  # first pass: grammar caches, any compile
            r = run(engine, prompts, params, timer)
            if so is not None:
                r["complete_json"] = sum(_parses(t) for t in r["texts"])
            del r["texts"]
            row[name] = r
        u, c = row["unconstrained"], row["constrained"]
        row["throughput_ratio"] = c["tokens_per_s"] / u["tokens_per_s"]
        extra = c["step_ms"] - u["step_ms"]
        mask = c["mask_ms_per_step"]
        row["hidden_fraction"] = float(np.clip(1 - extra / mask, 0, 1)) if mask > 0 else None
        results.append(row)
        print(json.dumps(row))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "cpus": __import__("os").cpu_count(),
                               "model": "smollm2-135m-random + SmolLM2 tokenizer",
                               "input_len": args.input_len, "output_len": args.output_len,
                               "schema": SCHEMA, "results": results}, indent=1))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


if __name__ == "__main__":
    main()
