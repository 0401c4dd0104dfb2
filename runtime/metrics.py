"""Prometheus metrics of the server, named and meant as vLLM's, under ``sluice:``
and, with ``--metrics-compat vllm``, also under vLLM's own ``vllm:`` prefix.

`ServerMetrics` owns a private `CollectorRegistry` (several servers can live in
one process, e.g. in tests). Each metric below is defined once (those without
labels of their own in the tables `_SHARED` and `_OWN`) and written to
one series per prefix: ``sluice:<name>`` (label ``model_name``) and, in vLLM
compatibility mode, ``vllm:<name>`` (labels ``model_name`` and ``engine``,
always ``"0"``: the whole server reports as one vLLM engine, which is what a
router or a dashboard written for a vLLM pod reads), with vLLM's buckets and
meaning, so llm-d's endpoint picker, AIBrix or a Grafana dashboard for vLLM read
Sluice unchanged. A `RequestTracker` per request observes, as its outputs
arrive (vLLM observes per engine step):

- on each new output token: ``generation_tokens``, and the gap since the
  previous token in ``inter_token_latency_seconds`` and in
  ``time_per_output_token_seconds`` (one observation per output token
  interval, as vLLM's); on the first token: ``time_to_first_token_seconds``
  (arrival to first token) and ``prompt_tokens``;
- when it finishes, per completion: ``request_success{finished_reason}`` (as
  vLLM counts), ``e2e_request_latency_seconds`` (arrival to finish),
  ``request_queue_time_seconds`` (arrival to first scheduled),
  ``request_inference_time_seconds`` (first scheduled to finish), split into
  ``request_prefill_time_seconds`` (to the first token) and
  ``request_decode_time_seconds`` (the rest),
  ``request_time_per_output_token_seconds`` (its mean gap between tokens),
  ``request_prompt_tokens`` and ``request_generation_tokens``.

Refreshed from `EngineStats` on every scrape: the gauges ``num_requests_running``,
``num_requests_waiting``, ``num_requests_swapped`` (waiting requests whose KV is
in host swap space), ``kv_cache_usage_perc`` (fraction, 0..1; ``vllm:`` also
under its older name ``gpu_cache_usage_perc``), and, mirrored from the engine's
cumulative counts, ``num_preemptions``, ``prefix_cache_queries`` and
``prefix_cache_hits`` (prompt tokens looked up and found cached, as vLLM counts),
and speculative decoding's ``spec_decode_num_drafts``,
``spec_decode_num_draft_tokens`` and ``spec_decode_num_accepted_tokens`` (vLLM's
names; acceptance rate = accepted / draft tokens).

Sluice's own (``sluice:`` only): ``num_streams_stalled`` (streams cut off
because their reader left output unread too long,
`sluice.runtime.async_engine.StreamLimits`), ``num_requests_failed`` (requests
a failing engine step failed on their own); from the server's `Health`: the
gauge ``num_instances{state}`` (``serving``, ``draining``, ``dead``: died and
not replaced) and the counters ``num_instance_deaths``,
``num_instances_replaced`` and ``num_requests_quarantined``. Under
``--instances`` (a `sluice.scheduler.cluster.Cluster`), per instance (label
``instance``, series of instances gone are removed): ``instance_num_requests_
running``, ``instance_num_requests_waiting``, ``instance_kv_cache_usage_perc``;
and the cluster's live migrations: ``migrations{result="ok"|"failed"}``,
``migration_downtime_seconds`` (each successful migration's pause, suspend on
the source to adopt on the destination), ``migration_duration_seconds``,
``migration_bytes`` (KV bytes copied) and ``requests_redispatched`` (moved off
dead instances). From `sluice.runtime.compiles`: ``compiles{reason, function}``
(XLA compilations of the process by reason, ``warmup``, ``startup`` or
``serving``, and jitted function; once warmed up, none should be ``serving``).

``render(stats, health, cluster)`` returns the text exposition format
(`sluice.runtime.health.Health` is the front end's state, which ``GET /health``
also answers from). Importing this module turns off prometheus-client's
``*_created`` series process-wide, as vLLM does (they double the output and no
dashboard reads them).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

from sluice.runtime import compiles
from sluice.runtime.engine import EngineStats
from sluice.runtime.health import Health
from sluice.runtime.option_names import COMPAT_MODES
from sluice.runtime.outputs import RequestOutput

if TYPE_CHECKING:
    from sluice.scheduler.cluster import Cluster

disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds).
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
         7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
        10.0, 20.0, 40.0, 80.0)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
        120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# A live migration's pause is a few decode steps; a blocking copy of a long sequence more.
_MIGRATION = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
TOKENS = "tokens"  # a histogram's buckets: `token_buckets` up to the server's max_model_len

# The metrics without labels of their own, declared once: (`ServerMetrics`
# attribute, kind, name, help, a histogram's buckets). Written under every prefix:
_SHARED = (
    ("ttft", Histogram, "time_to_first_token_seconds", "Time to first token.", _TTFT),
    ("itl", Histogram, "inter_token_latency_seconds",
     "Time between consecutive output tokens.", _ITL),
    ("tpot", Histogram, "time_per_output_token_seconds",
     "Time per output token: one observation per token interval.", _ITL),
    ("request_tpot", Histogram, "request_time_per_output_token_seconds",
     "A request's mean time per output token after its first.", _ITL),
    ("e2e", Histogram, "e2e_request_latency_seconds", "Arrival to finish.", _E2E),
    ("queue", Histogram, "request_queue_time_seconds",
     "Arrival to first scheduled (waiting).", _E2E),
    ("inference", Histogram, "request_inference_time_seconds",
     "First scheduled to finish (running).", _E2E),
    ("prefill", Histogram, "request_prefill_time_seconds", "First scheduled to first token.",
     _E2E),
    ("decode", Histogram, "request_decode_time_seconds", "First token to finish.", _E2E),
    ("request_prompt", Histogram, "request_prompt_tokens",
     "Prompt tokens of a finished request.", TOKENS),
    ("request_generation", Histogram, "request_generation_tokens",
     "Tokens generated by a finished completion.", TOKENS),
    ("running", Gauge, "num_requests_running", "Sequences running.", None),
    ("waiting", Gauge, "num_requests_waiting", "Sequences waiting.", None),
    ("swapped", Gauge, "num_requests_swapped",
     "Waiting sequences whose KV is in host swap space.", None),
    ("prompt_tokens", Counter, "prompt_tokens", "Prompt tokens processed.", None),
    ("generation_tokens", Counter, "generation_tokens", "Tokens generated.", None),
    ("preemptions", Counter, "num_preemptions", "Preemptions.", None),
    ("prefix_queries", Counter, "prefix_cache_queries",
     "Prompt tokens looked up in the prefix cache.", None),
    ("prefix_hits", Counter, "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
     None),
    ("spec_drafts", Counter, "spec_decode_num_drafts", "Speculative drafts verified.", None),
    ("spec_draft_tokens", Counter, "spec_decode_num_draft_tokens",
     "Speculative draft tokens verified.", None),
    ("spec_accepted_tokens", Counter, "spec_decode_num_accepted_tokens",
     "Speculative draft tokens accepted.", None),
)
# ``sluice:`` only:
_OWN = (
    ("stalled", Counter, "num_streams_stalled",
     "Streams aborted: their reader left output unread too long.", None),
    ("failed", Counter, "num_requests_failed",
     "Requests a failing engine step failed on their own.", None),
    ("deaths", Counter, "num_instance_deaths", "Engine instances that died.", None),
    ("replaced", Counter, "num_instances_replaced", "Dead instances replaced.", None),
    ("quarantined", Counter, "num_requests_quarantined",
     "Requests failed, not re-dispatched, after instances running them died.", None),
    ("migration_downtime", Histogram, "migration_downtime_seconds",
     "A migrated request's pause (suspend to adopt).", _MIGRATION),
    ("migration_duration", Histogram, "migration_duration_seconds",
     "A migration from start to end, pre-copy included.", _MIGRATION),
    ("migration_bytes", Counter, "migration_bytes", "KV bytes copied by migrations.", None),
    ("redispatched", Counter, "requests_redispatched",
     "Requests re-dispatched off instances that died.", None),
)


def token_buckets(max_model_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_model_len`` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class _Fanout:
    """One value written to the same series under every prefix."""

    def __init__(self, children: list):
        self._children = children

    def inc(self, amount: float = 1.0) -> None:
        for c in self._children:
            c.inc(amount)

    def set(self, value: float) -> None:
        for c in self._children:
            c.set(value)

    def observe(self, value: float) -> None:
        for c in self._children:
            c.observe(value)


class ServerMetrics:
    def __init__(self, model_name: str, compat: str | None = None,
                 max_model_len: int = 2048):
        """``compat``: None (``sluice:`` only) or ``"vllm"`` (also ``vllm:``).
        ``max_model_len`` bounds the token-count histograms' buckets."""
        if compat is not None and compat not in COMPAT_MODES:
            raise ValueError(f"metrics_compat: must be one of {COMPAT_MODES} or None, "
                             f"got {compat!r}")
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        # (prefix, label names, label values) of each family a shared metric is written to
        self._families = [("sluice", ["model_name"], [model_name])]
        if compat == "vllm":
            self._families.append(("vllm", ["model_name", "engine"], [model_name, "0"]))

        def shared(kind, name: str, doc: str, extra: tuple[str, ...] = (),
                   labels: list[str] = (), **kw):
            """One metric per family (plus ``extra``: aliases under ``vllm:`` only);
            returns the fan-out child, or with ``labels`` a function of their values."""
            metrics = []
            for i, (prefix, names, _) in enumerate(self._families):
                aliases = extra if prefix == "vllm" else ()
                for n in (name, *aliases):
                    metrics.append((kind(f"{prefix}:{n}", doc, names + list(labels),
                                         registry=r, **kw), i))
            values = [v for _, _, v in self._families]
            if labels:
                return lambda *lv: _Fanout([m.labels(*values[i], *lv) for m, i in metrics])
            return _Fanout([m.labels(*values[i]) for m, i in metrics])

        def own(kind, name: str, doc: str, labels: tuple[str, ...] = (), **kw):
            """A ``sluice:``-only metric: its child, or with ``labels`` the metric."""
            m = kind(f"sluice:{name}", doc, ["model_name", *labels], registry=r, **kw)
            return m if labels else m.labels(model_name)

        tokens = token_buckets(max_model_len)

        def options(buckets) -> dict:
            return {} if buckets is None else {"buckets": tokens if buckets == TOKENS
                                               else buckets}

        for table, declare in ((_SHARED, shared), (_OWN, own)):
            for attr, kind, name, doc, buckets in table:
                setattr(self, attr, declare(kind, name, doc, **options(buckets)))
        self.kv_usage = shared(Gauge, "kv_cache_usage_perc",
                               "Fraction of KV blocks in use (0-1).",
                               extra=("gpu_cache_usage_perc",))
        self.success = shared(Counter, "request_success", "Finished completions by reason.",
                              labels=["finished_reason"])
        self._instances = own(Gauge, "num_instances", "Engine instances by state.", ("state",))
        # under --instances
        self._per_instance = {
            "num_running": own(Gauge, "instance_num_requests_running",
                               "Sequences running on an instance.", ("instance",)),
            "num_waiting": own(Gauge, "instance_num_requests_waiting",
                               "Sequences waiting on an instance.", ("instance",)),
            "kv_usage": own(Gauge, "instance_kv_cache_usage_perc",
                            "Fraction of an instance's KV blocks in use (0-1).",
                            ("instance",))}
        self._instance_names: set[str] = set()
        self._migrations = own(Counter, "migrations", "Live migrations by result.",
                               ("result",))
        self._migrations_seen = 0
        self._compiles = own(Counter, "compiles",
                             "XLA compilations by reason (warmup, startup, serving) and "
                             "jitted function.", ("reason", "function"))
        self._compiles_seen: dict[tuple[str, str], int] = {}
        self._render_lock = threading.Lock()  # scrapes run on worker threads
        self._mirrored = {"num_preemptions": 0, "prefix_cache_queries": 0,
                          "prefix_cache_hits": 0, "num_failed_requests": 0,
                          "num_spec_drafts": 0, "num_spec_draft_tokens": 0,
                          "num_spec_accepted_tokens": 0, "deaths": 0,
                          "replaced": 0, "quarantined": 0, "redispatched": 0}

    def track(self) -> RequestTracker:
        """A tracker for one new request; feed it the request's output so far."""
        return RequestTracker(self)

    def observe_aborted(self, n: int) -> None:
        """Record ``n`` completions that ended without a final output (disconnects)."""
        self.success("abort").inc(n)

    def observe_stalled(self) -> None:
        """Record a stream cut off because its reader fell too far behind."""
        self.stalled.inc()

    def render(self, stats: EngineStats, health: Health | None = None,
               cluster: Cluster | None = None) -> bytes:
        """The exposition text; ``cluster``: the global scheduler under ``--instances``."""
        with self._render_lock:
            self._refresh(stats, health, cluster)
            return generate_latest(self.registry)

    def _refresh(self, stats: EngineStats, health: Health | None,
                 cluster: Cluster | None) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.swapped.set(stats.num_swapped)
        self.kv_usage.set(stats.kv_usage)
        for name, counter in (("num_preemptions", self.preemptions),
                              ("prefix_cache_queries", self.prefix_queries),
                              ("prefix_cache_hits", self.prefix_hits),
                              ("num_failed_requests", self.failed),
                              ("num_spec_drafts", self.spec_drafts),
                              ("num_spec_draft_tokens", self.spec_draft_tokens),
                              ("num_spec_accepted_tokens", self.spec_accepted_tokens)):
            self._mirror(name, counter, getattr(stats, name))
        if health is not None:
            for state in ("serving", "draining", "dead"):
                self._instances.labels(self.model_name, state).set(getattr(health, state))
            for name, counter in (("deaths", self.deaths), ("replaced", self.replaced),
                                  ("quarantined", self.quarantined)):
                self._mirror(name, counter, getattr(health, name))
        if cluster is not None:
            self._observe_cluster(cluster)
        for key, n in compiles.counts().items():  # process-wide, cumulative
            self._compiles.labels(self.model_name, *key).inc(n - self._compiles_seen.get(key, 0))
            self._compiles_seen[key] = n

    def _observe_cluster(self, cluster: Cluster) -> None:
        stats = cluster.stats()
        live = {name: r.stats for name, r in stats.instances.items()
                if r.alive and r.stats is not None}
        for name in self._instance_names - live.keys():
            for gauge in self._per_instance.values():
                gauge.remove(self.model_name, name)
        for name, s in live.items():
            for field, gauge in self._per_instance.items():
                gauge.labels(self.model_name, name).set(getattr(s, field))
        self._instance_names = set(live)
        self._mirror("redispatched", self.redispatched, stats.num_redispatched)
        new = cluster.migrations[self._migrations_seen:]  # appended to only
        self._migrations_seen += len(new)
        for m in new:
            self._migrations.labels(self.model_name, "ok" if m.ok else "failed").inc()
            self.migration_duration.observe(m.duration_s)
            self.migration_bytes.inc(m.bytes_copied)
            if m.ok:
                self.migration_downtime.observe(m.downtime_s)

    def _mirror(self, name: str, counter, value: int) -> None:
        """Advance ``counter`` to a cumulative ``value`` counted elsewhere."""
        counter.inc(max(0, value - self._mirrored[name]))
        self._mirrored[name] = value


