"""Speculative decoding (n-gram drafts) vs plain decoding in one run (issue 21).

Run from the repository root::

    .venv/bin/python bench/spec_decode.py [--model smollm2-135m-instruct] [--k 4]
        [--concurrency 1,8] [--max-tokens 64] [--rounds 2]

Two workloads of greedy chat requests (the model's chat template):

- ``quote``: answers that quote their prompt, as the RAG generative path
  produces: a SQuAD 2.0 paragraph (bench/data/squad2-dev-subset.json) with the
  instruction to repeat it word for word, or to copy out the sentences that
  answer a question about it;
- ``chat``: free-form chat questions with nothing to copy, where n-gram drafts
  should rarely be accepted (and cost their extra rows).

For each workload and concurrency ``c`` (``c`` requests in flight at once; at
``c = 1`` two requests one after the other), the same requests run through a
plain engine and one with ``num_speculative_tokens = k`` in the same process
(they share every plain step program). A first pass of each compiles the step
shapes it uses; then ``--rounds`` timed passes alternate plain and spec, so load
changes hit both. Reported per point: generated tokens per second (tokens over
the wall time of the timed passes), the acceptance rate (accepted / draft
tokens), accepted tokens per draft, engine steps, the spec/plain ratio, and
whether the outputs are identical (greedy: they must be).

Writes bench/results/spec_decode.json (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from sluice.runtime import SamplingParams, load_model
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.loader import Model

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "spec_decode.json"
SQUAD = ROOT / "data" / "squad2-dev-subset.json"
CHAT = [
    "What are three tips for someone learning to cook at home?",
    "Write a short poem about the sea at night.",
    "Why do people enjoy travelling to new places?",
    "Give me some ideas for a birthday party for a ten-year-old.",
    "How can I become better at managing my time?",
    "Tell me a short story about a robot who learns to paint.",
    "What should I pack for a weekend hiking trip?",
    "Explain why exercise is good for your health.",
]


def quote_messages(n: int) -> list[list[dict]]:
    """``n`` conversations over distinct SQuAD paragraphs: even ones ask for the
    passage repeated, odd ones for the sentences answering one of its questions."""
    data = json.loads(SQUAD.read_text())["data"]
    paragraphs = [p for article in data for p in article["paragraphs"]
                  if 400 <= len(p["context"]) <= 900 and p["qas"]]
    out = []
    for i, p in enumerate(paragraphs[:n]):
        if i % 2 == 0:
            text = f"Repeat the following passage word for word.\n\n{p['context']}"
        else:
            text = (f"Passage: {p['context']}\n\nQuestion: {p['qas'][0]['question']}\n"
                    "Copy out, word for word, the sentences of the passage that answer "
                    "the question.")
        out.append([{"role": "user", "content": text}])
    return out


def chat_messages(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": CHAT[i % len(CHAT)]}] for i in range(n)]


def encode(model: Model, conversations: list[list[dict]]) -> list[list[int]]:
    tok = model.tokenizer
    return [tok.encode(tok.apply_chat_template(m), add_special_tokens=False)
            for m in conversations]


def run(engine: LLMEngine, prompts: list[list[int]], concurrency: int, max_tokens: int
        ) -> dict:
    """Greedy requests for ``prompts``, ``concurrency`` at a time (a batch is added
    once the previous one finished); wall time, tokens, steps, drafts, outputs."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    before = engine.scheduler.spec_stats
    drafts0, drafted0, accepted0 = (before.num_drafts, before.num_draft_tokens,
                                    before.num_accepted_tokens)
    outputs: dict[str, list[int]] = {}
    steps = 0
    start = time.perf_counter()
    for lo in range(0, len(prompts), concurrency):
        for i in range(lo, min(lo + concurrency, len(prompts))):
            engine.add_request(f"r{i:03d}", {"prompt_token_ids": prompts[i]}, params)
        while engine.has_unfinished_requests():
            steps += 1
            for o in engine.step():
                if o.finished:
                    outputs[o.request_id] = o.outputs[0].token_ids
    wall = time.perf_counter() - start
    s = engine.scheduler.spec_stats
    return {"wall_s": wall, "tokens": sum(len(t) for t in outputs.values()), "steps": steps,
            "drafts": s.num_drafts - drafts0, "draft_tokens": s.num_draft_tokens - drafted0,
            "accepted_tokens": s.num_accepted_tokens - accepted0,
            "outputs": [outputs[k] for k in sorted(outputs)]}


