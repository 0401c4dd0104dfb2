"""n-gram speculative decoding (issue 21, `sluice.runtime.spec_decode`): the draft
proposer, the config check, and the invariant that greedy outputs with drafts
are token-identical to plain decoding (drafts accepted or not, under recompute
preemption too), with every KV block back at the end."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_to_finish

from sluice.runtime import SamplingParams
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.spec_decode import propose

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


def test_greedy_outputs_match_plain_decoding(tiny):
    """Self-quoting and random prompts, varied max_tokens, plus requests that take
    no drafts (seeded sampling, logprobs) in the same steps: spec on gives the
    tokens and finish reasons of spec off, drafts are accepted and rejected,
    every step's shape is one `warmup` compiles, and no block leaks."""
    rng = np.random.default_rng(0)
    requests = {f"rep{i}": (repeating(rng), greedy(7 + 5 * i)) for i in range(4)}
    requests |= {f"rand{i}": (rng.integers(0, 250, 30).tolist(), greedy(20)) for i in range(3)}
    requests["sampled"] = (repeating(rng), SamplingParams(temperature=1.0, seed=5,
                                                             max_tokens=12, ignore_eos=True))
    requests["logprobs"] = (repeating(rng), greedy(12, logprobs=2))
    off = engine_for(tiny, 0)
    plain = run(off, requests)
    spec = engine_for(tiny, K)
    shapes, shape_for = set(), spec.runner.shape_for
    spec.runner.shape_for = lambda *a: shapes.add(shape_for(*a)) or shape_for(*a)
    start = spec.block_manager.num_free_blocks
    assert run(spec, requests) == plain
    sched = spec.scheduler
    # drafts were accepted, and some rejected (so both paths of the verification ran)
    assert 0 < sched.num_accepted_tokens < sched.num_draft_tokens
    assert shapes <= set(spec.runner.shapes()) and any(
        s.sample_rows > s.decode_seqs + spec.runner.max_prefill_seqs for s in shapes)
    assert spec.block_manager.num_free_blocks == start == spec.block_manager.num_blocks
    # a stop token ends the request where plain decoding stops, the rest of an
    # accepted run dropped
    rid = "rep3"
    stop = plain[rid][0][len(plain[rid][0]) // 2]
    again = {"stop": (requests[rid][0], greedy(30, stop_token_ids=[stop]))}
    assert run(spec, again) == run(off, again)
    assert spec.block_manager.num_free_blocks == start


def test_greedy_outputs_survive_recompute_preemption_with_drafts(tiny):
    """12 KV blocks for 6 self-quoting requests: they preempt one another (by
    recompute) while drafting; outputs equal plain decoding's and nothing leaks."""
    rng = np.random.default_rng(1)
    requests = {f"r{i}": (repeating(rng), greedy(32)) for i in range(6)}
    kw = dict(kv_cache_memory=12 * BLOCK, scheduling_policy="priority", max_preemptions=100)
    plain = run(engine_for(tiny, 0, **kw), requests)
    spec = engine_for(tiny, K, **kw)
    assert run(spec, requests) == plain
    sched = spec.scheduler
    assert sched.num_preemptions > 0 and sched.num_recomputes == sched.num_preemptions
    assert sched.num_accepted_tokens > 0
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


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
