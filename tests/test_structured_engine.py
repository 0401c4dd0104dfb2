"""Structured outputs in the engine (random-weight ``tiny`` model): constrained
completions always satisfy their constraint (the mask alone guarantees it), the
unconstrained rows of the same batches are unchanged, and a constrained output is
the same token for token under swap and recompute preemption and live migration
(its grammar state rebuilt from the emitted tokens where it lands)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import threading

import jsonschema
import numpy as np
import pytest

from sluice.runtime import SamplingParams, greedy_generate
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.structured_output import PROBE_TOKENS, StructuredOutputs

BLOCK = 32 * 1024  # bytes of one tiny-model KV block (16 tokens)
ITEM = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0,
                                               "maximum": 99},
                                        "ok": {"type": "boolean"}},
        "required": ["id", "ok"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[a-z]{1,5}$"},
    "items": {"type": "array", "items": ITEM, "maxItems": 2}},
    "required": ["name", "items"], "additionalProperties": False}
REGEX = r"[a-z]{2,6}@[a-z]{2,4}\.(com|org)"
CONSTRAINTS = [StructuredOutputs(json=SCHEMA), StructuredOutputs(regex=REGEX),
               StructuredOutputs(choice=["alpha", "beta", "gamma"])]


def satisfies(c: StructuredOutputs, text: str) -> bool:
    if c.json is not None:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    if c.regex is not None:
        return re.fullmatch(REGEX, text) is not None
    return text in c.choice


def engine_for(model, **kw) -> LLMEngine:
    """test_preemption's engine (the same compiled step shapes): 12 KV blocks, so
    the whole set of requests at once preempts, and one request alone does not."""
    return LLMEngine(model, EngineConfig(
        warmup=False, max_model_len=128, seed=0, scheduling_policy="priority", max_num_seqs=4,
        max_num_batched_tokens=64, kv_cache_memory=12 * BLOCK, max_preemptions=100, **kw))


def requests(n: int = 6) -> dict[str, tuple[list[int], SamplingParams]]:
    """Constrained, sampled requests (JSON; regex or choice with n = 2) and
    unconstrained greedy ones."""
    rng = np.random.default_rng(3)
    out = {}
    for i in range(n):
        prompt = rng.integers(0, 250, int(rng.integers(8, 30))).tolist()
        if i % 3 == 2:
            out[f"free{i}"] = (prompt, SamplingParams(temperature=0.0, ignore_eos=True,
                                                      max_tokens=30))
        else:
            out[f"so{i}"] = (prompt, SamplingParams(
                temperature=1.0, seed=i, max_tokens=90, n=1 + i % 3,
                structured_outputs=CONSTRAINTS[0 if i % 3 == 0 else 1 + i // 3]))
    return out


def run(engine: LLMEngine, reqs: dict, reshuffle: bool = False) -> dict[str, list]:
    """The requests to the end, all at once re-ranked every step (``reshuffle``:
    which preempts), else one at a time; each request's completions as (tokens,
    text, finish reason)."""
    rng = np.random.default_rng(5)
    outs = {}
    for rid in ([None] if reshuffle else reqs):
        batch = reqs if reshuffle else {rid: reqs[rid]}
        for i, (r, (prompt, params)) in enumerate(batch.items()):
            engine.add_request(r, {"prompt_token_ids": prompt}, params, priority=i % 3)
        outs.update(_drain(engine, reqs, rng, reshuffle, outs))
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # nothing leaks
    return outs


def _run_out(engine: LLMEngine) -> dict:
    """Step ``engine`` until idle: each finished request's (tokens, text, finish reason)
    per completion."""
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = [(c.token_ids, c.text, c.finish_reason)
                                      for c in o.outputs]
    return outs


def _drain(engine: LLMEngine, reqs: dict, rng, reshuffle: bool, done: dict) -> dict:
    outs = {}
    while engine.has_unfinished_requests():
        if reshuffle:
            live = [r for r in reqs if r not in outs and r not in done and r in engine.groups]
            for rid in rng.choice(live, size=min(2, len(live)), replace=False):
                engine.set_priority(str(rid), int(rng.integers(4)))
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = [(c.token_ids, c.text, c.finish_reason)
                                      for c in o.outputs]
    return outs


@pytest.fixture(scope="module")
def undisturbed(tiny):
    engine = engine_for(tiny)
    outs = run(engine, requests())
    assert engine.scheduler.num_preemptions == 0
    return outs


def test_constrained_outputs_satisfy_and_free_rows_are_unchanged(tiny, undisturbed):
    """In one batch (preempting each other), constrained rows satisfy their
    constraints and the unconstrained greedy rows equal the plain reference."""
    reqs = requests()
    batched = run(engine_for(tiny), reqs, reshuffle=True)
    for rid, comps in batched.items():
        prompt, params = reqs[rid]
        if params.structured_outputs is None:
            assert comps[0][0] == greedy_generate(tiny, prompt, 30, stop_at_eos=False)
            continue
        assert len(comps) == params.n
        for tokens, text, finish in comps:
            assert finish == "stop", (rid, text)
            assert satisfies(params.structured_outputs, text), (rid, text)
    texts = [t for rid, comps in undisturbed.items() if rid.startswith("so")
             for _, t, _ in comps]
    assert len(set(texts)) > 2  # sampled: the constraint, not one fixed output


@pytest.mark.parametrize("mode", [
    dict(),  # recompute
    dict(swap_space=64 * BLOCK, preemption_mode="swap"),
])
def test_preemption_does_not_change_constrained_outputs(tiny, undisturbed, mode):
    engine = engine_for(tiny, **mode)
    assert run(engine, requests(), reshuffle=True) == undisturbed
    sched = engine.scheduler
    assert sched.num_preemptions > 3
    if mode:
        assert sched.num_swap_outs > 0
        engine.swapper.close()
    else:
        assert sched.num_recomputes > 0


def test_live_migration_rebuilds_the_grammar_from_the_tokens(tiny, undisturbed):
    """``so0`` (a JSON schema) moves mid-output to another engine, its handover
    pickled as the Ray transport does (the native matcher does not travel; the
    destination rebuilds it from the emitted tokens): its output is unchanged."""
    reqs = requests()
    src, dst = engine_for(tiny), engine_for(tiny)  # one request alone: no preemption
    prompt, params = reqs["so0"]
    src.add_request("so0", {"prompt_token_ids": prompt}, params)
    while len(src.groups["so0"].requests[0].output_token_ids) < 8:
        src.step()
    epoch = src.migration.epoch("so0")
    chunks = src.migration.export_kv("so0", {}, epoch)
    assert dst.migration.import_kv("so0", chunks)
    handover = pickle.loads(pickle.dumps(src.migration.suspend(
        "so0", {"so0": chunks[0].num_blocks}, epoch)))
    assert all(r.grammar.matcher is None for r in handover.group.requests)
    assert dst.migration.adopt(handover)
    src.migration.release("so0")
    assert _run_out(dst)["so0"] == undisturbed["so0"]
    for e in (src, dst):
        assert e.block_manager.num_free_blocks == e.block_manager.num_blocks



def test_redispatch_replays_the_tokens_into_a_fresh_grammar(tiny, undisturbed):
    """As the cluster re-dispatches after an instance died: a fresh request with
    the caller's tokens replayed continues elsewhere; its new matcher is rebuilt
    from those tokens and the output is unchanged."""
    prompt, params = requests()["so0"]
    src, dst = engine_for(tiny), engine_for(tiny)
    src.add_request("so0", {"prompt_token_ids": prompt}, params)
    seen = None
    while seen is None or len(seen.outputs[0].token_ids) < 8:
        seen = next((o for o in src.step() if o.request_id == "so0"), seen)
    group = dst.prepare("so0", {"prompt_token_ids": prompt}, params)
    group.requests[0].replay(seen.outputs[0].token_ids, seen.outputs[0].text)
    assert group.requests[0].grammar.consumed == 0  # nothing fed to a matcher yet
    src.abort_request("so0")
    dst.enqueue(group)
    assert _run_out(dst)["so0"] == undisturbed["so0"]


def test_ignore_eos_ends_a_finished_grammar_with_stop_and_logprobs_per_token(tiny):
    """With ignore_eos the grammar's own end (it allowed only EOS, and got it) is
    still the end: "stop", not an "error" from refusing the token after it; and a
    refused token's log-probs are never recorded (one entry per output token)."""
    engine = engine_for(tiny)
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=60, ignore_eos=True,
                            logprobs=2, structured_outputs=StructuredOutputs(
                                choice=["alpha", "beta"]))
    engine.add_request("c", {"prompt_token_ids": [5, 6, 7]}, params)
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    (comp,) = final.outputs
    assert (comp.finish_reason, comp.text in ("alpha", "beta")) == ("stop", True)
    assert comp.token_ids[-1] in tiny.eos_token_ids
    assert len(comp.logprobs) == len(comp.token_ids)
    stuck = dataclasses.replace(params, structured_outputs=StructuredOutputs(regex="x[a&&b]"))
    engine.add_request("s", {"prompt_token_ids": [5, 6, 7]}, stuck)  # allows no token
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    (comp,) = final.outputs
    assert (comp.finish_reason, comp.text) == ("error", "")
    assert len(comp.logprobs) == len(comp.token_ids) == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_grammar_over_the_parser_limits_is_refused_at_add_request(tiny):
    """"(a{300}){300}" builds a lexer of millions of expressions: llguidance accepts
    the grammar and its first mask, then fails at the first token past `PARSER_LIMITS`.
    The compile's probe finds that, so ``add_request`` raises naming the field and
    nothing is queued (it used to be queued and end "error" later)."""
    engine = engine_for(tiny)
    heavy = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputs(
        regex="(a{300}){300}"))
    with pytest.raises(ValueError, match=r"^structured_outputs\.regex: .*too many expressions"):
        engine.add_request("heavy", {"prompt_token_ids": [5, 6, 7]}, heavy)
    assert not engine.has_unfinished_requests() and not engine.groups


