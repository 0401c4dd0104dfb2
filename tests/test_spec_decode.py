"""n-gram speculative decoding (issue 21, `sluice.runtime.spec_decode`): the draft
proposer, the config check, the invariant that outputs with drafts are those of
plain decoding (greedy and seeded sampled requests token for token, drafts
accepted or not, under recompute and swap preemption and live migration), with
every KV block back at the end; sampled outputs distributed as plain sampling's
(a rule that accepts every draft fails); the acceptance counters in /metrics."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from conftest import run_to_finish

from sluice.runtime import SamplingParams
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.kv_cache import blocks_for
from sluice.runtime.metrics import ServerMetrics
from sluice.runtime import spec_decode
from sluice.runtime.spec_decode import DraftOutlook, propose

BLOCK = 32 * 1024  # bytes of one tiny-model KV block (16 tokens), as in test_preemption
K = 4


def engine_for(model, k: int, **kw) -> LLMEngine:
    """test_preemption's step limits (the same compiled plain shapes)."""
    kw.setdefault("max_num_seqs", 4)
    return LLMEngine(model, EngineConfig(warmup=False, max_model_len=128, seed=0,
                                         max_num_batched_tokens=64,
                                         num_speculative_tokens=k, **kw))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
        ) -> dict[str, tuple[list[int], str | None]]:
    return {rid: (o.outputs[0].token_ids, o.outputs[0].finish_reason)
            for rid, o in run_to_finish(engine, requests).items()}


def repeating(rng: np.random.Generator) -> list[int]:
    """A prompt that quotes itself: a random phrase three times over."""
    return rng.integers(0, 250, int(rng.integers(6, 14))).tolist() * 3


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, **kw)


