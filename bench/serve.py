"""Serving benchmark: an asyncio load generator against any OpenAI-compatible
``/v1/completions`` endpoint, and the same workload through Sluice's in-process
`AsyncEngine` for comparison.

Run from the repository root, e.g. against a running server::

    .venv/bin/python bench/serve.py --base-url http://127.0.0.1:8000 --model tiny \\
        --num-prompts 64 --request-rate 2 4 8 inf --burstiness 1 --input-len 128 \\
        --output-len 128 --goodput ttft:500 tpot:100

or the HTTP-vs-in-process comparison (starts ``sluice serve`` itself)::

    .venv/bin/python bench/serve.py --compare-in-process --model smollm2-135m-random \\
        --num-prompts 32 --max-concurrency 16 --input-len 128 --output-len 128

Workload: prompts are random token ids (``--vocab-size``), sent as token-id
prompts with ``ignore_eos`` and greedy sampling so every request generates
exactly its output length; lengths are fixed or sampled uniformly within
``--range-ratio``, or read from a JSON trace (``--dataset``: a list of objects
with ``prompt_len`` or ``prompt`` / ``prompt_token_ids``, and ``output_len``).
Arrivals are a Gamma process with mean rate ``--request-rate`` and shape
``--burstiness`` (1 = Poisson; ``inf`` sends all at once), bounded by
``--max-concurrency``. Every request streams (``stream_options.include_usage``).

Per request: TTFT (send to first token chunk), ITL (gaps between token chunks),
TPOT ((E2E - TTFT) / (output tokens - 1)) and E2E. Reported: mean, median, std,
p90 and p99 of each in ms, request/output/total token throughput, and goodput
(requests/s meeting every SLO of ``--goodput``). Field names follow vLLM's
``benchmark_serving`` where they overlap. Writes ``serve-<label>.json`` and PNG
plots (latency CDFs, throughput vs rate) into ``--result-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
PERCENTILES = (50, 90, 99)


@dataclasses.dataclass
class Req:
    prompt: list[int]
    output_len: int


@dataclasses.dataclass
class Result:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    latency: float = 0.0
    error: str = ""


# -- workload ------------------------------------------------------------------

def make_requests(args: argparse.Namespace) -> list[Req]:
    rng = np.random.default_rng(args.seed)
    if args.dataset:
        rows = json.loads(Path(args.dataset).read_text())[:args.num_prompts]
        reqs = []
        for row in rows:
            ids = row.get("prompt_token_ids") or rng.integers(
                0, args.vocab_size, row.get("prompt_len", args.input_len)).tolist()
            reqs.append(Req(list(ids), int(row.get("output_len", args.output_len))))
        return reqs

    def lengths(mean: int) -> np.ndarray:
        lo, hi = max(1, int(mean * (1 - args.range_ratio))), int(mean * (1 + args.range_ratio))
        return rng.integers(lo, hi + 1, args.num_prompts)

    return [Req(rng.integers(0, args.vocab_size, i).tolist(), int(o))
            for i, o in zip(lengths(args.input_len), lengths(args.output_len))]


async def arrivals(n: int, rate: float, burstiness: float, seed: int):
    """Yield 0..n-1 at Gamma-distributed intervals (mean 1/rate, shape burstiness)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield i
        if math.isfinite(rate) and i < n - 1:
            await asyncio.sleep(rng.gamma(burstiness, 1.0 / (rate * burstiness)))


# -- clients -------------------------------------------------------------------

def http_sender(client: httpx.AsyncClient, url: str, model: str,
                headers: dict[str, str]) -> Callable[[Req], Awaitable[Result]]:
    async def send(req: Req) -> Result:
        body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        res = Result(prompt_len=len(req.prompt))
        start = last = time.perf_counter()
        chunks = 0
        try:
            async with client.stream("POST", url, json=body, headers=headers) as r:
                if r.status_code != 200:
                    res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if data.get("usage"):
                        res.output_tokens = data["usage"]["completion_tokens"]
                    if not data.get("choices"):
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last, chunks = now, chunks + 1
            res.latency = time.perf_counter() - start
            res.output_tokens = res.output_tokens or chunks
            res.success = chunks > 0
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            res.error = repr(e)
        return res

    return send


def engine_sender(engine) -> Callable[[Req], Awaitable[Result]]:
    """The same measurement through `AsyncEngine` in this process."""
    from sluice.runtime import SamplingParams

    async def send(req: Req) -> Result:
        params = SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
        res = Result(prompt_len=len(req.prompt))
        start = last = time.perf_counter()
        chunks = 0
        async for out in await engine.generate({"prompt_token_ids": req.prompt}, params):
            now = time.perf_counter()
            if chunks == 0:
                res.ttft = now - start
            else:
                res.itl.append(now - last)
            last, chunks = now, chunks + 1
            res.output_tokens = len(out.outputs[0].token_ids)
        res.latency = time.perf_counter() - start
        res.success = True
        return res

    return send


