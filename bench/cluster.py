"""Multi-instance serving benchmark (issue 7): the global scheduler and live
KV migration, on several JAX CPU devices in one process.

Three parts (``--part serve|downtime|sim|all``):

serve: 4 `LocalInstance`s of the built-in ``tiny`` model, one per CPU device
(``--xla_force_host_platform_device_count``), each with a small KV pool, fed
one bursty trace (Gamma inter-arrival times, coefficient of variation
``--cv``; log-normal prompt and output lengths, capped by ``max_model_len``).
The same trace is replayed, one configuration after another on the same
engines, under

- ``round-robin``: ``ClusterConfig(dispatch="round-robin", migrate=False)``;
- ``freest``: load-aware dispatch, no migration
  (``ClusterConfig(dispatch="freest", migrate=False)``);
- ``sluice``: load-aware dispatch plus the migration policy
  (``ClusterConfig(dispatch="freest", migrate=True, migrate_below=...,
  migrate_above=...)``).

Every engine is warmed first (all step shapes, the block gather/scatter copies
of every staging shape on every device, and one live migration in each
direction between every pair), so compilation does not pollute the timings.
Reported per configuration: P50/P99 TTFT, time per output token, preemptions,
migrations, and fragmentation (a request waiting on an instance whose free
blocks cannot hold it while the free blocks of all instances together could,
sampled every 20 ms). Every engine step's time, batch tokens and KV tokens are
recorded; a least-squares fit ``step = a + b*tokens + c*kv_tokens`` is the
step-time model of the simulator.

downtime: one request on instance A, migrated to instance B at sequence
lengths 256..8192 (a ``tiny`` config with 8704 positions, same weights shape),
three ways: live (multi-stage, ``migrate()`` with its default stages), blocking
stop-and-copy (``max_stages=0``) and recompute (abort on A, prefill prompt +
generated tokens on B). Per method: the driver's downtime (suspend on A to
adoption on B; for recompute: abort to first token on B) and the client-seen
stall (last token on A to next token on B), against the decode step time.

sim: the discrete-event simulator of `cluster_sim.py`, at 16..256 instances.

Writes bench/results/cluster_*.json and plots.

    .venv/bin/python bench/cluster.py --part all [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

_DEVICES = 4
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_DEVICES}").strip()

import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sluice.runtime.config import TINY  # noqa: E402
from sluice.runtime.engine import EngineConfig, LLMEngine  # noqa: E402
from sluice.runtime.intake import Intake  # noqa: E402
from sluice.runtime.loader import Model, load_model  # noqa: E402
from sluice.runtime.model import init_params  # noqa: E402
from sluice.runtime.sampling_params import SamplingParams  # noqa: E402
from sluice.runtime.tokenizer import Tokenizer  # noqa: E402
from sluice.scheduler.cluster import Cluster, ClusterConfig  # noqa: E402
from sluice.scheduler.instance import LocalInstance  # noqa: E402
from sluice.scheduler.migration import migrate  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GREEDY = dict(temperature=0.0, ignore_eos=True)


# -- shared helpers -------------------------------------------------------------


def environment() -> dict:
    return {"python": platform.python_version(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": len(jax.devices()),
            "cpus": os.cpu_count(), "machine": platform.machine()}


def pct(xs, q) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


class StepRecorder:
    """Wraps each engine's ``runner.execute`` to record every step:
    (batch tokens, sequences, KV tokens attended, seconds)."""

    def __init__(self):
        self.samples: list[tuple[int, int, int, float]] = []
        self.enabled = False

    def attach(self, engine: LLMEngine) -> None:
        inner = engine.runner.execute

        def execute(rows, during=None, *rest):
            start = time.perf_counter()
            out = inner(rows, during, *rest)
            if self.enabled:
                tokens = sum(r.num_new_tokens for r in rows)
                kv = sum(r.request.num_computed_tokens + r.num_new_tokens for r in rows)
                self.samples.append((tokens, len(rows), kv, time.perf_counter() - start))
            return out
        engine.runner.execute = execute


def fit_step_model(samples) -> dict:
    """Least squares ``seconds = a + b*tokens + c*kv_tokens`` over recorded steps."""
    arr = np.asarray(samples, np.float64)
    x = np.column_stack([np.ones(len(arr)), arr[:, 0], arr[:, 2]])
    y = arr[:, 3]
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ coef
    r2 = 1 - np.sum((y - pred) ** 2) / max(1e-30, np.sum((y - y.mean()) ** 2))
    decode = arr[arr[:, 0] == arr[:, 1]]  # steps where every row is one decode token
    return {"a_s": float(coef[0]), "b_s_per_token": float(coef[1]),
            "c_s_per_kv_token": float(coef[2]), "r2": float(r2), "num_steps": len(arr),
            "median_step_s": float(np.median(y)),
            "median_decode_step_s": float(np.median(decode[:, 3])) if len(decode) else None,
            "mean_abs_error_s": float(np.mean(np.abs(y - pred)))}


def warm_copies(engines: list[LLMEngine], max_blocks: int, every_length: bool = True) -> None:
    """Compile block gather/scatter for every power-of-two staging shape (runs x
    blocks) up to ``max_blocks`` on every device, plus (``every_length``) the
    slice/pad of every length. Runs while the pools hold nothing, so the writes
    are harmless."""
    sizes = [1 << k for k in range(max(1, max_blocks - 1).bit_length() + 1)]
    for eng in engines:
        r = eng.runner
        for n in sizes:
            for g in (s for s in sizes if s <= n):
                runs = [(i, 1) for i in range(g - 1)] + [(g - 1, n - g + 1)]
                r.copy_in(runs, r.gather(runs))
        for n in range(1, max_blocks + 1 if every_length else 0):
            r.copy_in([(0, n)], r.gather([(0, n)]))
        jax.block_until_ready(r.kv_cache)


class Collector:
    """Cluster sink: keeps each request's last output; `wait` for all to finish."""

    def __init__(self):
        self.last: dict[str, object] = {}
        self.done: set[str] = set()
        self.errors: list[Exception] = []
        self.cv = threading.Condition()

    def sink(self, out) -> None:
        with self.cv:
            if isinstance(out, Exception):
                self.errors.append(out)
            else:
                self.last[out.request_id] = out
                if out.finished:
                    self.done.add(out.request_id)
            self.cv.notify_all()

    def num_tokens(self, rid: str) -> int:
        out = self.last.get(rid)
        return len(out.outputs[0].token_ids) if out is not None else 0

    def wait(self, pred, timeout: float) -> bool:
        with self.cv:
            return self.cv.wait_for(pred, timeout)


