"""No compile while serving (issue 24): after the engine's and the embedder's
warm-ups, a request mixing every sampling feature, a chat request with log-probs
and an embeddings call compile nothing, as counted by `sluice.runtime.compiles`
and exported as ``sluice:compiles_total``."""

from __future__ import annotations

import httpx
import jax
import numpy as np
import pytest

from conftest import ThreadedServer
from sluice.runtime import compiles, embed, load_model
from sluice.runtime.async_engine import AsyncEngine
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.server import OpenAIServer, ServerConfig

MAX_LEN = 32  # small, so the warm-up compiles few shapes


def test_counter_attributes_compiles_to_warmup_and_serving():
    compiles.install()
    compiles.install()  # idempotent: one listener, each compile counted once
    f = jax.jit(lambda x: x * 3 + 1)
    before = compiles.counts()
    with compiles.warming_up():
        f(np.ones(3, np.float32))
    ready = compiles._state["ready"]
    compiles.mark_ready()
    try:
        f(np.ones(5, np.float32))  # a new shape: compiles again
        f(np.ones(5, np.float32))  # cached: nothing
    finally:
        compiles._state["ready"] = ready
    new = {k: v - before.get(k, 0) for k, v in compiles.counts().items()
           if v != before.get(k, 0)}
    assert new == {("warmup", "jit(<lambda>)"): 1, ("serving", "jit(<lambda>)"): 1}


def test_compile_ahead_compiles_on_worker_threads_as_warmup_and_calls_find_them():
    compiles.install()
    f = jax.jit(lambda x: x * 5 - 2)
    inputs = [np.ones(n, np.float32) for n in (7, 11, 13)]
    before = compiles.counts()
    compiles.compile_ahead([lambda x=x: f.lower(x) for x in inputs], "test")
    for x in inputs:  # jit's call path reuses the executables: no compile
        np.testing.assert_allclose(f(x), x * 5 - 2)
    new = {k: v - before.get(k, 0) for k, v in compiles.counts().items()
           if v != before.get(k, 0)}
    assert new == {("warmup", "jit(<lambda>)"): 3}


def test_compile_ahead_raises_a_compile_error():
    class Broken:
        def compile(self):
            raise RuntimeError("bad program")

    with pytest.raises(RuntimeError, match="bad program"):
        compiles.compile_ahead([Broken], "test")