def point(engines: dict[str, LLMEngine], prompts: list[list[int]], concurrency: int,
          max_tokens: int, rounds: int) -> dict:
    """One workload at one concurrency: a warm pass per engine, then ``rounds``
    timed passes alternating plain and spec; totals per engine."""
    for engine in engines.values():
        run(engine, prompts, concurrency, max_tokens)
    totals: dict[str, dict] = {}
    for _ in range(rounds):
        for name, engine in engines.items():
            r = run(engine, prompts, concurrency, max_tokens)
            t = totals.setdefault(name, {**r, "wall_s": 0.0, "tokens": 0, "steps": 0,
                                         "drafts": 0, "draft_tokens": 0,
                                         "accepted_tokens": 0})
            for key in ("wall_s", "tokens", "steps", "drafts", "draft_tokens",
                        "accepted_tokens"):
                t[key] += r[key]
    row = {"concurrency": concurrency, "requests": len(prompts),
           "identical": totals["plain"]["outputs"] == totals["spec"]["outputs"]}
    for name, t in totals.items():
        del t["outputs"]
        t["tokens_per_s"] = t["tokens"] / t["wall_s"]
        if t["draft_tokens"]:
            t["acceptance_rate"] = t["accepted_tokens"] / t["draft_tokens"]
            t["accepted_per_draft"] = t["accepted_tokens"] / t["drafts"]
        row[name] = t
    row["ratio"] = row["spec"]["tokens_per_s"] / row["plain"]["tokens_per_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workloads", default="quote,chat")
    ap.add_argument("--output", type=Path, default=OUT)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    model = load_model(args.model)
    config = dict(max_num_seqs=max(levels), max_num_batched_tokens=256, max_model_len=512,
                  seed=0, warmup=False)
    engines = {"plain": LLMEngine(model, EngineConfig(**config)),
               "spec": LLMEngine(model, EngineConfig(**config,
                                                     num_speculative_tokens=args.k))}
    builders = {"quote": quote_messages, "chat": chat_messages}
    results = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for workload in args.workloads.split(","):
        for c in levels:
            prompts = encode(model, builders[workload](max(c, 2)))
            row = {"workload": workload, **point(engines, prompts, c, args.max_tokens,
                                                 args.rounds),
                   "load": os.getloadavg()[0]}
            results.append(row)
            print(json.dumps(row), flush=True)
            # after every point, so a run cut short keeps what it measured
            args.output.parent.mkdir(exist_ok=True)
            args.output.write_text(json.dumps({
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "model": args.model, "k": args.k,
                "max_tokens": args.max_tokens, "rounds": args.rounds, "started": started,
                "updated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "results": results}, indent=1))
    print(f"{'workload':8} {'conc':>4} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} "
          f"{'accept':>6} {'per draft':>9} {'steps p/s':>10} identical")
    for r in results:
        p, s = r["plain"], r["spec"]
        print(f"{r['workload']:8} {r['concurrency']:>4} {p['tokens_per_s']:>11.1f} "
              f"{s['tokens_per_s']:>10.1f} {r['ratio']:>6.2f} "
              f"{s.get('acceptance_rate', 0):>6.0%} {s.get('accepted_per_draft', 0):>9.2f} "
              f"{p['steps']:>4}/{s['steps']:<5} {r['identical']}")


if __name__ == "__main__":
    main()