def test_propose_takes_the_longest_suffix_and_its_latest_occurrence():
    assert propose([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]  # 3-gram [1, 2, 3] at 0
    assert propose([1, 2, 3, 9, 1, 2, 3], 10) == [9, 1, 2, 3]  # up to the end
    assert propose([7, 2, 4, 1, 8, 4, 1], 3) == [8, 4, 1]  # 2-gram [4, 1]
    assert propose([1, 5, 1, 6, 1], 3) == [6, 1]  # 1-gram [1]: latest earlier occurrence
    assert propose([3, 3], 4) == [3]  # overlapping occurrences
    assert propose([5, 6, 7, 8], 4) == []  # nothing repeats
    assert propose([1, 2, 1], 0) == [] and propose([1], 3) == []


@pytest.mark.parametrize("bad", [-1, 17, 1.5, True, "4"])
def test_num_speculative_tokens_is_validated(tiny, bad):
    with pytest.raises(ValueError, match="^num_speculative_tokens: "):
        LLMEngine(tiny, EngineConfig(warmup=False, max_model_len=128,
                                     num_speculative_tokens=bad))


def test_outputs_match_plain_decoding(tiny, monkeypatch):
    """Self-quoting and random prompts, varied max_tokens, greedy and seeded sampled
    requests (top-k, top-p, logprobs) in the same steps: spec on gives
    the tokens, log-probs and finish reasons of spec off, drafts are accepted and
    rejected, every step's shape is one `warmup` compiles, no block leaks, and
    /metrics counts the drafts. (Any expected gain pays for a mixed step here, so
    that every kind of request drafts: what is under test is the drafted rows.)"""
    monkeypatch.setattr(spec_decode, "MIXED_STEP_COST", 1.0)
    rng = np.random.default_rng(0)
    requests = {f"rep{i}": (repeating(rng), greedy(7 + 5 * i)) for i in range(4)}
    requests |= {f"rand{i}": (rng.integers(0, 250, 30).tolist(), greedy(20)) for i in range(3)}
    requests["sampled"] = (repeating(rng), SamplingParams(temperature=1.0, seed=5, top_k=3,
                                                             max_tokens=12, ignore_eos=True))
    requests["top-p"] = (repeating(rng), SamplingParams(temperature=0.7, top_p=0.5, seed=6,
                                                          max_tokens=12, ignore_eos=True,
                                                          logprobs=2))
    requests["logprobs"] = (repeating(rng), greedy(12, logprobs=2))
    off = engine_for(tiny, 0)
    plain = run_to_finish(off, requests)
    spec = engine_for(tiny, K)
    shapes, shape_for = set(), spec.runner.shape_for
    spec.runner.shape_for = lambda *a: shapes.add(shape_for(*a)) or shape_for(*a)
    start = spec.block_manager.num_free_blocks
    drafted: set[str] = set()  # request ids that took a draft
    add_drafts = spec.scheduler._add_drafts
    spec.scheduler._add_drafts = lambda s: drafted.update(d := add_drafts(s)) or d
    got = run_to_finish(spec, requests)
    assert summary(got) == summary(plain)
    for rid in ("top-p", "logprobs"):  # each accepted token has its own position's
        lps = [[(lp.token_id, lp.logprob, sorted(lp.top)) for lp in o.outputs[0].logprobs]
               for o in (got[rid], plain[rid])]
        assert [t for t, _, _ in lps[0]] == [t for t, _, _ in lps[1]]
        np.testing.assert_allclose([lp for _, lp, _ in lps[0]], [lp for _, lp, _ in lps[1]],
                                   rtol=1e-4, atol=1e-5)
        assert [top for _, _, top in lps[0]] == [top for _, _, top in lps[1]]
    assert {"sampled", "top-p", "logprobs"} <= drafted  # they drafted too
    stats = spec.scheduler.spec_stats
    # drafts were accepted, and some rejected (so both paths of the verification ran)
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert shapes <= set(spec.runner.shapes()) and any(
        s.sample_rows > s.decode_seqs + spec.runner.max_prefill_seqs for s in shapes)
    assert spec.block_manager.num_free_blocks == start == spec.block_manager.num_blocks
    text = ServerMetrics("tiny", compat="vllm").render(spec.stats()).decode()
    for prefix in ("sluice", "vllm"):
        for name, value in (("num_drafts", stats.num_drafts),
                            ("num_draft_tokens", stats.num_draft_tokens),
                            ("num_accepted_tokens", stats.num_accepted_tokens)):
            assert f'{prefix}:spec_decode_{name}_total{{' in text
            assert metric(text, f"{prefix}:spec_decode_{name}_total") == value > 0
    # a stop token ends the request where plain decoding stops, the rest of an
    # accepted run dropped
    rid = "rep3"
    tokens = plain[rid].outputs[0].token_ids
    again = {"stop": (requests[rid][0], greedy(30, stop_token_ids=[tokens[len(tokens) // 2]]))}
    assert run(spec, again) == run(off, again)
    assert spec.block_manager.num_free_blocks == start


def summary(outputs: dict) -> dict[str, tuple[list[int], str | None]]:
    return {rid: (o.outputs[0].token_ids, o.outputs[0].finish_reason)
            for rid, o in outputs.items()}


def metric(text: str, name: str) -> float:
    """The value of the one series of ``name`` in an exposition ``text``."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{")]
    assert len(values) == 1, (name, values)
    return values[0]


def test_rejected_drafts_release_their_blocks_at_once(tiny, monkeypatch):
    """Blocks reserved for a draft's positions go back to the pool when the step's
    output is applied, as far as the target rejected them: after every step a
    running request holds exactly the blocks of its tokens and the pool the rest.
    Drafts whose first 0, 1, 2 or 3 tokens are plain decoding's next tokens and
    the rest wrong (accepted runs end before, at and past block boundaries) keep
    the outputs plain decoding gives; every block is back at the end. (Prompts of
    14 and 29 tokens: no prompt fills its last block, where the first decode would
    need one more.)"""
    rng = np.random.default_rng(4)
    prompts = {"a": rng.integers(0, 250, 14).tolist(), "b": rng.integers(0, 250, 29).tolist()}
    requests = {rid: (ids, greedy(40)) for rid, ids in prompts.items()}
    plain = run(engine_for(tiny, 0), requests)
    vocab = tiny.config.vocab_size

    def propose(ids: list[int], k: int) -> list[int]:
        rid = next(r for r, p in prompts.items() if ids[:len(p)] == p)
        done = len(ids) - len(prompts[rid])
        right = plain[rid][0][done:done + k]
        # the first 0..3 tokens are plain decoding's next ones, the rest wrong: every
        # draft is cut short, so a running request's tokens never outgrow its blocks
        good = min(done % 4, len(right) - 1)
        return right[:good] + [(t + 1) % vocab for t in right[good:]]

    monkeypatch.setattr(spec_decode, "propose", propose)
    spec = engine_for(tiny, K)
    bm = spec.block_manager
    for rid, (ids, params) in requests.items():
        spec.add_request(rid, {"prompt_token_ids": ids}, params)
    done: dict = {}
    rejected = 0
    while spec.has_unfinished_requests():
        stats = spec.scheduler.spec_stats
        drafted, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
        done.update({o.request_id: o for o in spec.step() if o.finished})
        rejected += (stats.num_draft_tokens - drafted) - (stats.num_accepted_tokens - accepted)
        running = spec.scheduler.running
        held: set[int] = set()
        for req in running:
            table = spec.scheduler.kv.block_table(req.request_id)
            assert len(table) == blocks_for(req.num_tokens, bm.block_size), req.request_id
            held.update(table)
        assert bm.num_free_blocks == bm.num_blocks - len(held)
    assert rejected > 0 and spec.scheduler.spec_stats.num_accepted_tokens > 0
    assert summary(done) == plain
    assert bm.num_free_blocks == bm.num_blocks


def test_outlook_learns_from_drafts_and_from_proposals_not_drafted():
    outlook = DraftOutlook(4.0)
    for _ in range(4):  # drafts with nothing accepted: 4 -> 2.8 -> 1.96 -> 1.37 -> 0.96
        assert outlook.worth_drafting()
        outlook.observe(0)
    assert not outlook.worth_drafting()
    outlook.shadow = (2, [7, 8, 9])  # proposed when 2 tokens were out
    outlook.settle_shadow([1, 2, 7])  # so far so good: nothing to observe yet
    assert outlook.shadow is not None and not outlook.worth_drafting()
    outlook.settle_shadow([1, 2, 7, 8, 9])  # all 3 would have been accepted
    assert outlook.shadow is None and outlook.worth_drafting()
    outlook.shadow = (5, [4, 4])
    before = outlook.expected
    outlook.settle_shadow([1, 2, 7, 8, 9, 3])  # the first already wrong: 0 kept
    assert outlook.shadow is None and outlook.expected == pytest.approx(0.7 * before)


def test_drafts_pay_for_a_mixed_step_only_with_enough_expected_tokens():
    """A decode-only step takes drafts when their expected accepted tokens (each at
    most its draft's length) make up for a mixed step: one token per decode row
    at the assumed cost of 2; a draft not taken becomes the outlook's shadow."""
    assert spec_decode.MIXED_STEP_COST == 2.0
    sure, unsure = DraftOutlook(3.0), DraftOutlook(1.2)
    assert spec_decode.drafts_pay([([1, 2, 3, 4], sure)], 3)
    assert not spec_decode.drafts_pay([([1, 2, 3, 4], sure)], 4)
    assert spec_decode.drafts_pay([([1, 2, 3, 4], sure), ([5, 6], unsure)], 4)
    assert not spec_decode.drafts_pay([([1], sure)], 2)  # 1 token at most, not 3
    assert not spec_decode.drafts_pay([], 0)
    unsure.hold(7, [5, 6])
    unsure.hold(8, [9])  # one shadow at a time: the first stays
    assert unsure.shadow == (7, [5, 6])


def test_a_request_whose_drafts_fail_stops_drafting_and_resumes_when_they_would_pay(
        tiny, monkeypatch):
    """Drafts that are always wrong for the first 24 tokens, then right: the
    request stops drafting after a few rejected drafts (the step stays a plain
    decode), keeps checking its proposals against what it generates, and drafts
    again once they match; outputs equal plain decoding's, every block returns."""
    prompt = np.random.default_rng(5).integers(0, 250, 20).tolist()
    requests = {"r": (prompt, greedy(64))}
    plain = run(engine_for(tiny, 0), requests)
    right = plain["r"][0]
    vocab = tiny.config.vocab_size

    def propose(ids: list[int], k: int) -> list[int]:
        done = len(ids) - len(prompt)
        draft = right[done:done + k]
        return draft if done >= 24 else [(t + 1) % vocab for t in draft]

    monkeypatch.setattr(spec_decode, "propose", propose)
    spec = engine_for(tiny, K)
    spec.add_request("r", {"prompt_token_ids": prompt}, greedy(64))
    drafts_at: list[int] = []  # output length at each step that drafted
    done: dict = {}
    while spec.has_unfinished_requests():
        before = spec.scheduler.spec_stats.num_drafts
        out_len = len(spec.scheduler.requests["r"].output_token_ids)
        done.update({o.request_id: o for o in spec.step() if o.finished})
        if spec.scheduler.spec_stats.num_drafts > before:
            drafts_at.append(out_len)
    early = [n for n in drafts_at if n < 24]
    assert 1 <= len(early) <= 5  # stopped after a few failed drafts, not at every step
    assert any(n >= 24 for n in drafts_at)  # and drafted again once they would pay
    assert spec.scheduler.spec_stats.num_accepted_tokens > 0
    assert summary(done) == plain
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


def test_sampled_outputs_are_distributed_as_plain_sampling(tiny, monkeypatch):
    """The rejection rule, on a 2-token support (top_k=2, with penalties over the
    output so far, draft tokens included): drafts of the most common plain
    continuation at every decode position; over 96 seeds the first 3 tokens of
    spec decoding are distributed as plain sampling's with other seeds (total
    variation 0.125, within sampling noise; a rule that accepts every draft gives
    1.0) and, seed for seed, all 4 are the very tokens plain sampling gives (a
    drafted position sampled at the wrong step index fails that)."""
    prompt = repeating(np.random.default_rng(2))
    n = 96

    def sampled(base: int) -> dict:
        return {f"s{i}": (prompt, SamplingParams(
            temperature=1.0, top_k=2, seed=base + i, max_tokens=4, ignore_eos=True,
            repetition_penalty=1.2, presence_penalty=0.3)) for i in range(n)}

    plain = summary(run_to_finish(engine_for(tiny, 0), sampled(0)))
    counts = [collections.Counter(t[j] for t, _ in plain.values()) for j in range(4)]
    common = [c.most_common(1)[0][0] for c in counts]  # the draft at every position
    monkeypatch.setattr(spec_decode, "propose", lambda ids, k: common[len(ids) - len(prompt):][:k])
    spec = engine_for(tiny, K)
    assert summary(run_to_finish(spec, sampled(0))) == plain
    other = summary(run_to_finish(spec, sampled(n)))
    stats = spec.scheduler.spec_stats
    assert 0.2 < stats.acceptance_rate < 0.8  # drafts are accepted and rejected
    # two samples of 96 over <= 8 outcomes: expected distance ~0.13
    assert total_variation([t[:3] for t, _ in plain.values()],
                           [t[:3] for t, _ in other.values()]) < 0.25
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


def total_variation(a: list[list[int]], b: list[list[int]]) -> float:
    """Total variation distance between the empirical distributions of two equally
    large samples of token sequences."""
    ca, cb = collections.Counter(map(tuple, a)), collections.Counter(map(tuple, b))
    return sum(abs(ca[x] - cb[x]) for x in ca.keys() | cb.keys()) / (2 * len(a))


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_outputs_survive_preemption_with_drafts(tiny, mode):
    """12 KV blocks for 6 self-quoting requests (one sampled): they preempt one
    another (by recompute, or swapping out to host memory and back) while
    drafting; outputs equal plain decoding's and no device or host block leaks."""
    rng = np.random.default_rng(1)
    requests = {f"r{i}": (repeating(rng), greedy(32)) for i in range(5)}
    requests["sampled"] = (repeating(rng), SamplingParams(temperature=1.0, top_k=3, seed=4,
                                                             max_tokens=32, ignore_eos=True))
    kw = dict(kv_cache_memory=12 * BLOCK, scheduling_policy="priority", max_preemptions=100)
    if mode == "swap":
        kw |= dict(swap_space=64 * BLOCK, preemption_mode="swap")
    plain = run(engine_for(tiny, 0, **kw), requests)
    spec = engine_for(tiny, K, **kw)
    assert run(spec, requests) == plain
    sched = spec.scheduler
    assert sched.num_preemptions > 0
    assert (sched.num_swap_outs if mode == "swap" else sched.num_recomputes) \
        == sched.num_preemptions
    assert sched.spec_stats.num_accepted_tokens > 0
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks
    if mode == "swap":
        spec.swapper.close()
        assert sched.kv.host.num_free_blocks == sched.kv.host.num_blocks


def test_outputs_survive_live_migration_with_drafts(tiny):
    """A drafting request moves to another engine through the migration port
    (`LLMEngine.migration`: pre-copy while it keeps drafting, suspend, adopt,
    release) and keeps drafting there: its output and a sampled neighbour's equal
    plain decoding's; every block is back on both engines."""
    # Whether the gate keeps drafting depends on how often tiny's random weights
    # accept drafts: these prompts (seed 2) draft on both sides; seeds 1 and 3 do not.
    rng = np.random.default_rng(2)
    requests = {"g": (repeating(rng), greedy(40)),
                "s": (repeating(rng), SamplingParams(temperature=1.0, top_k=3, seed=8,
                                                     max_tokens=40, ignore_eos=True))}
    plain = run(engine_for(tiny, 0), requests)
    src, dst = engine_for(tiny, K), engine_for(tiny, K)
    for rid, (ids, params) in requests.items():
        src.add_request(rid, {"prompt_token_ids": ids}, params)
    done: dict = {}

    def step(engine: LLMEngine) -> None:
        done.update({o.request_id: o for o in engine.step() if o.finished})

    while len(src.groups["g"].requests[0].output_token_ids) < 20:
        step(src)
    drafted = src.scheduler.spec_stats.num_drafts
    epoch = src.migration.epoch("g")
    chunks = src.migration.export_kv("g", {}, epoch)
    assert dst.migration.import_kv("g", chunks) and chunks[0].num_blocks > 0
    step(src)  # it decodes (and drafts) between the copy stages
    handover = src.migration.suspend("g", {c.seq_id: c.first_block + c.num_blocks
                                           for c in chunks}, epoch)
    assert handover is not None and dst.migration.adopt(handover)
    src.migration.release("g")
    while src.has_unfinished_requests() or dst.has_unfinished_requests():
        for engine in (src, dst):
            if engine.has_unfinished_requests():
                step(engine)
    assert summary(done) == plain
    assert src.scheduler.spec_stats.num_drafts > drafted  # kept drafting on both sides
    assert dst.scheduler.spec_stats.num_accepted_tokens > 0
    for engine in (src, dst):
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_generate_flag_reaches_the_engine_and_keeps_the_output(capsys):
    """``sluice generate --num-speculative-tokens``: same text as without, the
    flag reaches the engine config, and a bad value is a usage error naming the field."""
    from sluice.runtime.cli import _engine_kwargs, build_parser, main
    args = ["generate", "--model", "tiny", "--prompt", "abc abc abc abc ", "--max-tokens",
            "24", "--ignore-eos", "--no-warmup", "--max-model-len", "128",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "64"]  # engine_for's shapes
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--num-speculative-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain
    kw = _engine_kwargs(build_parser().parse_args(args + ["--num-speculative-tokens", "3"]))
    assert kw["num_speculative_tokens"] == 3
    assert main(args + ["--num-speculative-tokens", "-1"]) == 2
    assert "num_speculative_tokens" in capsys.readouterr().err
