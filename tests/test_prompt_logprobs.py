"""Prompt log-probs (vLLM's ``prompt_logprobs``; ``echo`` with ``logprobs`` on
/v1/completions): equal to a full forward of the prompt, across prefill chunks
and past a cached prefix, without changing other requests' outputs or leaking
blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_to_finish

from sluice.runtime import SamplingParams, greedy_generate
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.kv_cache import KVCacheSpec, blocks_for
from sluice.runtime.loader import single_sequence_metadata
from sluice.runtime.model import compute_logits, forward

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPT = list(range(3, 43))  # 40 tokens: three prefill chunks of at most 16


def full_forward_logprobs(model, ids: list[int]) -> np.ndarray:
    """log_softmax of the logits at every row of one forward over ``ids`` [T, V]."""
    spec = KVCacheSpec.for_model(model.config, blocks_for(len(ids), 16), 16, model.dtype)
    meta = single_sequence_metadata(len(ids), 0, spec.num_blocks, 16)
    hidden, _ = forward(model.params, model.config, jnp.asarray(ids, jnp.int32),
                        jnp.arange(len(ids), dtype=jnp.int32), spec.allocate(), meta)
    return np.asarray(jax.nn.log_softmax(compute_logits(model.params, hidden), -1))


@pytest.fixture(scope="module")
def engine(tiny):
    # 16 tokens a step: a 40-token prompt is prefilled in three chunks. Steps of prompt
    # chunks alone and steps with decode rows both occur (where the prompt group's
    # rows start may differ between them: the runner may leave an empty decode group out)
    return LLMEngine(tiny, EngineConfig(max_num_seqs=8, max_num_batched_tokens=16,
                                        max_prefill_seqs=2, max_model_len=128, warmup=False))




def test_prompt_logprobs_equal_a_full_forward_across_chunks_and_a_cached_prefix(tiny, engine):
    free = engine.block_manager.num_free_blocks
    other = [7, 8, 9, 10, 11]
    # the prompt's first two blocks enter the prefix cache; the scored request must
    # not take them (a cached token has no logits)
    run_to_finish(engine, {"warm": (PROMPT, SamplingParams(max_tokens=1, **GREEDY))})
    hits = engine.block_manager.prefix_cache_hits
    done = run_to_finish(engine, {
        "scored": (PROMPT, SamplingParams(max_tokens=3, prompt_logprobs=3, **GREEDY)),
        "other": (other, SamplingParams(max_tokens=6, **GREEDY)),
    })
    assert engine.block_manager.prefix_cache_hits == hits  # no prefix hit was taken
    ref = full_forward_logprobs(tiny, PROMPT)
    lps = done["scored"].prompt_logprobs
    assert len(lps) == len(PROMPT) and lps[0] is None
    for pos in range(1, len(PROMPT)):
        row = ref[pos - 1]  # the logits before token pos predict it
        lp = lps[pos]
        assert lp.token_id == PROMPT[pos]
        np.testing.assert_allclose(lp.logprob, row[PROMPT[pos]], atol=2e-5)
        assert list(lp.top) == np.argsort(-row)[:3].tolist()
        np.testing.assert_allclose(list(lp.top.values()), np.sort(row)[::-1][:3], atol=2e-5)
    # neither request's tokens changed: each equals the one-at-a-time reference
    assert done["scored"].outputs[0].token_ids == greedy_generate(tiny, PROMPT, 3, False)
    assert done["other"].outputs[0].token_ids == greedy_generate(tiny, other, 6, False)
    assert done["other"].prompt_logprobs is None
    assert engine.block_manager.num_free_blocks == free


def test_prompt_logprobs_agree_with_the_requests_own_greedy_logprobs(engine):
    first = run_to_finish(engine, {"gen": (PROMPT[:20], SamplingParams(max_tokens=5, logprobs=2,
                                                              **GREEDY))})["gen"]
    comp = first.outputs[0]
    again = run_to_finish(engine, {"score": (PROMPT[:20] + comp.token_ids, SamplingParams(
        max_tokens=1, prompt_logprobs=2, n=2, **GREEDY))})["score"]
    scored = again.prompt_logprobs[20:]
    assert [lp.token_id for lp in scored] == comp.token_ids
    for generated, prompt in zip(comp.logprobs, scored):
        np.testing.assert_allclose(prompt.logprob, generated.logprob, atol=2e-5)
        assert list(prompt.top) == list(generated.top)  # a greedy token is the top one
        assert max(prompt.top.values()) == pytest.approx(prompt.logprob, abs=1e-6)


def test_prompt_logprobs_survive_a_recompute_preemption_mid_prompt(tiny, engine):
    """Preempted (KV dropped) after two of its three prompt chunks, the request
    recomputes its prompt from the start, past its own blocks now in the prefix
    cache: the log-probs already recorded are kept once, the rest added, and the
    whole equals a full forward; its tokens equal the one-at-a-time reference."""
    free = engine.block_manager.num_free_blocks
    engine.add_request("pre", {"prompt_token_ids": PROMPT},
                       SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY))
    req = engine.scheduler.requests["pre"]
    for _ in range(2):
        assert engine.step() == []  # prompt chunks sample nothing
    assert req.num_computed_tokens == 32 and len(req.prompt_logprobs) == 33
    engine.scheduler._preempt(req)  # recompute: its KV is dropped
    done = run_to_finish(engine, {})["pre"]
    assert req.num_preemptions == 1
    ref = full_forward_logprobs(tiny, PROMPT)
    lps = done.prompt_logprobs
    assert len(lps) == len(PROMPT)
    np.testing.assert_allclose([lp.logprob for lp in lps[1:]],
                               [ref[p - 1, PROMPT[p]] for p in range(1, len(PROMPT))], atol=2e-5)
    assert done.outputs[0].token_ids == greedy_generate(tiny, PROMPT, 2, False)
    assert engine.block_manager.num_free_blocks == free


def test_bad_prompt_logprobs_name_the_field():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="^prompt_logprobs: "):
            SamplingParams(prompt_logprobs=bad)


@pytest.fixture(scope="module")
def http(tiny):
    """The completions endpoint in process, over an engine configured like ``engine``
    (so the two share compiled programs)."""
    from starlette.testclient import TestClient

    from sluice.runtime import AsyncEngine
    from sluice.runtime.server import OpenAIServer, ServerConfig
    llm = LLMEngine(tiny, EngineConfig(max_num_seqs=8, max_num_batched_tokens=16,
                                       max_prefill_seqs=2, max_model_len=128, warmup=False))
    with TestClient(OpenAIServer(AsyncEngine(llm), ServerConfig("tiny")).app) as client:
        client.engine = llm
        yield client


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(tiny, http):
    """lm-eval's loglikelihood request: token-id prompt, echo, logprobs 1, greedy,
    max_tokens 1 (or 0); it sums token_logprobs[ctxlen:-1] and checks greediness
    against top_logprobs."""
    free = http.engine.block_manager.num_free_blocks
    ref = full_forward_logprobs(tiny, PROMPT)
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234}
    one = http.post("/v1/completions", json={**body, "max_tokens": 1}).json()
    zero = http.post("/v1/completions", json={**body, "max_tokens": 0}).json()
    text = tiny.tokenizer.decode(PROMPT, skip_special_tokens=False)
    greedy = greedy_generate(tiny, PROMPT, 1, False)
    for res, extra in ((one, greedy), (zero, [])):
        choice = res["choices"][0]
        assert choice["text"] == tiny.tokenizer.decode(PROMPT + extra, skip_special_tokens=False)
        lps = choice["logprobs"]
        assert len(lps["tokens"]) == len(PROMPT) + len(extra)
        assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
        np.testing.assert_allclose(lps["token_logprobs"][1:len(PROMPT)],
                                   [ref[p - 1, PROMPT[p]] for p in range(1, len(PROMPT))],
                                   atol=2e-5)
        for p in range(1, len(PROMPT)):
            (best, value), = lps["top_logprobs"][p].items()
            assert best == tiny.tokenizer.decode([int(np.argmax(ref[p - 1]))],
                                                 skip_special_tokens=False)
            assert value == pytest.approx(float(ref[p - 1].max()), abs=2e-5)
        assert lps["text_offset"] == np.cumsum([0] + [len(t) for t in lps["tokens"]][:-1]).tolist()
        assert "".join(lps["tokens"]) == choice["text"]
    assert one["usage"]["completion_tokens"] == 1 and zero["usage"]["completion_tokens"] == 0
    assert zero["choices"][0]["text"] == text
    np.testing.assert_allclose(one["choices"][0]["logprobs"]["token_logprobs"][-1],
                               ref[-1, greedy[0]], atol=2e-5)
    # a string prompt echoes as sent; vLLM's prompt_logprobs field, the token itself first
    res = http.post("/v1/completions", json={"prompt": "hello there", "echo": True,
                                             "max_tokens": 2, "prompt_logprobs": 2,
                                             "temperature": 0}).json()
    choice = res["choices"][0]
    assert choice["text"].startswith("hello there") and choice["logprobs"] is None
    ids = tiny.tokenizer.encode("hello there")
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    assert all(next(iter(entry)) == str(t) and 2 <= len(entry) <= 3
               for entry, t in zip(plp[1:], ids[1:]))
    assert http.engine.block_manager.num_free_blocks == free


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/completions", {"echo": True, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": list(range(3, 131)), "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/chat/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_bad_echo_and_prompt_logprobs_requests_are_400s_naming_the_field(http, path, body,
                                                                         param):
    base = {"prompt": "hi"} if path == "/v1/completions" else {
        "messages": [{"role": "user", "content": "hi"}]}
    r = http.post(path, json={**base, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def streamed_choices(http, body: dict) -> dict[int, dict]:
    """A streamed completion reassembled per choice: its chunks, text, joined
    logprobs object and ``prompt_logprobs`` (first chunk)."""
    import json
    choices: dict[int, dict] = {}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                acc = choices.setdefault(c["index"], {"chunks": [], "text": "", "logprobs": None})
                if c["logprobs"] is not None:  # each piece starts where the text so far ends
                    assert c["logprobs"]["text_offset"][:1] in ([], [len(acc["text"])])
                    acc["logprobs"] = c["logprobs"] if acc["logprobs"] is None else {
                        k: acc["logprobs"][k] + v for k, v in c["logprobs"].items()}
                acc["chunks"].append(c)
                acc["text"] += c["text"]
                acc["finish_reason"] = c["finish_reason"]
    return choices


@pytest.mark.parametrize("body", [
    # lm-eval's request, two prompts of n = 2: each choice echoes its own prompt first
    {"prompt": [PROMPT[:20], PROMPT[:9]], "n": 2, "echo": True, "logprobs": 1,
     "max_tokens": 3},
    {"prompt": PROMPT[:20], "echo": True, "logprobs": 2, "max_tokens": 0},  # the prompt alone
    {"prompt": "hello there", "echo": True, "logprobs": 1, "prompt_logprobs": 2,
     "max_tokens": 2},
    {"prompt": "hello there", "prompt_logprobs": 0, "max_tokens": 2},  # no echo
])
def test_streamed_echo_and_prompt_logprobs_reassemble_to_the_whole_response(tiny, http, body):
    """Streamed, each choice's first chunk carries its echoed prompt (text and
    log-probs, then its first generated text) and ``prompt_logprobs``; put together,
    the chunks equal the non-streamed response (vLLM streams echo the same way)."""
    free = http.engine.block_manager.num_free_blocks
    body = {**body, "temperature": 0, "ignore_eos": True}
    prompt = body["prompt"]
    prompts = [tiny.tokenizer.encode(prompt)] if isinstance(prompt, str) else \
        prompt if isinstance(prompt[0], list) else [prompt]
    whole = http.post("/v1/completions", json=body).json()["choices"]
    streamed = streamed_choices(http, body)
    assert sorted(streamed) == [c["index"] for c in whole]
    for want in whole:
        got = streamed[want["index"]]
        first = got["chunks"][0]
        assert got["text"] == want["text"] and got["finish_reason"] == want["finish_reason"]
        if body.get("echo"):
            prompt_text = want["text"][:len(want["text"]) - len(
                "".join(c["text"] for c in got["chunks"][1:]))]
            assert first["text"] == prompt_text and first["text"]
        if body.get("max_tokens") == 0:
            assert len(got["chunks"]) == 1
        if want["logprobs"] is not None:
            for key in ("tokens", "token_logprobs", "top_logprobs"):
                assert got["logprobs"][key] == want["logprobs"][key], key
            n_prompt = len(prompts[want["index"] // body.get("n", 1)]) if body.get("echo") else 0
            assert got["logprobs"]["text_offset"][:n_prompt] == \
                want["logprobs"]["text_offset"][:n_prompt]
        if "prompt_logprobs" in body:
            assert first["prompt_logprobs"] == want["prompt_logprobs"]
            assert all(c["prompt_logprobs"] is None for c in got["chunks"][1:])
    assert http.engine.block_manager.num_free_blocks == free


def test_echo_offsets_skip_the_bos_a_string_prompt_does_not_contain(tiny, http):
    """The byte-level tokenizer adds BOS to a string prompt; the echoed text is the
    string as sent, so BOS takes no width and every other token's offset points at
    its own text."""
    res = http.post("/v1/completions", json={"prompt": "hello there", "echo": True,
                                             "logprobs": 1, "max_tokens": 2,
                                             "temperature": 0}).json()
    choice = res["choices"][0]
    lps, text = choice["logprobs"], choice["text"]
    assert lps["tokens"][0] == tiny.tokenizer.decode([tiny.tokenizer.encode("hi")[0]],
                                                     skip_special_tokens=False) == "<s>"
    assert lps["text_offset"][:2] == [0, 0]
    n = len(tiny.tokenizer.encode("hello there"))
    for tok, at in zip(lps["tokens"][1:n], lps["text_offset"][1:n]):
        assert text[at:at + len(tok)] == tok
    assert lps["text_offset"][n] == len("hello there")  # the first generated token


def test_echo_scores_a_prompt_of_exactly_max_model_len_tokens(tiny, http):
    """With max_tokens 0 nothing is generated, so a prompt filling the context
    (/tokenizer_info's model_max_length, here 128) is scored, not refused."""
    free = http.engine.block_manager.num_free_blocks
    ids = [3 + i % 250 for i in range(128)]
    r = http.post("/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 0,
                                           "max_tokens": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert len(choice["logprobs"]["token_logprobs"]) == 128
    ref = full_forward_logprobs(tiny, ids)
    np.testing.assert_allclose(choice["logprobs"]["token_logprobs"][1:],
                               [ref[p - 1, ids[p]] for p in range(1, 128)], atol=2e-5)
    assert r.json()["usage"] == {"prompt_tokens": 128, "completion_tokens": 0,
                                 "total_tokens": 128}
    assert http.engine.block_manager.num_free_blocks == free


def test_chat_returns_vllms_top_level_prompt_logprobs(http):
    messages = [{"role": "user", "content": "hi there"}]
    res = http.post("/v1/chat/completions", json={
        "messages": messages, "prompt_logprobs": 1, "max_tokens": 1,
        "temperature": 0}).json()
    ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    plp = res["prompt_logprobs"]
    assert len(plp) == len(ids) == res["usage"]["prompt_tokens"] and plp[0] is None
    # the same tokens scored as a completion's prompt
    want = http.post("/v1/completions", json={"prompt": ids, "prompt_logprobs": 1,
                                              "max_tokens": 1, "temperature": 0}).json()
    assert plp == want["choices"][0]["prompt_logprobs"]
    plain = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert plain.json()["prompt_logprobs"] is None


def test_tokenizer_info_serves_lm_evals_remote_tokenizer(tiny, http):
    """lm-eval's ``tokenizer_backend=remote`` needs ``GET /tokenizer_info`` with an
    ``eos_token`` key and ``/tokenize`` without special tokens."""
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tiny.tokenizer.eos_token
    assert info["model_max_length"] == 128
    ids = http.post("/tokenize", json={"prompt": "a b", "add_special_tokens": False}).json()
    assert ids["tokens"] == tiny.tokenizer.encode("a b", add_special_tokens=False)


def test_scoring_in_row_chunks_equals_scoring_all_rows_at_once():
    """A scoring step wider than SCORE_CHUNK_ROWS (600 rows: two full chunks and a
    padded one) gets exactly what one full-vocabulary pass would give."""
    from sluice.runtime.model_runner import SCORE_CHUNK_ROWS, _score_rows
    from sluice.runtime.sampler import token_logprobs

    rows, hidden_size, vocab = 2 * SCORE_CHUNK_ROWS + 88, 16, 300
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"embed": jax.random.normal(k1, (vocab, hidden_size), jnp.float32)}
    hidden = jax.random.normal(k2, (rows, hidden_size), jnp.float32)
    targets = jax.random.randint(k3, (rows,), 0, vocab, jnp.int32)
    want = token_logprobs(compute_logits(params, hidden), targets)
    got = jax.jit(_score_rows)(params, hidden, targets)
    np.testing.assert_allclose(got[0], want.logprobs, atol=1e-5)
    np.testing.assert_array_equal(got[1], want.top_ids)
    np.testing.assert_allclose(got[2], want.top_logprobs, atol=1e-5)


def test_a_delta_group_carries_its_prompt_logprobs_once(tiny):
    """Review finding: "in the first delta output only" was decided from the first
    completion's token count, so with n = 2 a first completion that had ended (or
    been preempted) after one token resent them with each sibling's step. It is the
    group's fact now: complete first, then once per delta group, always when
    cumulative."""
    from sluice.runtime.intake import Intake
    from sluice.runtime.request import TokenLogprobs
    intake = Intake(tiny, 64, seed=0)
    params = SamplingParams(n=2, max_tokens=4, prompt_logprobs=1)
    delta = intake.prepare("d", {"prompt_token_ids": [5, 6, 7]}, params)
    delta.delta_outputs = True
    cumulative = intake.prepare("c", {"prompt_token_ids": [5, 6, 7]}, params)
    lps = [TokenLogprobs(6, -1.0, {6: -1.0}), TokenLogprobs(7, -2.0, {7: -2.0})]
    for group in (delta, cumulative):
        group.requests[0].add_prompt_logprobs(1, lps[:1])
        assert group.output_prompt_logprobs() is None  # not complete yet
        group.requests[0].add_prompt_logprobs(2, lps[1:])
    assert delta.output_prompt_logprobs() == [None, *lps]
    delta.requests[0].abort(0.0)  # the first completion ends; its sibling goes on
    assert [delta.output_prompt_logprobs() for _ in range(3)] == [None] * 3
    assert [cumulative.output_prompt_logprobs() for _ in range(2)] == [[None, *lps]] * 2
    plain = intake.prepare("p", {"prompt_token_ids": [5, 6]}, SamplingParams())
    assert plain.output_prompt_logprobs() is None