# -- part 1: the real run ----------------------------------------------------------


@dataclasses.dataclass
class Job:
    arrival_s: float
    prompt_len: int
    output_len: int


def make_trace(n: int, rate: float, cv: float, max_len: int, seed: int,
               prompt_median: float = 120, prompt_sigma: float = 1.0,
               output_median: float = 80, output_sigma: float = 1.2) -> list[Job]:
    """Gamma inter-arrivals (shape 1/cv^2) rescaled to last exactly n/rate seconds;
    log-normal prompt and output lengths, each request capped at ``max_len``."""
    rng = np.random.default_rng(seed)
    shape = 1.0 / cv ** 2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    gaps *= (n / rate) / gaps.sum()
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)[:-1]])
    prompts = np.clip(rng.lognormal(np.log(prompt_median), prompt_sigma, n), 8,
                      max_len * 0.7).astype(int)
    outputs = np.clip(rng.lognormal(np.log(output_median), output_sigma, n), 4, None).astype(int)
    outputs = np.minimum(outputs, max_len - 1 - prompts)
    return [Job(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs)]


def serve_engine_config(args, device) -> EngineConfig:
    return EngineConfig(block_size=16, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=128, max_prefill_seqs=1,
                        max_model_len=args.max_model_len, warmup=True,
                        kv_cache_memory=args.pool_blocks * 16 * _block_bytes(TINY),
                        enable_prefix_caching=False, device=device)


def _block_bytes(cfg) -> int:
    """Bytes of one token's KV in float32 (block bytes = this * block_size)."""
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4


def make_instances(engines, out, death) -> list[LocalInstance]:
    return [LocalInstance(f"i{d}", eng, out, death) for d, eng in enumerate(engines)]