async def run_load(send: Callable[[Req], Awaitable[Result]], reqs: list[Req], rate: float,
                   burstiness: float, max_concurrency: int | None, seed: int,
                   desc: str) -> tuple[list[Result], float]:
    sem = asyncio.Semaphore(max_concurrency or len(reqs))
    bar = tqdm(total=len(reqs), desc=desc, leave=False)

    async def one(req: Req) -> Result:
        async with sem:
            res = await send(req)
        bar.update(1)
        return res

    start = time.perf_counter()
    tasks = [asyncio.create_task(one(reqs[i]))
             async for i in arrivals(len(reqs), rate, burstiness, seed)]
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return results, duration


# -- metrics -------------------------------------------------------------------

def summarize(results: list[Result], duration: float, slos: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    ttft = np.array([r.ttft for r in ok]) * 1e3
    e2el = np.array([r.latency for r in ok]) * 1e3
    tpot = np.array([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
                     if r.output_tokens > 1]) * 1e3
    itl = np.array([x for r in ok for x in r.itl]) * 1e3
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    good = sum(1 for r in ok if all(_slo_value(r, k) <= v for k, v in slos.items()))
    s: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "request_goodput": good / duration if slos else None,
    }
    for name, arr in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        s[f"mean_{name}_ms"] = float(arr.mean()) if arr.size else None
        s[f"median_{name}_ms"] = float(np.median(arr)) if arr.size else None
        s[f"std_{name}_ms"] = float(arr.std()) if arr.size else None
        for p in PERCENTILES:
            s[f"p{p}_{name}_ms"] = float(np.percentile(arr, p)) if arr.size else None
    s["input_lens"] = [r.prompt_len for r in results]
    s["output_lens"] = [r.output_tokens for r in results]
    s["ttfts"] = [r.ttft for r in results]
    s["itls"] = [r.itl for r in results]
    s["errors"] = [r.error for r in results if r.error]
    return s


def _slo_value(r: Result, name: str) -> float:
    if name == "ttft":
        return r.ttft * 1e3
    if name == "e2el":
        return r.latency * 1e3
    return (r.latency - r.ttft) / max(1, r.output_tokens - 1) * 1e3  # tpot


def parse_slos(items: list[str]) -> dict[str, float]:
    slos = {}
    for item in items:
        name, _, ms = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not ms:
            raise SystemExit(f"--goodput: expected ttft|tpot|e2el:MS, got {item!r}")
        slos[name] = float(ms)
    return slos


def headline(s: dict[str, Any]) -> str:
    return (f"{s['completed']} ok / {s['failed']} failed in {s['duration']:.1f}s; "
            f"{s['output_throughput']:.1f} out tok/s; TTFT p50 {s['median_ttft_ms']:.1f} ms; "
            f"ITL p50 {s['median_itl_ms']:.2f} ms p99 {s['p99_itl_ms']:.2f} ms; "
            f"TPOT p50 {s['median_tpot_ms']:.2f} ms")


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, sweep in runs.items():
        for s in sweep:
            name = f"{label} rate={s['request_rate']}"
            for ax, key in ((axes[0], "ttfts"), (axes[1], "itls")):
                vals = np.sort(np.array([x for v in s[key] for x in
                                         (v if isinstance(v, list) else [v])]) * 1e3)
                if vals.size:
                    ax.plot(vals, np.arange(1, vals.size + 1) / vals.size, label=name)
        rates = [float(s["request_rate"]) for s in sweep]
        finite = [r if math.isfinite(r) else max([x for x in rates if math.isfinite(x)] or [1]) * 2
                  for r in rates]
        axes[2].plot(finite, [s["output_throughput"] for s in sweep], "o-", label=label)
    axes[0].set(title="TTFT CDF", xlabel="ms", ylabel="fraction")
    axes[1].set(title="ITL CDF", xlabel="ms", xscale="log")
    axes[2].set(title="output throughput vs request rate (inf drawn at 2x max)",
                xlabel="requests/s", ylabel="tokens/s")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- modes ---------------------------------------------------------------------

