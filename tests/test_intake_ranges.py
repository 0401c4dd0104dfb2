"""Every numeric request field has a documented range, checked at intake.

A value at a bound is accepted and runs through the sampler on the tiny model
(the sampler computes in int32 and float32, so a bound it cannot represent would
fail here); a value past it is a ``ValueError`` naming the field, and over HTTP
a 400 naming the field -- whatever the JSON holds (``1e309``, ``NaN``, ``2**64``,
a 400-digit integer), never a 500.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sluice.runtime import AsyncEngine
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.intake import check_priority
from sluice.runtime.sampling_params import (INT32_MAX, INT64_MAX, INT64_MIN, RANGES,
                                            TOKEN_ID_RANGE, Range, SamplingParams)
from sluice.runtime.server import OpenAIServer, ServerConfig
from sluice.scheduler.policies import PriorityOptions

MAX_MODEL_LEN = 24  # max_tokens at its bound (2**31 - 1) is capped by the context


# Few sequences per step: few step shapes to compile (n = 128 runs in waves).
ENGINE = dict(warmup=False, max_model_len=MAX_MODEL_LEN, max_num_seqs=4,
              max_num_batched_tokens=32, max_prefill_seqs=4)


@pytest.fixture(scope="module")
def engine(tiny):
    return LLMEngine(tiny, EngineConfig(**ENGINE))


def run(engine: LLMEngine, params: SamplingParams, priority: int = 0) -> None:
    """Generate with ``params`` to the end; tokens are in the vocabulary and no block leaks."""
    free = engine.block_manager.num_free_blocks
    engine.add_request("r", "hi", params, priority=priority)
    done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            done = out if out.finished else done
    assert done is not None and len(done.outputs) == params.n
    vocab = engine.model.config.vocab_size
    for comp in done.outputs:
        assert comp.finish_reason in ("stop", "length") and comp.token_ids
        assert all(0 <= t < vocab for t in comp.token_ids)
        if params.logprobs is not None:
            assert len(comp.logprobs) == len(comp.token_ids)
            assert all(math.isfinite(lp.logprob) and len(lp.top) == params.logprobs
                       for lp in comp.logprobs)
    assert engine.block_manager.num_free_blocks == free


def cheap(field: str, value) -> SamplingParams:
    """Params with ``field`` = ``value`` and the rest kept cheap to run (two tokens,
    so penalties see an output token; one for each of many completions)."""
    base = {"max_tokens": 1 if field == "n" else 2}
    return SamplingParams(**{**base, field: value})


def inside(rule: Range, side: str):
    """The accepted value closest to a bound (the bound itself when it is closed)."""
    if side == "lo":
        v, is_open, toward = rule.lo, rule.lo_open, math.inf
    else:
        v, is_open, toward = rule.hi, rule.hi_open, -math.inf
    if not is_open:
        return v
    return v + (1 if toward > 0 else -1) if rule.kind is int else math.nextafter(v, toward)


def outside(rule: Range, side: str):
    """The refused value closest to a bound."""
    if side == "lo":
        v, is_open, away = rule.lo, rule.lo_open, -math.inf
    else:
        v, is_open, away = rule.hi, rule.hi_open, math.inf
    if is_open:
        return v
    return v + (1 if away > 0 else -1) if rule.kind is int else math.nextafter(v, away)


def accepted(rule: Range, value) -> bool:
    """The test's own reading of the table (kind, then finiteness, then bounds)."""
    if value is None:
        return rule.optional
    kinds = (int,) if rule.kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    lo_ok = value > rule.lo if rule.lo_open else value >= rule.lo
    hi_ok = value < rule.hi if rule.hi_open else value <= rule.hi
    return lo_ok and hi_ok


# -- the table ---------------------------------------------------------------------

def test_every_numeric_field_has_a_range():
    numeric = {f.name for f in dataclasses.fields(SamplingParams)
               if any(k in str(f.type) for k in ("int", "float"))}
    assert numeric - {"stop_token_ids"} == set(RANGES)  # stop_token_ids: TOKEN_ID_RANGE each
    assert TOKEN_ID_RANGE.hi == INT32_MAX


BOUNDS = [(field, side) for field in RANGES for side in ("lo", "hi")]


@pytest.mark.slow  # ~40 s on two cores: each sampler variant compiles once
@pytest.mark.parametrize("field,side", BOUNDS)
def test_every_bound_is_accepted_and_runs_through_the_sampler(engine, field, side):
    rule = RANGES[field]
    run(engine, cheap(field, inside(rule, side)))
    with pytest.raises(ValueError, match=f"^{field}: "):
        cheap(field, outside(rule, side))


# -- the property -------------------------------------------------------------------

HOSTILE = st.sampled_from([2**31, -2**31 - 1, 2**32, 2**63, -2**63 - 1, 2**64, -2**64,
                           10**400, -10**400, 1e309, -1e309, math.inf, -math.inf, math.nan,
                           1e39, -1e39, 3.5e38, 5e-324, -5e-324, 0, -1, 1, 0.5, 2.0, True,
                           "1", None, [1]])


def value_for(rule: Range):
    """Anything: bounds, just past them, inside, and hostile values."""
    sides = st.sampled_from(["lo", "hi"])
    num = st.integers() if rule.kind is int else st.floats(allow_nan=True)
    return st.one_of(sides.map(lambda s: inside(rule, s)), sides.map(lambda s: outside(rule, s)),
                     num, HOSTILE)


