"""Prompt steps before and after issue 21's step shapes, in one process.

Run from the repository root::

    .venv/bin/python bench/step_shapes.py [--repeats 5]

On ``smollm2-135m-random`` (float32) with bench/throughput.py's engine sizes
(max_num_seqs 64, 512-token steps, 4 chunks per step), times
`ModelRunner.execute` of the same prompt steps under two layouts:

- ``whole``: the layout before: each chunk one sequence padded to the step's
  token bucket, and a decode group of max_num_seqs rows (all padding) in every
  step with prompt chunks;
- ``pieces``: the runtime's: chunks cut into `QUERY_PIECE`-row pieces and no
  decode group when the step has no decode rows.

Workloads: one 128-token prompt (the 1-request point's prefill step), four
128-token prompts (a full 512-token step). Variants run interleaved, call by
call; each time is the median of ``--repeats`` calls, as wall and CPU seconds
(on a shared machine CPU seconds are the steadier of the two). Writes
bench/results/step_shapes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from sluice.runtime import SamplingParams
from sluice.runtime.intake import Intake
from sluice.runtime.loader import load_model
from sluice.runtime.model_runner import ModelRunner, StepRow

BLOCK, MAX_LEN = 16, 256
OUT = Path(__file__).resolve().parent / "results" / "step_shapes.json"


def runner(model, layout: str, prefill_seqs: int) -> ModelRunner:
    r = ModelRunner(model, 128, BLOCK, max_num_seqs=64, max_num_batched_tokens=512,
                    max_prefill_seqs=prefill_seqs, max_model_len=MAX_LEN, backend="pallas")
    if layout == "whole":
        r.query_piece = None
        r.mixed_decode_buckets = (r.max_num_seqs,)
    return r


def prompt_rows(model, n: int, length: int) -> list[StepRow]:
    intake = Intake(model, MAX_LEN, seed=0)
    rng = np.random.default_rng(n)
    pages = -(-length // BLOCK)
    return [StepRow(intake.prepare(f"r{i}", {"prompt_token_ids": rng.integers(
        1, model.config.vocab_size, length).tolist()}, SamplingParams(temperature=0)).requests[0],
        length, list(range(i * pages, (i + 1) * pages))) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = load_model("smollm2-135m-random", dtype="float32")
    res = {"load_before": os.getloadavg(), "repeats": args.repeats, "workloads": {}}
    for name, n in (("1 x 128", 1), ("4 x 128", 4)):
        # before: a lone chunk took the 1-sequence prefill bucket
        runners = {layout: runner(model, layout, 1 if (layout == "whole" and n == 1) else 4)
                   for layout in ("whole", "pieces")}
        rows = prompt_rows(model, n, 128)
        times = {k: {"wall": [], "cpu": []} for k in runners}
        for k, r in runners.items():  # compile outside the timing
            r.execute(rows)
        for _ in range(args.repeats):
            for k, r in runners.items():
                w, c = time.perf_counter(), time.process_time()
                r.execute(rows)
                times[k]["wall"].append(time.perf_counter() - w)
                times[k]["cpu"].append(time.process_time() - c)
        med = {k: {m: float(np.median(v)) for m, v in t.items()} for k, t in times.items()}
        res["workloads"][name] = {"median_s": med, "shapes": {
            k: str(r.shape_for([], rows)) for k, r in runners.items()},
            "whole_over_pieces": {m: med["whole"][m] / med["pieces"][m] for m in ("wall", "cpu")}}
        print(f"[{name}] whole {med['whole']['wall'] * 1e3:.0f} ms wall / "
              f"{med['whole']['cpu'] * 1e3:.0f} ms CPU, pieces {med['pieces']['wall'] * 1e3:.0f} / "
              f"{med['pieces']['cpu'] * 1e3:.0f} ms: whole/pieces "
              f"{res['workloads'][name]['whole_over_pieces']['wall']:.2f}x wall, "
              f"{res['workloads'][name]['whole_over_pieces']['cpu']:.2f}x CPU, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        del runners
    res["load_after"] = os.getloadavg()
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
