"""Step shapes of the model runner (issue 21): prompt chunks attend in pieces of
`QUERY_PIECE` query rows on the padded-query (pure-JAX) paths, with the same
logits as whole chunks, and a step with no decode rows carries no decode group."""

from __future__ import annotations

import numpy as np
import pytest

from sluice.runtime import SamplingParams, load_model
from sluice.runtime.attention import QUERY_PIECE
from sluice.runtime.intake import Intake
from sluice.runtime.model_runner import ModelRunner, StepRow, _forward_logits

BLOCK = 16


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", dtype="float32")


def _runner(model, **kw) -> ModelRunner:
    return ModelRunner(model, 64, BLOCK, max_num_seqs=8, max_num_batched_tokens=128,
                       max_prefill_seqs=4, max_model_len=256, backend="chunked", **kw)


def _rows(model, lengths: list[int]) -> list[StepRow]:
    intake = Intake(model, 256, seed=0)
    rng = np.random.default_rng(0)
    rows, next_block = [], 0
    for i, n in enumerate(lengths):
        req = intake.prepare(f"r{i}", {"prompt_token_ids": rng.integers(1, 200, n).tolist()},
                             SamplingParams(temperature=0)).requests[0]
        blocks = -(-n // BLOCK)
        rows.append(StepRow(req, n, list(range(next_block, next_block + blocks))))
        next_block += blocks
    return rows


def test_prompt_chunks_attend_in_pieces_with_the_same_logits(tiny):
    lengths = [70, 40, 10]  # 120 tokens: the 128-token bucket
    pieced = _runner(tiny)
    (meta,) = pieced._build([], _rows(tiny, lengths))[2]  # no decode rows: no decode group
    assert meta.max_query_len == QUERY_PIECE
    assert int(meta.num_seqs) == sum(-(-n // QUERY_PIECE) for n in lengths)
    qsl, seq_lens = np.asarray(meta.query_start_loc), np.asarray(meta.seq_lens)
    assert np.diff(qsl).max() <= QUERY_PIECE and qsl[int(meta.num_seqs)] == sum(lengths)
    # every chunk's pieces end at their last token: causal masking as for the whole chunk
    assert seq_lens[:6].tolist() == [32, 64, 70, 32, 40, 10]
    # attention's query slots: sequences x max query rows, vs 4 chunks x 128 rows before
    assert meta.seq_lens.shape[0] * meta.max_query_len <= 128 + 4 * QUERY_PIECE

    whole = _runner(tiny)
    whole.query_piece = None  # as natively ragged kernels get them: chunks whole
    logits = []
    for runner in (pieced, whole):
        ids, pos, metas, sample_rows = runner._build([], _rows(tiny, lengths))
        out, runner.kv_cache = _forward_logits(
            tiny.params, runner.kv_cache, ids, pos, metas, sample_rows,
            cfg=tiny.config, backend=runner.backend)
        logits.append(np.asarray(out)[:len(lengths)])
    assert whole._build([], _rows(tiny, lengths))[2][0].max_query_len == 128
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_shapes_are_bounded_and_cover_steps(tiny):
    runner = _runner(tiny)
    shapes = runner.shapes()
    # decode buckets 1..8 (4); prompt steps: with or without the decode group x 4 token buckets
    assert len(shapes) == 4 + 2 * 4 == len(set(shapes))
    rows = _rows(tiny, [100, 20])
    assert runner.shape_for([], rows) in shapes
    assert runner.shape_for([], rows).decode_seqs == 0
    assert runner.shape_for(rows[1:], rows[:1]).decode_seqs == 8
