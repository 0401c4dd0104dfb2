"""Engine correctness: batched outputs equal the one-at-a-time reference, and
no request or block is ever lost."""

from __future__ import annotations

import asyncio
import random

import jax
import numpy as np
import pytest

from sluice.runtime import LLM, AsyncEngine, SamplingParams, greedy_generate
from sluice.runtime import compiles
from sluice.runtime.engine import EngineConfig, LLMEngine

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_engine(model, **kw) -> LLMEngine:
    kw.setdefault("warmup", False)
    kw.setdefault("max_model_len", 256)
    return LLMEngine(model, EngineConfig(**kw))


def run_all(engine: LLMEngine, prompts, params) -> list:
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[str(i)] for i in range(len(prompts))]


def random_prompts(n, lo, hi, seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(lo, hi)).tolist() for _ in range(n)]


def reference(model, prompts, max_tokens):
    return [greedy_generate(model, p, m, stop_at_eos=False) for p, m in zip(prompts, max_tokens)]


@pytest.mark.parametrize("engine_kw", [
    dict(),                                                     # plain continuous batching
    dict(max_num_batched_tokens=32),                            # chunked prefill
    dict(kv_cache_memory=20 * 32 * 1024, max_model_len=160),    # tiny pool: forced preemption
    dict(max_num_seqs=3),                                       # queueing
    dict(attention_backend="reference"),                        # the reference attention
    dict(kv_cache_memory=20 * 32 * 1024, max_model_len=160,     # preemption by swapping
         swap_space=64 * 32 * 1024),
], ids=["batched", "chunked", "preempt", "queued", "reference-backend", "swap"])
def test_greedy_matches_one_at_a_time(tiny, engine_kw):
    prompts = random_prompts(8, 1, 90)
    max_tokens = [5 + 3 * i for i in range(8)]
    engine = make_engine(tiny, **engine_kw)
    free0 = engine.block_manager.num_free_blocks
    outs = run_all(engine, [{"prompt_token_ids": p} for p in prompts],
                   [SamplingParams(max_tokens=m, **GREEDY) for m in max_tokens])
    got = [o.outputs[0].token_ids for o in outs]
    assert got == reference(tiny, prompts, max_tokens)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    if "kv_cache_memory" in engine_kw:
        assert engine.stats().num_preemptions > 0
        assert any(o.metrics[0].num_preemptions > 0 for o in outs)
        assert (engine.stats().num_swap_outs > 0) == ("swap_space" in engine_kw)
    if "swap_space" in engine_kw:
        space = engine.scheduler.kv.host
        assert space.num_free_blocks == space.num_blocks
    assert engine.block_manager.num_free_blocks == free0 == engine.block_manager.num_blocks


def test_prefix_cache_hits_keep_outputs(tiny):
    shared = random_prompts(1, 70, 71, seed=3)[0]
    prompts = [shared + tail for tail in random_prompts(4, 1, 20, seed=4)]
    engine = make_engine(tiny)
    first = run_all(engine, [{"prompt_token_ids": prompts[0]}], [SamplingParams(max_tokens=8, **GREEDY)])
    rest = []
    for i, p in enumerate(prompts[1:]):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=8, **GREEDY))
    while engine.has_unfinished_requests():
        rest += [o for o in engine.step() if o.finished]
    rest.sort(key=lambda o: o.request_id)
    assert engine.stats().prefix_cache_hits >= 3 * 64
    assert all(o.metrics[0].num_cached_tokens == 64 for o in rest)
    assert [first[0].outputs[0].token_ids] + [o.outputs[0].token_ids for o in rest] == \
        reference(tiny, prompts, [8] * 4)