def warm_serving(engines, model, args) -> float:
    """Step shapes compile in the engine constructors; here: copies of every shape
    on every device, and one live migration in each direction between every pair
    of instances (each request submitted straight to its source instance)."""
    start = time.perf_counter()
    warm_copies(engines, -(-args.max_model_len // 16))
    col = Collector()
    insts = [LocalInstance(f"i{d}", eng, lambda _, outs: [col.sink(o) for o in outs])
             for d, eng in enumerate(engines)]
    try:
        for i, src in enumerate(insts):
            for dst in insts:
                if dst is src:
                    continue
                rid = f"warm-{src.name}-{dst.name}"
                src.submit(src.engine.prepare(rid, {"prompt_token_ids": [1 + i] * 40},
                                              SamplingParams(max_tokens=80, **GREEDY)))
                col.wait(lambda: col.num_tokens(rid) >= 4, 60)
                res = migrate(src, dst, rid)
                if not res.ok:
                    print(f"  warm-up migration {src.name}->{dst.name}: {res.reason}")
                col.wait(lambda: rid in col.done, 60)
    finally:
        for inst in insts:
            inst.stop()
    return time.perf_counter() - start


class FragmentationSampler:
    """Every ``period`` s: requests waiting on an instance whose free blocks cannot
    hold them while all instances' free blocks together could."""

    def __init__(self, cluster: Cluster, period: float = 0.02):
        self.cluster, self.period = cluster, period
        self.request_seconds = 0.0
        self.requests: set[str] = set()
        self.samples = 0
        self.samples_fragmented = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            insts = list(self.cluster.instances.values())
            free = {i.name: i.engine.block_manager.num_free_blocks for i in insts}
            total = sum(free.values())
            hit = 0
            for inst in insts:
                bs = inst.engine.block_manager.block_size
                for req in list(inst.engine.scheduler.waiting):
                    need = -(-(req.num_tokens + 1) // bs)
                    if free[inst.name] < need <= total:
                        hit += 1
                        self.requests.add(req.request_id)
            self.samples += 1
            self.samples_fragmented += hit > 0
            self.request_seconds += hit * self.period


def replay(cluster: Cluster, trace: list[Job], col: Collector, vocab: int, seed: int) -> float:
    """Submit the trace at its arrival times; returns the wall time to drain it."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, j.prompt_len).tolist() for j in trace]
    start = time.monotonic()
    for i, (job, ids) in enumerate(zip(trace, prompts)):
        delay = start + job.arrival_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        cluster.submit(f"r{i}", {"prompt_token_ids": ids},
                       SamplingParams(max_tokens=job.output_len, **GREEDY), col.sink)
    ok = col.wait(lambda: len(col.done) == len(trace), 600)
    if not ok:
        raise RuntimeError(f"only {len(col.done)}/{len(trace)} requests finished")
    return time.monotonic() - start


def summarize_requests(col: Collector) -> dict:
    ttft, tpot, gaps, preempt, per = [], [], [], 0, {}
    for rid, out in col.last.items():
        m = out.metrics[0]
        ttft.append(m.first_token_time - m.arrival_time)
        per[rid] = {"ttft_s": ttft[-1], "queue_s": (m.first_scheduled_time or 0) - m.arrival_time,
                    "preemptions": m.num_preemptions, "tokens": len(m.token_times)}
        times = np.asarray(m.token_times)
        if len(times) >= 2:
            tpot.append((times[-1] - times[0]) / (len(times) - 1))
            gaps.extend(np.diff(times).tolist())
        preempt += m.num_preemptions
    return {"num_requests": len(col.last),
            "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
            "ttft_mean_s": float(np.mean(ttft)),
            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
            "tpot_mean_s": float(np.mean(tpot)),
            "itl_p50_s": pct(gaps, 50), "itl_p99_s": pct(gaps, 99),
            "request_preemptions": preempt,
            "ttft_all_s": sorted(ttft), "per_request": per}


def migration_stall(col: Collector, results) -> dict:
    """Extra decode time of migrated requests: for each successful migration, its
    pause (suspend to adopt), summed, over the decode time of all requests."""
    ok = [m for m in results if m.ok]
    decode = sum(out.metrics[0].token_times[-1] - out.metrics[0].token_times[0]
                 for out in col.last.values() if len(out.metrics[0].token_times) > 1)
    pause = sum(m.downtime_s for m in ok)
    return {"migrations_ok": len(ok), "migrations_failed": len(results) - len(ok),
            "failed_reasons": sorted({m.reason for m in results if not m.ok}),
            "downtime_p50_s": pct([m.downtime_s for m in ok], 50),
            "downtime_max_s": max((m.downtime_s for m in ok), default=None),
            "stages_mean": float(np.mean([m.stages for m in ok])) if ok else None,
            "bytes_copied": sum(m.bytes_copied for m in ok),
            "pause_over_decode_time": pause / decode if decode else None}


def run_config(name: str, ccfg: ClusterConfig, engines, model, trace, args,
               recorder: StepRecorder) -> dict:
    print(f"[serve] {name}: {ccfg}")
    col = Collector()
    before = sum(e.stats().num_preemptions for e in engines)
    cluster = Cluster(lambda o, d: make_instances(engines, o, d),
                      Intake(model, args.max_model_len, seed=0), ccfg)
    sampler = FragmentationSampler(cluster)
    recorder.enabled = name == args.calibrate_on
    sampler.start()
    cluster.start()
    try:
        wall = replay(cluster, trace, col, model.config.vocab_size - 3, args.seed)
    finally:
        sampler.stop()
        cluster.shutdown()
        recorder.enabled = False
    out = summarize_requests(col)
    out.update(name=name, config=dataclasses.asdict(ccfg), wall_s=wall,
               engine_preemptions=sum(e.stats().num_preemptions for e in engines) - before,
               fragmentation={"requests": len(sampler.requests),
                              "request_seconds": sampler.request_seconds,
                              "fraction_of_samples": sampler.samples_fragmented
                              / max(1, sampler.samples)},
               migration=migration_stall(col, cluster.migrations), errors=len(col.errors))
    print(f"  TTFT p50 {out['ttft_p50_s']:.3f}s p99 {out['ttft_p99_s']:.3f}s, "
          f"TPOT p50 {out['tpot_p50_s'] * 1e3:.1f}ms, preemptions {out['engine_preemptions']}, "
          f"migrations {out['migration']['migrations_ok']}, fragmented requests "
          f"{len(sampler.requests)} ({sampler.request_seconds:.1f} req-s), wall {wall:.1f}s")
    return out


def part_serve(args) -> dict:
    model = load_model("tiny", dtype="float32")
    trace = make_trace(args.requests, args.rate, args.cv, args.max_model_len, args.seed)
    t0 = time.perf_counter()
    engines = [LLMEngine(model, serve_engine_config(args, jax.devices()[d]))
               for d in range(args.instances)]
    compile_s = time.perf_counter() - t0
    recorder = StepRecorder()
    for eng in engines:
        recorder.attach(eng)
    warm_s = warm_serving(engines, model, args)
    print(f"[serve] engines compiled in {compile_s:.1f}s, copies+migrations warmed in "
          f"{warm_s:.1f}s; {len(trace)} requests over {trace[-1].arrival_s:.1f}s")
    configs = {
        "round-robin": ClusterConfig(dispatch="round-robin", migrate=False),
        "freest": ClusterConfig(dispatch="freest", migrate=False),
        "sluice": ClusterConfig(dispatch="freest", migrate=True, interval_s=args.interval,
                                migrate_below=args.migrate_below,
                                migrate_above=args.migrate_above,
                                migration_choice=args.migration_choice),
    }
    runs = {n: run_config(n, c, engines, model, trace, args, recorder)
            for n, c in configs.items()}
    fit = fit_step_model(recorder.samples)
    rr, fr, sl = (runs[k] for k in ("round-robin", "freest", "sluice"))
    return {
        "workload": {"requests": len(trace), "rate_per_s": args.rate, "cv": args.cv,
                     "instances": args.instances, "pool_blocks": args.pool_blocks,
                     "block_size": 16, "max_model_len": args.max_model_len,
                     "max_num_seqs": args.max_num_seqs,
                     "prompt_len_p50": float(np.median([j.prompt_len for j in trace])),
                     "prompt_len_max": max(j.prompt_len for j in trace),
                     "output_len_p50": float(np.median([j.output_len for j in trace])),
                     "output_len_max": max(j.output_len for j in trace),
                     "arrivals": [j.arrival_s for j in trace],
                     "prompt_lens": [j.prompt_len for j in trace],
                     "output_lens": [j.output_len for j in trace]},
        "compile_s": compile_s, "warm_s": warm_s,
        "runs": runs,
        "step_model": fit,
        "step_samples": recorder.samples[:: max(1, len(recorder.samples) // 4000)],
        "ratios": {"ttft_p99_rr_over_sluice": rr["ttft_p99_s"] / sl["ttft_p99_s"],
                   "ttft_p99_freest_over_sluice": fr["ttft_p99_s"] / sl["ttft_p99_s"],
                   "tpot_mean_sluice_over_freest": sl["tpot_mean_s"] / fr["tpot_mean_s"]},
    }


def plot_serve(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in res["runs"].items():
        xs = run["ttft_all_s"]
        a.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
    a.set_xscale("log")
    a.set_xlabel("TTFT (s, log)")
    a.set_ylabel("fraction of requests")
    a.set_title("TTFT CDF, same bursty trace")
    a.legend()
    names = list(res["runs"])
    x = np.arange(len(names))
    for k, (key, label) in enumerate((("ttft_p50_s", "TTFT P50"), ("ttft_p99_s", "TTFT P99"))):
        b.bar(x + 0.4 * k, [res["runs"][n][key] for n in names], 0.4, label=label)
    b.set_xticks(x + 0.2, names)
    b.set_ylabel("seconds")
    b.set_yscale("log")
    b.legend()
    b.set_title("TTFT percentiles")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- part 2: downtime vs sequence length ---------------------------------------------


def long_context_model(max_positions: int) -> Model:
    """``tiny`` with more positions (RoPE has no learned positions; same weights shape)."""
    cfg = dataclasses.replace(TINY, max_position_embeddings=max_positions)
    return Model("tiny-long", cfg, init_params(cfg, 0, jnp.float32), Tokenizer.byte_level(),
                 jnp.dtype(jnp.float32), cfg.eos_token_ids)


def downtime_engine(model: Model, max_len: int, device) -> LLMEngine:
    blocks = -(-max_len // 16) + 8
    return LLMEngine(model, EngineConfig(
        block_size=16, max_num_seqs=4, max_num_batched_tokens=512, max_prefill_seqs=1,
        max_model_len=max_len, warmup=True, kv_cache_memory=blocks * 16 * _block_bytes(TINY),
        enable_prefix_caching=False, device=device))


def start_request(a: LocalInstance, col: Collector, rid: str, length: int, max_len: int,
                  vocab: int, warm_tokens: int = 6) -> list[int]:
    """A request whose sequence is ``length`` tokens once ``warm_tokens`` decoded."""
    ids = np.random.default_rng(length).integers(0, vocab, length - warm_tokens).tolist()
    params = SamplingParams(max_tokens=max_len - len(ids) - 1, **GREEDY)
    a.submit(a.engine.prepare(rid, {"prompt_token_ids": ids}, params))
    if not col.wait(lambda: col.num_tokens(rid) >= warm_tokens + 4, 300):
        raise RuntimeError(f"{rid} did not start")
    return ids


def decode_step(col: Collector, rid: str, before: float) -> float:
    """Median gap between the request's tokens generated before ``before``."""
    times = [t for t in col.last[rid].metrics[0].token_times if t < before]
    return float(np.median(np.diff(times[-20:])))


def measure_migration(a, b, col, rid, max_stages: int) -> dict:
    start = time.monotonic()
    res = migrate(a, b, rid, max_stages=max_stages, stop_blocks=2)
    if not res.ok:
        raise RuntimeError(f"migration failed: {res.reason}")
    n = col.num_tokens(rid)
    col.wait(lambda: col.num_tokens(rid) >= n + 3, 60)
    times = np.asarray(col.last[rid].metrics[0].token_times)
    window = times[times >= start - 1.0]
    stall = float(np.max(np.diff(window))) if len(window) > 1 else None
    return {"downtime_s": res.downtime_s, "stall_s": stall, "stages": res.stages,
            "bytes": res.bytes_copied, "duration_s": res.duration_s,
            "step_s": decode_step(col, rid, start)}


def measure_recompute(a, b, col, rid, prompt, vocab) -> dict:
    """Abort on A and prefill prompt + generated tokens on B: stop to next token."""
    start = time.monotonic()
    step = decode_step(col, rid, start)
    generated = list(col.last[rid].outputs[0].token_ids)
    last_token = col.last[rid].metrics[0].token_times[-1]
    stop = time.monotonic()
    a.abort(rid)
    new = rid + "-re"
    b.submit(b.engine.prepare(new, {"prompt_token_ids": prompt + generated},
                              SamplingParams(max_tokens=2, **GREEDY)))
    col.wait(lambda: col.num_tokens(new) >= 1, 300)
    first = col.last[new].metrics[0].first_token_time
    col.wait(lambda: new in col.done, 60)
    return {"downtime_s": first - stop, "stall_s": first - last_token, "stages": 0,
            "bytes": 0, "duration_s": first - stop, "step_s": step}


def part_downtime(args) -> dict:
    lengths = args.lengths
    max_len = max(lengths) + 512
    model = long_context_model(max_len)
    t0 = time.perf_counter()
    col = Collector()
    engines = [downtime_engine(model, max_len, jax.devices()[d]) for d in (0, 1)]
    # Lengths of copies other than the few tail sizes are warmed by the first
    # (discarded) repeat at each sequence length.
    warm_copies(engines, -(-max_len // 16), every_length=False)
    warm_copies(engines, 8)
    a, b = (LocalInstance(n, e, lambda _, outs: [col.sink(o) for o in outs])
            for n, e in zip("ab", engines))
    print(f"[downtime] compiled and warmed in {time.perf_counter() - t0:.1f}s")
    vocab = model.config.vocab_size - 3
    methods = {"live": 64, "blocking": 0, "recompute": None}
    rows = []
    try:
        for length in lengths:
            for method, stages in methods.items():
                for rep in range(args.repeats + 1):  # the first repeat warms this length
                    rid = f"{method}-{length}-{rep}"
                    prompt = start_request(a, col, rid, length, max_len, vocab)
                    if stages is None:
                        m = measure_recompute(a, b, col, rid, prompt, vocab)
                    else:
                        m = measure_migration(a, b, col, rid, stages)
                        b.abort(rid)
                    col.wait(lambda: True, 0.2)
                    if rep:
                        rows.append({"length": length, "method": method, "repeat": rep, **m})
                        print(f"  {method:9s} L={length:5d}: downtime {m['downtime_s'] * 1e3:7.1f}ms"
                              f" stall {m['stall_s'] * 1e3:7.1f}ms step {m['step_s'] * 1e3:5.1f}ms"
                              f" stages {m['stages']}")
                    _wait_empty([a, b])
    finally:
        a.stop()
        b.stop()
    return {"lengths": lengths, "max_model_len": max_len, "rows": rows,
            "summary": _downtime_summary(rows, lengths, list(methods))}


def _wait_empty(insts) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(i.report().num_requests == 0 and i.report().num_free_blocks
               == i.report().num_blocks for i in insts):
            return
        time.sleep(0.02)
    raise RuntimeError("instances did not drain")


def _downtime_summary(rows, lengths, methods) -> dict:
    """Medians per (method, length), and whether live migration stays flat: its
    client-seen stall beyond one decode step (``excess``) stays within one decode
    step (of that length) at every length; and the driver-reported downtime
    varies across lengths by less than the shortest decode step."""
    out = {}
    for method in methods:
        per = {}
        for length in lengths:
            sel = [r for r in rows if r["method"] == method and r["length"] == length]
            per[length] = {k: float(np.median([r[k] for r in sel]))
                           for k in ("downtime_s", "stall_s", "step_s", "bytes")}
            per[length]["excess_s"] = per[length]["stall_s"] - per[length]["step_s"]
        out[method] = per
    live = out["live"].values()
    step = min(v["step_s"] for v in live)
    excess = [v["excess_s"] for v in live]
    downtime = [v["downtime_s"] for v in live]
    out["live_flat"] = {
        "min_decode_step_s": step,
        "excess_stall_max_s": max(excess), "excess_stall_spread_s": max(excess) - min(excess),
        "reported_downtime_max_s": max(downtime),
        "reported_downtime_spread_s": max(downtime) - min(downtime),
        "lengths_over_one_step": [L for L, v in out["live"].items()
                                  if v["excess_s"] > v["step_s"]],
        "met_excess_stall_within_one_step": all(v["excess_s"] <= v["step_s"] for v in live),
        "met_reported_downtime_within_one_step": max(downtime) - min(downtime) <= step}
    return out


def plot_downtime(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    s = res["summary"]
    lengths = res["lengths"]
    for method in ("live", "blocking", "recompute"):
        a.plot(lengths, [s[method][L]["downtime_s"] * 1e3 for L in lengths], "o-", label=method)
        b.plot(lengths, [s[method][L]["stall_s"] * 1e3 for L in lengths], "o-", label=method)
    for ax in (a, b):
        ax.plot(lengths, [s["live"][L]["step_s"] * 1e3 for L in lengths], "k--",
                label="decode step")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.legend()
    a.set_ylabel("ms")
    a.set_title("downtime (stop to adopt / to first token)")
    b.set_title("client-seen stall (last token before to first after)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------


def replot(suffix: str) -> None:
    """Redo the summaries and plots of saved results."""
    serve = RESULTS / f"cluster_serve{suffix}.json"
    if serve.exists():
        plot_serve(json.loads(serve.read_text()), serve.with_suffix(".png"))
    down = RESULTS / f"cluster_downtime{suffix}.json"
    if down.exists():
        res = json.loads(down.read_text())
        res["summary"] = _downtime_summary(res["rows"], res["lengths"],
                                           ["live", "blocking", "recompute"])
        down.write_text(json.dumps(res, indent=1))
        plot_downtime(res, down.with_suffix(".png"))
        print("[downtime] live flat:", res["summary"]["live_flat"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("serve", "downtime", "sim", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="a short run of every part")
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--rate", type=float, default=2.5, help="mean arrivals per second")
    p.add_argument("--cv", type=float, default=4.0, help="inter-arrival coefficient of variation")
    p.add_argument("--pool-blocks", type=int, default=96, help="KV blocks per instance")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--interval", type=float, default=0.05, help="migration policy period")
    p.add_argument("--migrate-below", type=float, default=3.0)
    p.add_argument("--migrate-above", type=float, default=8.0)
    p.add_argument("--migration-choice", default="last")
    p.add_argument("--calibrate-on", default="sluice",
                   help="configuration whose engine steps fit the step-time model")
    p.add_argument("--lengths", type=int, nargs="+",
                   default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sim-instances", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--sim-loads", type=float, nargs="+", default=[1.0, 1.5],
                   help="simulated offered load, in multiples of the real run's tokens/s "
                        "per instance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result files of this run")
    p.add_argument("--replot", action="store_true",
                   help="recompute summaries and plots from the saved JSON (no run)")
    p.add_argument("--jax-cache", default="/tmp/sluice-jax-cache",
                   help="persistent compilation cache ('' = off)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.repeats = min(args.requests, 50), 1
        args.lengths = [256, 1024, 4096]
        args.sim_instances = [16, 64]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    print("command:", " ".join([sys.executable.replace(os.getcwd() + "/", "")] + sys.argv))
    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    RESULTS.mkdir(exist_ok=True)
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    if args.replot:
        replot(suffix)
        return
    meta = {"command": " ".join(sys.argv), "env": environment(), "args": vars(args)}
    if args.part in ("serve", "all"):
        res = {**meta, **part_serve(args)}
        (RESULTS / f"cluster_serve{suffix}.json").write_text(json.dumps(res, indent=1))
        plot_serve(res, RESULTS / f"cluster_serve{suffix}.png")
        print("[serve] ratios:", res["ratios"], "\n[serve] step model:", res["step_model"])
    if args.part in ("downtime", "all"):
        res = {**meta, **part_downtime(args)}
        (RESULTS / f"cluster_downtime{suffix}.json").write_text(json.dumps(res, indent=1))
        plot_downtime(res, RESULTS / f"cluster_downtime{suffix}.png")
        print("[downtime] live flat:", res["summary"]["live_flat"])
    if args.part in ("sim", "all"):
        import cluster_sim
        cluster_sim.main_from(args, RESULTS, suffix)


if __name__ == "__main__":
    main()