async def sweep(send, reqs, args, label: str, slos) -> list[dict]:
    out = []
    for rate in args.request_rate:
        if args.warmup:
            await run_load(send, reqs[:args.warmup], math.inf, 1.0, args.max_concurrency,
                           args.seed, f"{label} warm-up")
        results, duration = await run_load(send, reqs, rate, args.burstiness,
                                            args.max_concurrency, args.seed, f"{label} @{rate}")
        s = {"label": label, "request_rate": rate if math.isfinite(rate) else "inf", "burstiness": args.burstiness,
             "max_concurrency": args.max_concurrency, **summarize(results, duration, slos)}
        print(f"[{label} rate={rate}] {headline(s)}", flush=True)
        out.append(s)
    return out


async def bench_http(url: str, args, reqs, slos, label: str) -> list[dict]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        return await sweep(http_sender(client, url + args.endpoint, args.model, headers),
                           reqs, args, label, slos)


async def bench_in_process(args, reqs, slos) -> list[dict]:
    from sluice.runtime import AsyncEngine, LLM
    llm = LLM(args.model, **_engine_kw(args))
    engine = AsyncEngine(llm.engine)
    try:
        return await sweep(engine_sender(engine), reqs, args, "in-process", slos)
    finally:
        await engine.shutdown()


def _engine_kw(args) -> dict[str, Any]:
    return dict(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                warmup=True)


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "sluice.runtime.cli", "serve", "--model", args.model,
           "--port", "0", "--max-num-seqs", str(args.max_num_seqs),
           "--max-model-len", str(args.max_model_len),
           "--full-warmup"]  # as the in-process engine: no compile in the background
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"serving \S+ at (http://\S+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("sluice serve did not start")


async def compare(args, reqs, slos) -> dict[str, Any]:
    """HTTP (a `sluice serve` process) and in-process, alternating rounds."""
    proc, url = start_server(args)
    try:
        runs: dict[str, list[dict]] = {"http": [], "in-process": []}
        for _ in range(args.rounds):
            runs["http"] += await bench_http(url, args, reqs, slos, "http")
            proc.send_signal(signal.SIGINT)  # free the CPU for the in-process round
            proc.wait(60)
            runs["in-process"] += await bench_in_process(args, reqs, slos)
            if _ < args.rounds - 1:
                proc, url = start_server(args)
    finally:
        proc.kill()
    http_tp = float(np.mean([s["output_throughput"] for s in runs["http"]]))
    local_tp = float(np.mean([s["output_throughput"] for s in runs["in-process"]]))
    http_itl = float(np.mean([s["median_itl_ms"] for s in runs["http"]]))
    local_itl = float(np.mean([s["median_itl_ms"] for s in runs["in-process"]]))
    return {"runs": runs, "comparison": {
        "http_output_throughput": http_tp, "in_process_output_throughput": local_tp,
        "throughput_ratio": http_tp / local_tp,
        "http_median_itl_ms": http_itl, "in_process_median_itl_ms": local_itl,
        "added_median_itl_ms": http_itl - local_itl,
        "target_throughput_ratio_met": http_tp / local_tp >= 0.95,
        "target_added_itl_met": http_itl - local_itl <= 2.0}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default="tiny", help="model name sent (and loaded in-process)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                   help="requests/s, one or several for a sweep (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="sample lengths uniformly in len*(1 +- ratio)")
    p.add_argument("--dataset", default=None, help="JSON trace file (see module docstring)")
    p.add_argument("--vocab-size", type=int, default=1000, help="random prompt ids below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", nargs="*", default=[], help="SLOs, e.g. ttft:500 tpot:50")
    p.add_argument("--warmup", type=int, default=0, help="untimed requests before each rate")
    p.add_argument("--result-dir", default=str(ROOT / "out"))
    p.add_argument("--label", default="run")
    p.add_argument("--compare-in-process", action="store_true",
                   help="start `sluice serve --model M` and compare with AsyncEngine in-process")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds when comparing")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=512)
    args = p.parse_args()
    if args.burstiness <= 0:
        raise SystemExit("--burstiness: must be > 0")
    slos = parse_slos(args.goodput)
    reqs = make_requests(args)
    if args.compare_in_process:
        result = asyncio.run(compare(args, reqs, slos))
        runs = result["runs"]
    else:
        runs = {args.label: asyncio.run(bench_http(args.base_url.rstrip("/"), args, reqs, slos,
                                                   args.label))}
        result = {"runs": runs}
    result["config"] = {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf")
                        for k, v in vars(args).items() if k != "api_key"}
    result["config"]["request_rate"] = [r if math.isfinite(r) else "inf"
                                        for r in args.request_rate]
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                         "python": platform.python_version()}
    out = Path(args.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "serve-compare" if args.compare_in_process else f"serve-{args.label}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(runs, out / f"{name}.png")
    if "comparison" in result:
        print(json.dumps(result["comparison"], indent=2))
    print(f"wrote {out / name}.json and .png")


if __name__ == "__main__":
    main()