def test_seeded_sampling_independent_of_batch(tiny):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=12,
                            ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    alone = run_all(make_engine(tiny), [prompt], [params])[0].outputs[0].token_ids
    others = [{"prompt_token_ids": p} for p in random_prompts(5, 3, 40, seed=9)]
    mixed_params = [SamplingParams(temperature=1.0, seed=s, max_tokens=20) for s in range(5)]
    batch = run_all(make_engine(tiny, max_num_batched_tokens=16), others[:2] + [prompt] + others[2:],
                    mixed_params[:2] + [params] + mixed_params[2:])
    assert batch[2].outputs[0].token_ids == alone
    # A different seed gives a different sample (with overwhelming probability).
    other = run_all(make_engine(tiny), [prompt], [SamplingParams(
        temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=12, ignore_eos=True)])
    assert other[0].outputs[0].token_ids != alone


def test_n_completions_and_logprobs(tiny):
    out = run_all(make_engine(tiny), ["Hello there"],
                  [SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, logprobs=2,
                                  ignore_eos=True)])[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == 6
        for tok, lp in zip(c.token_ids, c.logprobs):
            assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 2


def test_stop_conditions(tiny):
    prompt = {"prompt_token_ids": [1, 2, 3]}
    ref = greedy_generate(tiny, [1, 2, 3], 10, stop_at_eos=False)
    engine = make_engine(tiny)
    by_token = run_all(engine, [prompt], [SamplingParams(stop_token_ids=[ref[3]], **GREEDY)])[0]
    assert by_token.outputs[0].token_ids == ref[:ref.index(ref[3]) + 1]
    assert by_token.outputs[0].finish_reason == "stop"
    assert by_token.outputs[0].stop_reason == ref[3]
    text = tiny.tokenizer.decode(ref)
    stop = text[2:4]
    by_str = run_all(engine, [prompt], [SamplingParams(stop=[stop], max_tokens=10, **GREEDY)])[0]
    assert by_str.outputs[0].finish_reason == "stop" and by_str.outputs[0].stop_reason == stop
    assert by_str.outputs[0].text == text[:text.index(stop)]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_bad_input_raises_before_queueing(tiny):
    engine = make_engine(tiny, max_model_len=64)
    ok = SamplingParams(max_tokens=4)
    cases = [("", ok, "prompt"), ({"prompt_token_ids": []}, ok, "prompt"),
             ({"prompt_token_ids": [1] * 64}, ok, "prompt"),
             ({"prompt_token_ids": [1, 99999]}, ok, "prompt_token_ids"),
             ({"tokens": [1]}, ok, "prompt")]
    for prompt, params, field in cases:
        with pytest.raises(ValueError, match=field):
            engine.add_request("x", prompt, params)
    for kwargs, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"),
                          (dict(top_p=1.5), "top_p"), (dict(max_tokens=0), "max_tokens")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    assert not engine.has_unfinished_requests()
    engine.abort_request("never-existed")
    # A long prompt's output is capped by the context, not rejected.
    out = run_all(engine, [{"prompt_token_ids": [1] * 60}], [SamplingParams(max_tokens=50, **GREEDY)])
    assert len(out[0].outputs[0].token_ids) == 4 and out[0].outputs[0].finish_reason == "length"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_random_requests_with_aborts_leak_nothing(tiny):
    # A small swap space: some preemptions swap, others find it full and recompute.
    engine = make_engine(tiny, kv_cache_memory=24 * 32 * 1024, max_model_len=96,
                         max_num_seqs=16, max_num_batched_tokens=64, swap_space=2 * 32 * 1024)
    rng = random.Random(0)
    live: set[str] = set()
    finished = 0
    greedy: dict[str, list[int]] = {}  # greedy single completions: request id -> prompt
    preempted: dict[str, list[int]] = {}  # those that finished after a preemption -> output
    for i in range(1000):
        n = rng.randint(1, 40)
        prompt = {"prompt_token_ids": [rng.randrange(256) for _ in range(n)]}
        params = SamplingParams(max_tokens=rng.randint(1, 20), temperature=rng.choice([0.0, 1.0]),
                                seed=i, n=rng.choice([1, 1, 2]))
        engine.add_request(str(i), prompt, params)
        live.add(str(i))
        if params.is_greedy and params.n == 1:
            greedy[str(i)] = prompt["prompt_token_ids"]
        if rng.random() < 0.3:
            victim = rng.choice(sorted(live))
            engine.abort_request(victim)
            live.discard(victim)
        if rng.random() < 0.5:
            finished += _collect(engine.step(), live, greedy, preempted)
    while engine.has_unfinished_requests():
        finished += _collect(engine.step(), live, greedy, preempted)
    assert not live
    assert finished > 500
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    stats = engine.stats()
    assert 0 < stats.num_swap_outs < stats.num_preemptions
    assert engine.scheduler.kv.host.num_free_blocks == engine.scheduler.kv.host.num_blocks
    # Preempted (swapped or recomputed) greedy requests still match the reference.
    assert len(preempted) >= 5
    for rid, tokens in sorted(preempted.items())[:8]:
        assert tokens == greedy_generate(tiny, greedy[rid], len(tokens), stop_at_eos=False), rid


def _collect(outputs, live: set[str], greedy: dict, preempted: dict) -> int:
    """Mark finished requests; keep greedy outputs that survived a preemption."""
    done = [o for o in outputs if o.finished]
    for o in done:
        live.discard(o.request_id)
        if o.request_id in greedy and o.metrics[0].num_preemptions and \
                o.outputs[0].finish_reason == "length":
            preempted[o.request_id] = o.outputs[0].token_ids
    return len(done)


def test_llm_api_and_chat(tiny):
    llm = LLM(tiny, warmup=False, max_model_len=256)
    outs = llm.generate(["héllo wörld 你好", {"prompt_token_ids": [1, 2, 3]}],
                        SamplingParams(max_tokens=5, **GREEDY))
    assert len(outs) == 2 and outs[0].prompt == "héllo wörld 你好"
    assert outs[0].prompt_token_ids == tiny.tokenizer.encode("héllo wörld 你好")
    assert "\ufffd" not in outs[0].outputs[0].text or outs[0].outputs[0].text == \
        tiny.tokenizer.decode(outs[0].outputs[0].token_ids)
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3, **GREEDY))
    expected_ids = tiny.tokenizer.encode(
        tiny.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]),
        add_special_tokens=False)
    assert chat[0].prompt_token_ids == expected_ids
    with pytest.raises(ValueError, match="messages"):
        llm.chat([[]])


