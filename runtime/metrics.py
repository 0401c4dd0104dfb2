"""Prometheus metrics of the server, named and meant as vLLM's under ``sluice:``.

`ServerMetrics` owns a private `CollectorRegistry` (several servers can live in
one process, e.g. in tests) and exposes:

- histograms, observed when a request finishes: ``time_to_first_token_seconds``
  (arrival to first token), ``inter_token_latency_seconds`` (every gap between
  consecutive tokens), ``request_time_per_output_token_seconds`` and its older
  vLLM alias ``time_per_output_token_seconds`` (per request: (last token - first
  token) / (tokens - 1)), ``e2e_request_latency_seconds`` (arrival to finish),
  ``request_queue_time_seconds`` (arrival to first scheduled);
- gauges, refreshed from `EngineStats` on every scrape: ``num_requests_running``,
  ``num_requests_waiting``, ``num_requests_swapped`` (waiting requests whose
  KV is in host swap space), ``kv_cache_usage_perc`` (fraction, 0..1);
- counters: ``prompt_tokens``, ``generation_tokens``,
  ``request_success{finished_reason}`` (per completion, as vLLM counts),
  ``num_streams_stalled`` (streams cut off because their reader left output
  unread too long, `sluice.runtime.async_engine.StreamLimits`),
  and, mirrored from the engine's cumulative stats on every scrape,
  ``num_preemptions``, ``prefix_cache_queries``, ``prefix_cache_hits``,
  ``num_requests_failed`` (requests a failing engine step failed on their own);
- from the server's `Health`, refreshed on every scrape: the gauge
  ``num_instances{state}`` (``serving``, ``draining``, ``dead``: died and not
  replaced) and the counters ``num_instance_deaths``, ``num_instances_replaced``
  and ``num_requests_quarantined`` (failed, not re-dispatched, after instances
  running them died; `sluice.scheduler.cluster`).

Every series has a ``model_name`` label. ``render(stats, health)`` returns the text
exposition format. `Health` is also what ``GET /health`` answers from (503 while
``serving`` is 0, with ``reason`` in the body). Importing this module turns off prometheus-client's
``*_created`` series process-wide, as vLLM does (they double the output and no
dashboard reads them).
"""

from __future__ import annotations

import dataclasses

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

from sluice.runtime.engine import EngineStats
from sluice.runtime.outputs import RequestOutput

disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds).
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
         7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
        10.0, 20.0, 40.0, 80.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
        120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclasses.dataclass(frozen=True)
class Health:
    """Whether the server can take requests: its engines (instances) by state and
    the cumulative counts of what went wrong with them."""

    serving: int  # engines (instances) that take new requests
    draining: int = 0
    dead: int = 0  # died and not (yet) replaced
    deaths: int = 0
    replaced: int = 0
    quarantined: int = 0  # requests failed after instances running them died
    reason: str | None = None  # why nothing serves; None while something does

    @property
    def ok(self) -> bool:
        return self.serving > 0


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        lab = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"sluice:{name}", doc, lab, buckets=buckets,
                             registry=r).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"sluice:{name}", doc, lab, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"sluice:{name}", doc, lab, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", _TTFT)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens.", _ITL)
        self.tpot = hist("request_time_per_output_token_seconds",
                         "Mean time per output token of a request after its first.", _ITL)
        self.tpot_alias = hist("time_per_output_token_seconds",
                               "Same as request_time_per_output_token_seconds.", _ITL)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.", _E2E)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.", _E2E)
        self.running = gauge("num_requests_running", "Sequences running.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting.")
        self.swapped = gauge("num_requests_swapped", "Sequences swapped to host memory.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Preemptions (recompute).")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt blocks looked up.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt blocks found cached.")
        self.stalled = counter("num_streams_stalled",
                               "Streams aborted: their reader left output unread too long.")
        self._success = Counter("sluice:request_success", "Finished completions by reason.",
                                lab + ["finished_reason"], registry=r)
        self.failed = counter("num_requests_failed",
                              "Requests a failing engine step failed on their own.")
        self._instances = Gauge("sluice:num_instances", "Engine instances by state.",
                                lab + ["state"], registry=r)
        self.deaths = counter("num_instance_deaths", "Engine instances that died.")
        self.replaced = counter("num_instances_replaced", "Dead instances replaced.")
        self.quarantined = counter("num_requests_quarantined",
                                   "Requests failed, not re-dispatched, after instances "
                                   "running them died.")
        self._mirrored = {"num_preemptions": 0, "prefix_cache_queries": 0,
                          "prefix_cache_hits": 0, "num_failed_requests": 0, "deaths": 0,
                          "replaced": 0, "quarantined": 0}

    def observe_finished(self, out: RequestOutput) -> None:
        """Record a finished request (all its completions)."""
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        for comp, m in zip(out.outputs, out.metrics):
            self.generation_tokens.inc(len(comp.token_ids))
            self._success.labels(self.model_name, comp.finish_reason or "abort").inc()
            if m.first_token_time is not None:
                self.ttft.observe(m.first_token_time - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.queue.observe(m.first_scheduled_time - m.arrival_time)
            if m.finished_time is not None:
                self.e2e.observe(m.finished_time - m.arrival_time)
            for a, b in zip(m.token_times, m.token_times[1:]):
                self.itl.observe(b - a)
            if len(m.token_times) > 1:
                tpot = (m.token_times[-1] - m.token_times[0]) / (len(m.token_times) - 1)
                self.tpot.observe(tpot)
                self.tpot_alias.observe(tpot)

    def observe_aborted(self, n: int) -> None:
        """Record ``n`` completions that ended without a final output (disconnects)."""
        self._success.labels(self.model_name, "abort").inc(n)

    def observe_stalled(self) -> None:
        """Record a stream cut off because its reader fell too far behind."""
        self.stalled.inc()

    def render(self, stats: EngineStats, health: Health | None = None) -> bytes:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.swapped.set(stats.num_swapped)
        self.kv_usage.set(stats.kv_usage)
        for name, counter in (("num_preemptions", self.preemptions),
                              ("prefix_cache_queries", self.prefix_queries),
                              ("prefix_cache_hits", self.prefix_hits),
                              ("num_failed_requests", self.failed)):
            self._mirror(name, counter, getattr(stats, name))
        if health is not None:
            for state in ("serving", "draining", "dead"):
                self._instances.labels(self.model_name, state).set(getattr(health, state))
            for name, counter in (("deaths", self.deaths), ("replaced", self.replaced),
                                  ("quarantined", self.quarantined)):
                self._mirror(name, counter, getattr(health, name))
        return generate_latest(self.registry)

    def _mirror(self, name: str, counter: Counter, value: int) -> None:
        """Advance ``counter`` to a cumulative ``value`` counted elsewhere."""
        counter.inc(max(0, value - self._mirrored[name]))
        self._mirrored[name] = value
