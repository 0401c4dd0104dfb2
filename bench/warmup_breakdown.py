"""Where an engine's start goes: model load, then engine construction with warm-up,
split by JAX's own compile events (tracing, lowering to MLIR, backend compile) and
the persistent compilation cache's hits and misses.

Run from the repository root, twice on the same fresh directories (the first run
converts the model and fills the caches, the second should hit every program)::

    export SLUICE_CACHE_DIR=$(mktemp -d)
    .venv/bin/python bench/warmup_breakdown.py --model smollm2-135m-instruct --jax-cache DIR

Prints wall and process CPU seconds (CPU-seconds are the figure to compare on a
shared machine) and the summed duration and count of every ``jax.monitoring``
event recorded.
"""

from __future__ import annotations

import argparse
import collections
import time

import jax

from sluice.runtime.compile_cache import enable_compile_cache
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--jax-cache", default=None,
                    help="persistent compilation cache directory (default: none)")
    args = ap.parse_args()
    seconds: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()

    def on_duration(event: str, duration: float, **_) -> None:
        seconds[event] += duration
        counts[event] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(lambda event, **_: counts.update([event]))
    if args.jax_cache:
        enable_compile_cache(args.jax_cache)
    t0, c0 = time.perf_counter(), time.process_time()
    model = load_model(args.model, progress=False)
    t1 = time.perf_counter()
    LLMEngine(model, EngineConfig(max_model_len=args.max_model_len))
    t2 = time.perf_counter()
    print(f"load {t1 - t0:.1f} s, engine with warm-up {t2 - t1:.1f} s, "
          f"process CPU {time.process_time() - c0:.1f} s")
    for event in sorted(counts, key=lambda e: -seconds[e]):
        if "compil" in event:
            print(f"  {seconds[event]:8.2f} s  x{counts[event]:<4} {event}")


if __name__ == "__main__":
    main()