def test_async_engine_streams_and_aborts(tiny):
    engine = make_engine(tiny)
    aeng = AsyncEngine(engine)

    async def main():
        params = SamplingParams(max_tokens=12, **GREEDY)
        stream = await aeng.generate({"prompt_token_ids": [4, 5, 6]}, params, request_id="a")
        deltas, last = [], None
        async for out in stream:
            deltas.append(out.outputs[0].delta)
            last = out
        assert last.finished and "".join(deltas) == last.outputs[0].text
        assert last.outputs[0].token_ids == greedy_generate(tiny, [4, 5, 6], 12, stop_at_eos=False)
        # Abort by closing the stream early (a client disconnect).
        stream = await aeng.generate({"prompt_token_ids": [7, 8]},
                                     SamplingParams(max_tokens=200, **GREEDY), request_id="b")
        async for out in stream:
            break
        await stream.aclose()
        with pytest.raises(ValueError, match="temperature"):
            await aeng.generate("x", SamplingParams(temperature=-2))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not engine.has_unfinished_requests():
                break
        await aeng.shutdown()

    asyncio.run(main())
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_async_engine_set_priority(tiny):
    """A re-rank made right after the add applies to it (calls reach the engine
    in order): with one sequence slot, ``b`` raised over ``a`` finishes first;
    unknown and finished ids give False, a bad priority a ValueError."""
    engine = make_engine(tiny, scheduling_policy="priority", max_num_seqs=1)
    aeng = AsyncEngine(engine)

    async def main():
        params = SamplingParams(max_tokens=20, **GREEDY)
        order: list[str] = []

        async def drain(name: str, stream) -> None:
            async for _ in stream:
                pass
            order.append(name)

        a = await aeng.generate({"prompt_token_ids": [4, 5]}, params, request_id="a", priority=5)
        b = await aeng.generate({"prompt_token_ids": [6, 7]}, params, request_id="b", priority=5)
        assert await aeng.set_priority("b", 0)
        assert not await aeng.set_priority("nobody", 0)
        with pytest.raises(ValueError, match="priority: must be an integer"):
            await aeng.set_priority("a", "high")
        await asyncio.gather(drain("a", a), drain("b", b))
        assert not await aeng.set_priority("b", 1)  # finished
        await aeng.shutdown()
        return order

    assert asyncio.run(main()) == ["b", "a"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_engine_on_no_named_device_uses_jaxs_default_device(tiny):
    """An engine built inside ``jax.default_device(d)`` puts its KV pool on ``d``, beside
    its weights (not on the first device, where the step would move the weights)."""
    device = jax.devices()[2]
    with jax.default_device(device):
        model = tiny.with_params(jax.device_put(tiny.params, device))
        engine = make_engine(model, max_num_seqs=2, max_num_batched_tokens=32,
                             max_model_len=64)
        engine.add_request("r", "a prompt", SamplingParams(max_tokens=3, temperature=0.0))
        while engine.has_unfinished_requests():
            engine.step()
    assert engine.runner.kv_cache.devices() == {device}


def test_warmup_compiles_buckets(tiny):
    # parameters committed to their device, as a real model's are (loaded from a file):
    # an engine on no named device must still warm up the programs it serves with
    committed = tiny.with_params(jax.device_put(tiny.params, jax.devices()[0]))
    engine = make_engine(committed, max_num_seqs=4, max_num_batched_tokens=32,
                         max_model_len=64, warmup=True)
    # Decode: 3 sequence buckets; with prompt chunks: 2 token buckets (a decode group of
    # 4 rows is cheap enough to always carry); one table width (the default backend
    # reads only live pages).
    assert len(engine.runner.shapes()) == 3 + 2
    # The reference reads every page of the table, so it gets 3 widths.
    reference = make_engine(tiny, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
                            attention_backend="reference")
    assert len(reference.runner.shapes()) == 3 * 3 + 2 * 3
    # After warm-up, greedy and temperature sampling over varied batches compile nothing
    # (warm-up compiles the forwards ahead of time, so jit's dispatch cache still gains
    # entries on first use: count XLA compiles, not cache entries).
    compiled = sum(compiles.counts().values())
    prompts = ["abc", "a much longer prompt that needs two chunks of the budget", "x", "yz", "q"]
    params = [SamplingParams(max_tokens=3 + i, **GREEDY) if i % 2 else
              SamplingParams(max_tokens=3 + i, temperature=1.0, seed=i, ignore_eos=True)
              for i in range(5)]
    out = run_all(engine, prompts, params)
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 4, 5, 6, 7]
    assert sum(compiles.counts().values()) == compiled


def test_pool_budget_reads_the_engines_own_device():
    """The pool's memory budget comes from the device the engine is pinned to, not
    from the process's first device (a CPU here, which would mean 'no budget')."""
    from types import SimpleNamespace

    from sluice.runtime.engine import _free_device_memory

    gpu = SimpleNamespace(platform="gpu",
                          memory_stats=lambda: {"bytes_limit": 1000, "bytes_in_use": 200})
    assert _free_device_memory(0.5, gpu) == 400
    assert _free_device_memory(0.5, None) is None  # the first device here is a CPU


def test_engine_pinned_to_a_device_from_a_weight_free_model():
    """A `LazyModel` (``load_model(weights=False)``, the Ray driver's) can back an
    engine pinned to a device: its weights load then, placed on that device."""
    from sluice.runtime.loader import load_model

    lazy = load_model("tiny", weights=False)
    engine = make_engine(lazy, device=jax.devices()[1], max_num_seqs=2)
    assert engine.model.params["embed"].devices() == {jax.devices()[1]}