class RequestTracker:
    """Observes one request's metrics as its outputs arrive: each new token when it
    is seen, the per-request histograms once it has finished."""

    def __init__(self, metrics: ServerMetrics):
        self._m = metrics
        self._tokens: dict[int, int] = {}  # completion index -> tokens counted
        self._times: dict[int, int] = {}  # completion index -> token times observed
        self._started = self._done = False

    def update(self, whole: RequestOutput) -> None:
        """``whole``: the request's output so far (not a delta)."""
        m = self._m
        if self._done:
            return
        for comp, rm in zip(whole.outputs, whole.metrics):
            counted = self._tokens.get(comp.index, 0)
            m.generation_tokens.inc(max(0, len(comp.token_ids) - counted))
            self._tokens[comp.index] = len(comp.token_ids)
            seen, times = self._times.get(comp.index, 0), rm.token_times
            if seen == 0 and times and rm.first_token_time is not None:
                m.ttft.observe(rm.first_token_time - rm.arrival_time)
            for a, b in zip(times[max(seen - 1, 0):], times[max(seen, 1):]):
                m.itl.observe(b - a)
                m.tpot.observe(b - a)
            self._times[comp.index] = len(times)
            if times and not self._started:
                self._started = True
                m.prompt_tokens.inc(len(whole.prompt_token_ids))
        if whole.finished:
            self._done = True
            self._finish(whole)

    def _finish(self, whole: RequestOutput) -> None:
        m = self._m
        if not self._started:  # finished before any token (e.g. max_tokens reached at once)
            m.prompt_tokens.inc(len(whole.prompt_token_ids))
        m.request_prompt.observe(len(whole.prompt_token_ids))
        for comp, rm in zip(whole.outputs, whole.metrics):
            m.success(comp.finish_reason or "abort").inc()
            m.request_generation.observe(len(comp.token_ids))
            if rm.finished_time is not None:
                m.e2e.observe(rm.finished_time - rm.arrival_time)
            if rm.first_scheduled_time is not None:
                m.queue.observe(rm.first_scheduled_time - rm.arrival_time)
                if rm.finished_time is not None:
                    m.inference.observe(rm.finished_time - rm.first_scheduled_time)
                if rm.first_token_time is not None:
                    m.prefill.observe(rm.first_token_time - rm.first_scheduled_time)
            if rm.first_token_time is not None and rm.finished_time is not None:
                m.decode.observe(rm.finished_time - rm.first_token_time)
            times = rm.token_times
            if len(times) > 1:
                m.request_tpot.observe((times[-1] - times[0]) / (len(times) - 1))
