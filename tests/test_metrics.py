"""Prometheus metrics (`sluice.runtime.metrics`): vLLM's names, labels, buckets and
meaning under ``--metrics-compat vllm``, the time per output token observed once
per token interval as outputs stream, and the per-instance and migration
metrics under ``--instances``, and compiles that other processes (Ray actors)
report. Unit tests feed outputs and stats with chosen times; the live ones
scrape ``/metrics`` of an in-process server."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from conftest import ThreadedServer
from sluice.runtime import compiles
from sluice.runtime.engine import EngineConfig, EngineStats
from sluice.runtime.health import Health
from sluice.runtime.metrics import ServerMetrics
from sluice.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput
from sluice.runtime.server import OpenAIServer, ServerConfig
from sluice.scheduler.cluster import ClusterStats
from sluice.scheduler.instance import LoadReport
from sluice.scheduler.migration import MigrationResult

STATS = EngineStats(num_running=3, num_waiting=2, kv_usage=0.25, num_free_blocks=30,
                    num_blocks=40, prefix_cache_queries=48, prefix_cache_hits=16,
                    num_preemptions=1, num_swapped=1)
VLLM = {"model_name": "m", "engine": "0"}
SLUICE = {"model_name": "m"}


def output(tokens: int, times: list[float], finished: bool) -> RequestOutput:
    """A request's whole output so far: ``tokens`` generated at ``times``, arrived at 0."""
    comp = CompletionOutput(0, "", list(range(tokens)), None, "length" if finished else None)
    m = RequestMetrics(0.0, 0.5, times[0] if times else None, list(times),
                       times[-1] if finished else None, 0, 0)
    return RequestOutput("r", None, [7] * 5, [comp], finished, [m])


def value(metrics: ServerMetrics, name: str, labels: dict, **extra) -> float | None:
    return metrics.registry.get_sample_value(name, {**labels, **extra})


def test_time_per_output_token_is_observed_per_token_interval_as_tokens_stream():
    metrics = ServerMetrics("m", "vllm")
    tracker = metrics.track()
    tracker.update(output(2, [1.0, 1.125], finished=False))
    for prefix, labels in (("sluice", SLUICE), ("vllm", VLLM)):
        # seen while the request still runs, not only once it finishes
        assert value(metrics, f"{prefix}:time_to_first_token_seconds_count", labels) == 1
        assert value(metrics, f"{prefix}:time_to_first_token_seconds_sum", labels) == 1.0
        assert value(metrics, f"{prefix}:time_per_output_token_seconds_count", labels) == 1
        assert value(metrics, f"{prefix}:generation_tokens_total", labels) == 2
        assert value(metrics, f"{prefix}:prompt_tokens_total", labels) == 5
        assert value(metrics, f"{prefix}:e2e_request_latency_seconds_count", labels) == 0
    tracker.update(output(4, [1.0, 1.125, 1.375, 1.75], finished=True))
    tracker.update(output(4, [1.0, 1.125, 1.375, 1.75], finished=True))  # a repeat counts nothing
    for prefix, labels in (("sluice", SLUICE), ("vllm", VLLM)):
        # three intervals (0.125, 0.25, 0.375), each observed once; the request's mean once
        assert value(metrics, f"{prefix}:time_per_output_token_seconds_count", labels) == 3
        assert value(metrics, f"{prefix}:time_per_output_token_seconds_sum",
                     labels) == 0.75
        for le, n in (("0.1", 0), ("0.15", 1), ("0.3", 2), ("0.4", 3)):
            assert value(metrics, f"{prefix}:time_per_output_token_seconds_bucket", labels,
                         le=le) == n
        assert value(metrics, f"{prefix}:inter_token_latency_seconds_count", labels) == 3
        assert value(metrics, f"{prefix}:request_time_per_output_token_seconds_count",
                     labels) == 1
        assert value(metrics, f"{prefix}:request_time_per_output_token_seconds_sum",
                     labels) == 0.25
        assert value(metrics, f"{prefix}:generation_tokens_total", labels) == 4
        assert value(metrics, f"{prefix}:prompt_tokens_total", labels) == 5
        assert value(metrics, f"{prefix}:request_success_total", labels,
                     finished_reason="length") == 1
        assert value(metrics, f"{prefix}:e2e_request_latency_seconds_sum", labels) == 1.75
        assert value(metrics, f"{prefix}:request_queue_time_seconds_sum", labels) == 0.5
        assert value(metrics, f"{prefix}:request_prefill_time_seconds_sum", labels) == 0.5
        assert value(metrics, f"{prefix}:request_decode_time_seconds_sum",
                     labels) == 0.75
        assert value(metrics, f"{prefix}:request_generation_tokens_bucket", labels, le="5.0") == 1