@st.composite
def field_and_value(draw):
    field = draw(st.sampled_from(sorted(RANGES)))
    return field, draw(value_for(RANGES[field]))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(fv=field_and_value())
@example(fv=("top_k", 2**31)).via("the issue's poison request")
@example(fv=("seed", 10**400)).via("an int too large for a float")
@example(fv=("max_tokens", 2**64))
def test_property_every_value_is_accepted_or_refused_naming_the_field(fv):
    field, value = fv
    rule = RANGES[field]
    if accepted(rule, value):
        p = cheap(field, value)
        assert getattr(p, field) == (value if value is None or rule.kind is int
                                     else float(value))
    else:
        with pytest.raises(ValueError, match=f"^{field}: "):
            cheap(field, value)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(fv=field_and_value())
def test_property_accepted_values_run_through_the_sampler(engine, fv):
    field, value = fv
    try:
        params = cheap(field, value)
    except ValueError:
        return  # refusals are the other property's
    if field == "n":
        params = dataclasses.replace(params, n=min(params.n, 4))  # bounds of n run above
    run(engine, params)


def test_priority_is_an_int64_and_runs_at_its_bounds(tiny):
    eng = LLMEngine(tiny, EngineConfig(**ENGINE, scheduling_policy="priority",
                                       priority=PriorityOptions(aging_s=0.5)))
    for priority in (INT64_MIN, INT64_MAX):
        run(eng, SamplingParams(max_tokens=2), priority=priority)
    for priority in (INT64_MAX + 1, INT64_MIN - 1, 10**400):
        with pytest.raises(ValueError, match="^priority: "):
            check_priority(priority)


# -- over HTTP ------------------------------------------------------------------------

HUGE = "1" + "0" * 400
INT32_PAST = ["2147483648", "18446744073709551616", HUGE, "1e309", "NaN"]
INT64_PAST = ["9223372036854775808", "-9223372036854775809", "18446744073709551616", HUGE,
              "1e309"]
SMALL_PAST = ["18446744073709551616", HUGE, "1e309", "-1e309"]
FLOAT_PAST = ["1e309", "-1e309", "NaN", "Infinity", "-Infinity", HUGE, "-" + HUGE]

def completion(field: str, value: str) -> str:
    return '{"prompt": "hi", "max_tokens": 2, "%s": %s}' % (field, value)


def chat(field: str, value: str, extra: str = "") -> str:
    return ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2%s, "%s": %s}'
            % (extra, field, value))


CASES = (  # (path, the field the 400 must name, body)
    [("/v1/completions", f, completion(f, v)) for f in ("max_tokens", "top_k")
     for v in INT32_PAST]
    + [("/v1/completions", f, completion(f, v)) for f in ("seed", "priority")
       for v in INT64_PAST]
    + [("/v1/completions", f, completion(f, v)) for f in ("n", "best_of", "logprobs")
       for v in SMALL_PAST]
    + [("/v1/completions", f, completion(f, v))
       for f in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty") for v in FLOAT_PAST]
    + [("/v1/completions", f, completion(f, "1e39"))  # past float32
       for f in ("temperature", "repetition_penalty")]
    + [("/v1/completions", "stop_token_ids", completion("stop_token_ids", f"[{v}]"))
       for v in INT32_PAST]
    + [("/v1/completions", "logit_bias", completion("logit_bias", '{"%s": %s}' % (k, v)))
       for k, v in ((HUGE, "1"), ("5", "1e309"), ("-1", "NaN"), ("x", HUGE))]
    + [("/v1/completions", "prompt", '{"prompt": [%s], "max_tokens": 2}' % v)
       for v in INT32_PAST[:3]]
    + [("/v1/chat/completions", f, chat(f, v)) for f in ("max_completion_tokens", "max_tokens")
       for v in INT32_PAST]
    + [("/v1/chat/completions", f, chat(f, v)) for f in ("seed", "priority") for v in INT64_PAST]
    + [("/v1/chat/completions", "top_logprobs", chat("top_logprobs", v, ', "logprobs": true'))
       for v in SMALL_PAST]
    + [("/v1/chat/completions", "temperature", chat("temperature", v)) for v in FLOAT_PAST]
    + [("/v1/embeddings", "dimensions", '{"input": "hi", "dimensions": %s}' % v)
       for v in SMALL_PAST]
    + [("/v1/embeddings", "input", '{"input": [%s]}' % v) for v in INT32_PAST[:3]]
    + [("/admin/priority", "priority", '{"request_id": "x", "priority": %s}' % v)
       for v in INT64_PAST]
)


@pytest.fixture(scope="module")
def server(tiny):
    eng = LLMEngine(tiny, EngineConfig(warmup=False, max_model_len=256))
    return OpenAIServer(AsyncEngine(eng), ServerConfig("tiny"))


def test_hostile_numbers_over_http_are_400_naming_the_field(server):
    async def post_all():
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return [await c.post(path, content=text.encode()) for path, _, text in CASES]

    failures = []
    for (path, field, text), r in zip(CASES, asyncio.run(post_all())):
        param = (r.json()["error"]["param"] or "") if r.status_code == 400 else ""
        if r.status_code != 400 or not param.startswith(field):
            failures.append((path, field, text[-40:], r.status_code, r.text[:120]))
    assert not failures, failures
    json.loads(completion("seed", "1"))  # the bodies are JSON but for the hostile numbers