def test_a_limit_hit_past_the_probe_ends_error_and_others_go_on(tiny):
    """A grammar whose limit is first hit deeper than `PROBE_TOKENS` (20 forced
    tokens, then the heavy part) passes intake and ends "error" naming the limit
    there, in a bounded time; the request beside it is unaffected."""
    assert PROBE_TOKENS < 20
    engine = engine_for(tiny)
    heavy = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=StructuredOutputs(
        regex="[xy]{20}(a{300}){300}"))
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.add_request("heavy", {"prompt_token_ids": [5, 6, 7]}, heavy)
    engine.add_request("free", {"prompt_token_ids": [5, 6, 7]}, free)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    assert done["heavy"].finish_reason == "error"
    assert "too many expressions" in done["heavy"].stop_reason
    assert re.fullmatch("[xy]{20}a*", done["heavy"].text)  # the mask held until then
    assert (done["free"].finish_reason, len(done["free"].token_ids)) == ("length", 8)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_add_request_compiles_on_the_callers_thread(tiny, compile_threads):
    """`LLMEngine.add_request` (and `LLM`, through the same intake) compiles the
    constraint on the caller's thread: the engine's step, here on its own thread,
    finds it compiled (it used to compile there, stalling every request's step)."""
    compiled_on = compile_threads
    engine = engine_for(tiny)
    params = SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=StructuredOutputs(
        regex="[0-9]{3}-callers-thread"))
    engine.add_request("r", {"prompt_token_ids": [5, 6, 7]}, params)
    outs = {}
    stepper = threading.Thread(target=lambda: outs.update(_run_out(engine)), name="step")
    stepper.start()
    stepper.join()
    assert compiled_on == [threading.current_thread().name]
    assert re.fullmatch("[0-9]{3}-callers-thread", outs["r"][0][1])


def test_steps_without_constrained_requests_pass_no_mask_hook(tiny):
    """The engine tracks its constrained requests: a step while none is live gives
    the model runner no ``token_masks`` hook (no per-row grammar work), one while a
    constrained request runs does, and once it finished the hook is gone again."""
    engine = engine_for(tiny)
    hooks = []
    execute = engine.runner.execute

    def spy(batch, during=None, token_masks=None):
        hooks.append(token_masks is not None)
        return execute(batch, during, token_masks)

    engine.runner.execute = spy
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    choice = SamplingParams(temperature=0.0, max_tokens=20,
                            structured_outputs=StructuredOutputs(choice=["ab", "cd"]))
    engine.add_request("free", {"prompt_token_ids": [5, 6, 7]}, long)
    engine.step()
    engine.step()
    engine.add_request("choice", {"prompt_token_ids": [8, 9]}, choice)
    outs = _run_out(engine)
    assert outs["choice"][0][1] in ("ab", "cd") and len(outs["free"][0][0]) == 40
    assert hooks[:2] == [False, False]  # only the free request
    assert hooks[2] and not hooks[-1]  # with the constrained one; after it finished
    assert hooks.count(True) <= 4  # its prefill, 2 tokens, EOS (and the step it ends)