def test_vllm_compat_exports_vllms_names_labels_and_buckets():
    text = ServerMetrics("m", "vllm").render(STATS, Health(serving=1)).decode()
    for name, v in (("num_requests_running", 3), ("num_requests_waiting", 2),
                    ("num_requests_swapped", 1), ("kv_cache_usage_perc", 0.25),
                    ("gpu_cache_usage_perc", 0.25), ("num_preemptions_total", 1),
                    ("prefix_cache_queries_total", 48), ("prefix_cache_hits_total", 16)):
        assert f'vllm:{name}{{engine="0",model_name="m"}} {float(v)}' in text, name
    assert 'sluice:kv_cache_usage_perc{model_name="m"} 0.25' in text
    assert "sluice:gpu_cache_usage_perc" not in text  # vLLM's old name, only under vllm:
    # vLLM's bucket boundaries
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="2560.0",model_name="m"}' in text
    assert 'vllm:time_per_output_token_seconds_bucket{engine="0",le="80.0",model_name="m"}' in text
    assert 'vllm:e2e_request_latency_seconds_bucket{engine="0",le="7680.0",model_name="m"}' in text
    assert "vllm:num_streams_stalled" not in text  # Sluice's own stay sluice: only
    plain = ServerMetrics("m").render(STATS).decode()
    assert "vllm:" not in plain and 'sluice:num_requests_running{model_name="m"} 3.0' in plain
    with pytest.raises(ValueError, match="metrics_compat"):
        ServerMetrics("m", "tgi")


class FakeCluster:
    """What the metrics read of a `Cluster`: ``stats()`` and ``migrations``."""

    def __init__(self):
        self.reports: dict[str, LoadReport] = {}
        self.migrations: list[MigrationResult] = []
        self.redispatched = 0

    def add(self, name: str, running: int, usage: float) -> None:
        stats = EngineStats(running, 1, usage, 10, 20, 0, 0, 0)
        self.reports[name] = LoadReport(name, 20, 10, running, 1, 0, 0, False, True, 16,
                                        stats=stats)

    def stats(self) -> ClusterStats:
        ok = sum(m.ok for m in self.migrations)
        return ClusterStats(dict(self.reports), 0, ok, len(self.migrations) - ok,
                            self.redispatched)


def test_per_instance_and_migration_metrics_under_instances():
    metrics, cluster = ServerMetrics("m"), FakeCluster()
    cluster.add("instance-0", 2, 0.5)
    cluster.add("instance-1", 1, 0.125)
    cluster.migrations += [
        MigrationResult("a", "instance-0", "instance-1", True, "migrated", 3, 8, 4096, 0.004, 0.03),
        MigrationResult("b", "instance-1", "instance-0", False, "no room", 0, 0, 0, 0.0, 0.001)]
    metrics.render(STATS, Health(serving=2), cluster)
    inst = dict(SLUICE, instance="instance-1")
    assert value(metrics, "sluice:instance_num_requests_running", inst) == 1
    assert value(metrics, "sluice:instance_kv_cache_usage_perc", inst) == 0.125
    assert value(metrics, "sluice:instance_num_requests_waiting", inst) == 1
    assert value(metrics, "sluice:migrations_total", SLUICE, result="ok") == 1
    assert value(metrics, "sluice:migrations_total", SLUICE, result="failed") == 1
    assert value(metrics, "sluice:migration_downtime_seconds_count", SLUICE) == 1  # ok only
    assert value(metrics, "sluice:migration_downtime_seconds_sum", SLUICE) == 0.004
    assert value(metrics, "sluice:migration_bytes_total", SLUICE) == 4096
    # a later scrape counts only what is new; an instance that is gone loses its series
    del cluster.reports["instance-1"]
    cluster.migrations.append(
        MigrationResult("c", "instance-0", "instance-2", True, "migrated", 2, 4, 1024, 0.002, 0.01))
    cluster.redispatched = 2
    metrics.render(STATS, Health(serving=1), cluster)
    assert value(metrics, "sluice:migrations_total", SLUICE, result="ok") == 2
    assert value(metrics, "sluice:migration_bytes_total", SLUICE) == 5120
    assert value(metrics, "sluice:requests_redispatched_total", SLUICE) == 2
    assert value(metrics, "sluice:instance_num_requests_running", inst) is None
    assert value(metrics, "sluice:instance_num_requests_running",
                 dict(SLUICE, instance="instance-0")) == 2