def test_compile_threads_is_the_cpus_unless_set(monkeypatch):
    monkeypatch.delenv("SLUICE_COMPILE_THREADS", raising=False)
    for cpus, threads in ((1, 1), (2, 2), (3, 3), (16, 8), (64, 8)):
        monkeypatch.setattr(compiles.os, "sched_getaffinity", lambda _, c=cpus: set(range(c)))
        assert compiles.compile_threads() == threads
    monkeypatch.setenv("SLUICE_COMPILE_THREADS", "3")
    assert compiles.compile_threads() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("SLUICE_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match="SLUICE_COMPILE_THREADS"):
            compiles.compile_threads()


class Served(ThreadedServer):
    """A warmed-up engine behind `OpenAIServer`, served by uvicorn on a thread."""

    def __init__(self, model):
        self.engine = LLMEngine(model, EngineConfig(
            warmup=True, max_model_len=MAX_LEN, max_num_seqs=1, max_num_batched_tokens=16,
            max_prefill_seqs=1, seed=0))
        embed.warmup(model, MAX_LEN)
        self.server = OpenAIServer(AsyncEngine(self.engine), ServerConfig("tiny"))
        super().__init__(self.server.app)


@pytest.mark.slow
def test_no_compile_while_serving_after_warmup():
    compiles.install()
    srv = Served(load_model("tiny", dtype="float32"))
    try:
        before = compiles.counts()
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            r = http.post("/v1/completions", json=dict(
                model="tiny", prompt="Hello there", max_tokens=6, n=2, temperature=0.8,
                top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.2,
                presence_penalty=0.5, frequency_penalty=0.3, seed=7, stop=["zz"],
                logprobs=3, ignore_eos=True))
            assert r.status_code == 200, r.text
            assert [len(c["logprobs"]["tokens"]) for c in r.json()["choices"]] == [6, 6]
            r = http.post("/v1/completions", json=dict(  # scoring a prompt, as lm-eval does
                model="tiny", prompt="Hello there", max_tokens=0, echo=True, logprobs=1,
                temperature=0))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None
            r = http.post("/v1/chat/completions", json=dict(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                logprobs=True, top_logprobs=2))
            assert r.status_code == 200, r.text
            r = http.post("/v1/embeddings", json=dict(
                model="tiny", input=["hello", "a longer one: bucket 32"]))
            assert r.status_code == 200, r.text
            new = {k: v - before.get(k, 0) for k, v in compiles.counts().items()
                   if v != before.get(k, 0)}
            assert new == {}, f"compiled while serving: {new}"
            metrics = http.get("/metrics").text
        series = [line for line in metrics.splitlines()
                  if line.startswith("sluice:compiles_total{")]
        for (reason, function), n in compiles.counts().items():
            assert (f'sluice:compiles_total{{function="{function}",model_name="tiny",'
                    f'reason="{reason}"}} {float(n)}') in series, (reason, function, n)
    finally:
        srv.stop()


def test_throughput_warmup_batch_does_not_prime_the_prefix_cache():
    """`sluice bench throughput`: the untimed warm-up batch must not share prompts
    with the timed one, else the timed batch runs on prefix-cache hits (other step
    shapes, compiled inside the timer with --no-warmup, and less work)."""
    from sluice.runtime.benchmark import random_prompts, throughput
    from sluice.runtime.llm import LLM

    llm = LLM(load_model("tiny", dtype="float32"), warmup=False, max_model_len=64,
              max_num_seqs=1, max_num_batched_tokens=32)
    prompts = random_prompts(2, 32, llm.model.config.vocab_size)
    result = throughput(llm, prompts, output_len=1)  # prefill steps only: few compiles
    assert result["output_tokens"] == 2
    assert llm.engine.stats().prefix_cache_hits == 0


def test_readiness_is_the_servers_and_later_instances_start_warming_up(tiny, monkeypatch):
    """A model runner's warm-up does not mark the process ready (another instance
    may still be starting; the server's lifespan decides), and a cluster instance
    launched once the server is ready (scale-up, replacement) counts its start-up
    compiles as warm-up, not as compiles that stall a request."""
    import dataclasses

    from sluice.runtime.model_runner import ModelRunner
    from sluice.scheduler.async_cluster import LocalLauncher
    # the step programs' compiles are not the point here: only what warm-up decides
    monkeypatch.setattr(ModelRunner, "warmup", lambda self, defer=False: None)
    compiles.install()
    ready = compiles._state["ready"]
    compiles._state["ready"] = False
    config = EngineConfig(warmup=True, max_model_len=32, max_num_seqs=1,
                          max_num_batched_tokens=16, max_prefill_seqs=1)
    launched = []
    try:
        first = LocalLauncher(tiny, config)
        launched.append((first, first.launch(lambda out: None, lambda *a: None)))
        assert not compiles._state["ready"]
        compiles.mark_ready()  # what the server's lifespan does once it starts
        before = compiles.counts()
        # a pool size of its own: its allocation compiles anew
        later = LocalLauncher(tiny, dataclasses.replace(config, warmup=False,
                                                        kv_cache_memory=37 * 32 * 1024))
        launched.append((later, later.launch(lambda out: None, lambda *a: None)))
        new = {k: v - before.get(k, 0) for k, v in compiles.counts().items()
               if v != before.get(k, 0)}
        assert new and {reason for reason, _ in new} == {"warmup"}, new
    finally:
        compiles._state["ready"] = ready
        for launcher, instance in launched:
            launcher.terminate(instance)


def test_scoring_steps_with_and_without_decode_rows_compile_nothing_after_warmup(tiny):
    """Review finding (7): the server test above runs max_num_seqs=1, whose one
    scoring program always carries a (padded) decode row. With max_num_seqs=5 a
    mixed step's decode group is either left out or 5 rows wide, so a prompt scored
    alone and one scored beside a decoding request run two different scoring
    programs; warm-up compiled both (max_model_len 16: one page width, few shapes)."""
    from conftest import run_to_finish

    from sluice.runtime import SamplingParams
    compiles.install()
    engine = LLMEngine(tiny, EngineConfig(warmup=True, max_model_len=16, max_num_seqs=5,
                                          max_num_batched_tokens=16, max_prefill_seqs=1,
                                          seed=0))
    assert len(engine.runner.scoring_shapes()) == 2
    greedy = dict(temperature=0.0, ignore_eos=True)
    before = compiles.counts()
    alone = run_to_finish(engine, {"alone": ([5, 6, 7, 8, 9, 10], SamplingParams(
        max_tokens=1, prompt_logprobs=1, **greedy))})["alone"]
    engine.add_request("decoding", {"prompt_token_ids": [3, 4, 5]},
                       SamplingParams(max_tokens=8, **greedy))
    engine.step()  # its prompt: from here on it decodes
    decoding = engine.scheduler.requests["decoding"]
    engine.add_request("beside", {"prompt_token_ids": [5, 6, 7, 8, 9, 10]},
                       SamplingParams(max_tokens=1, prompt_logprobs=1, **greedy))
    tokens = len(decoding.output_token_ids)
    outs = engine.step()  # the scored prompt chunk and a decode row in one step
    assert len(decoding.output_token_ids) == tokens + 1
    done = {**{o.request_id: o for o in outs if o.finished}, **run_to_finish(engine, {})}
    new = {k: v - before.get(k, 0) for k, v in compiles.counts().items()
           if v != before.get(k, 0)}
    assert new == {}, f"compiled after warm-up: {new}"
    # the two programs score alike
    np.testing.assert_allclose([lp.logprob for lp in done["beside"].prompt_logprobs[1:]],
                               [lp.logprob for lp in alone.prompt_logprobs[1:]], atol=2e-5)


def test_speculative_warmup_compiles_each_step_program_once(tiny):
    """Issue 21: with speculative decoding on, warm-up compiled every step shape
    with a prompt group twice, with and without the sample rows of drafted rows.
    Now one program serves both: warm-up compiles one step program per decode
    shape, per mixed shape and per scoring shape (as with speculation off), and
    a prompt step and drafted steps compile nothing after it. (A pool of 19
    blocks of its own, so no other test's step programs are in JAX's cache.)"""
    from conftest import run_to_finish

    from sluice.runtime import SamplingParams
    compiles.install()
    before = compiles.counts()
    engine = LLMEngine(tiny, EngineConfig(
        warmup=True, max_model_len=32, max_num_seqs=5, max_num_batched_tokens=16,
        max_prefill_seqs=1, seed=0, num_speculative_tokens=2, kv_cache_memory=19 * 32 * 1024))
    runner = engine.runner
    assert engine.block_manager.num_blocks == 19
    warm = {f: n - before.get(("warmup", f), 0) for (reason, f), n in compiles.counts().items()
            if reason == "warmup"}
    pages, mixed = len(runner.page_buckets), len(runner.mixed_decode_buckets)
    assert mixed == 2  # with and without a decode group: both scoring programs too
    assert warm["jit(_forward_logits)"] == (len(runner.seq_buckets) * pages
                                            + mixed * len(runner.token_buckets) * pages + mixed)
    before = compiles.counts()
    out = run_to_finish(engine, {"quote": ([5, 6, 7, 8] * 3, SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True))})["quote"]
    assert len(out.outputs[0].token_ids) == 12 and engine.scheduler.spec_stats.num_drafts > 0
    new = {k: v - before.get(k, 0) for k, v in compiles.counts().items()
           if v != before.get(k, 0)}
    assert new == {}, f"compiled after warm-up: {new}"