def test_compiles_other_processes_report_are_in_the_compile_metric_per_source():
    """A Ray actor's compile totals (`compiles.add_remote`, by instance) are in the
    driver's ``sluice:compiles_total``: a later report from the same instance
    replaces its earlier one (totals, not increments), another instance's add."""
    metrics = ServerMetrics("m")
    fn = f"remote_step_{id(metrics)}"  # a function no compile in this process has
    a, b = f"test-a-{id(metrics)}", f"test-b-{id(metrics)}"

    def compiled(reason: str) -> float | None:
        metrics.render(STATS)
        return value(metrics, "sluice:compiles_total", SLUICE, reason=reason, function=fn)

    assert compiled("warmup") is None
    compiles.add_remote(a, {("warmup", fn): 3})
    assert compiled("warmup") == 3
    compiles.add_remote(a, {("warmup", fn): 5, ("serving", fn): 1})
    assert (compiled("warmup"), compiled("serving")) == (5, 1)
    compiles.add_remote(b, {("warmup", fn): 2})
    assert (compiled("warmup"), compiled("serving")) == (7, 1)
    assert compiles.remote(a) == {("warmup", fn): 5, ("serving", fn): 1}
    assert compiles.counts()[("warmup", fn)] == 7


# -- live, in-process servers -----------------------------------------------------------

@contextlib.contextmanager
def serving(server: OpenAIServer):
    """``server`` on loopback (uvicorn on a thread); yields an httpx client for it."""
    with ThreadedServer(server.app) as live, httpx.Client(base_url=live.url, timeout=60) as http:
        yield http


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_a_live_server_under_instances_counts_one_interval_per_token_in_vllm_names(tiny):
    """The server's own wiring: outputs streamed over HTTP feed the trackers, the
    scrape reads the cluster behind the front end."""
    from sluice.scheduler.async_cluster import AsyncCluster, local_cluster

    front = AsyncCluster(local_cluster(tiny, EngineConfig(warmup=False, max_model_len=256), 2))
    server = OpenAIServer(front, ServerConfig("tiny", metrics_compat="vllm"))
    try:
        with serving(server) as http:
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "metrics",
                                                   "max_tokens": 5, "temperature": 0,
                                                   "ignore_eos": True, "stream": True})
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
            got = samples(http.get("/metrics").text)
    finally:
        asyncio.run(front.shutdown())
    lab = '{engine="0",model_name="tiny"}'
    prompt = len(tiny.tokenizer.encode("metrics"))
    assert got[f"vllm:generation_tokens_total{lab}"] == 5
    assert got[f"vllm:prompt_tokens_total{lab}"] == prompt == got[
        'sluice:prompt_tokens_total{model_name="tiny"}']
    assert got[f"vllm:time_per_output_token_seconds_count{lab}"] == 4
    assert got[f"vllm:request_time_per_output_token_seconds_count{lab}"] == 1
    assert got[f"vllm:time_to_first_token_seconds_count{lab}"] == 1
    assert got['vllm:request_success_total{engine="0",finished_reason="length",'
               'model_name="tiny"}'] == 1
    assert got[f"vllm:num_requests_running{lab}"] == 0
    assert got[f"vllm:kv_cache_usage_perc{lab}"] == got[f"vllm:gpu_cache_usage_perc{lab}"]
    for name in ("instance-0", "instance-1"):
        inst = f'{{instance="{name}",model_name="tiny"}}'
        assert got[f"sluice:instance_num_requests_running{inst}"] == 0
        assert got[f"sluice:instance_kv_cache_usage_perc{inst}"] == 0
    assert got['sluice:num_instances{model_name="tiny",state="serving"}'] == 2


def test_serve_flag_selects_the_compat_mode():
    from sluice.runtime.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["serve", "--model", "tiny"]).metrics_compat is None
    assert parse(["serve", "--model", "tiny", "--metrics-compat", "vllm"]).metrics_compat == "vllm"
    with pytest.raises(SystemExit):
        parse(["serve", "--model", "tiny", "--metrics-compat", "tgi"])