def test_deferred_warmup_steps_on_compiled_covers_then_refines(tiny, monkeypatch):
    """A server's warm-up (``defer_warmup``) compiles a covering set first: until the
    process is ready and the rest compile, a 1-row decode runs on the 2-row program and
    a prompt alone on the mixed program with a full decode group, compiling nothing,
    with the tokens the exact programs give once `mark_ready` has compiled them (as
    warm-up) and put them in use."""
    from conftest import run_to_finish
    from sluice.runtime.sampling_params import SamplingParams

    compiles.install()
    monkeypatch.setitem(compiles._state, "ready", False)
    monkeypatch.setattr(compiles, "_after_ready", [])
    engine = LLMEngine(tiny, EngineConfig(max_model_len=64, max_num_seqs=8,
                                          max_num_batched_tokens=32, seed=0,
                                          defer_warmup=True))
    runner = engine.runner
    assert not runner.refined.is_set()
    # decode buckets 1, 2, 4, 8: 8 and 2 first; prompt steps without a decode group later
    assert {s.decode_seqs for s, _ in runner._deferred} == {0, 1, 4}
    rng = np.random.default_rng(0)
    requests = {"a": (rng.integers(1, 250, 20).tolist(),
                      SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))}
    before = compiles.counts()
    covered = run_to_finish(engine, requests)
    assert compiles.counts() == before  # padded onto compiled programs: no compile
    assert runner.shape_for([], [_row(engine, 20)]).decode_seqs == 8
    assert runner.shape_for([_row(engine, 20)], []).decode_seqs == 2

    compiles.mark_ready()  # the server's lifespan: the deferred programs compile now
    assert runner.refined.wait(timeout=600)
    assert not runner._deferred
    new = {k for k, v in compiles.counts().items() if v != before.get(k, 0)}
    assert {reason for reason, _ in new} <= {"warmup"}, new
    assert runner.shape_for([], [_row(engine, 20)]).decode_seqs == 0
    assert runner.shape_for([_row(engine, 20)], []).decode_seqs == 1
    after = compiles.counts()
    exact = run_to_finish(engine, {"b": requests["a"]})
    assert compiles.counts() == after
    assert exact["b"].outputs[0].token_ids == covered["a"].outputs[0].token_ids
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def _row(engine: LLMEngine, n: int):
    """A prompt chunk of ``n`` tokens, for asking the runner which shape it takes."""
    from sluice.runtime.model_runner import StepRow
    from sluice.runtime.sampling_params import SamplingParams

    group = engine.intake.prepare("probe", {"prompt_token_ids": list(range(1, n + 1))},
                                  SamplingParams(temperature=0))
    return StepRow(group.requests[0], n, [0, 1])
