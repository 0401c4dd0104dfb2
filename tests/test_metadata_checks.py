"""Host-side metadata validation (`check_host_metadata`, the model runner's
debug mode): every field a kernel trusts is checked and named when wrong."""

from __future__ import annotations

import numpy as np
import pytest

from sluice.pallas_kernels.metadata import DEBUG_ENV, check_host_metadata

BLOCK, NUM_BLOCKS, PAGES = 4, 10, 3


def _batch():
    """Two live sequences (a 3-token prefill continuing 2 cached tokens, one
    decode at length 6), a padding sequence and two padding tokens."""
    tables = np.asarray([[7, 2, 0], [5, 9, 0], [0, 0, 0]], np.int32)
    seq_lens = np.asarray([5, 6, 0], np.int32)
    qsl = np.asarray([0, 3, 4, 4], np.int32)
    slots = [tables[0, p // BLOCK] * BLOCK + p % BLOCK for p in (2, 3, 4)]
    slots += [tables[1, 5 // BLOCK] * BLOCK + 5 % BLOCK, NUM_BLOCKS * BLOCK, NUM_BLOCKS * BLOCK]
    return dict(slot_mapping=np.asarray(slots, np.int32), query_start_loc=qsl,
                seq_lens=seq_lens, block_tables=tables, num_seqs=2)


def _check(**batch):
    check_host_metadata(**batch, num_blocks=NUM_BLOCKS, block_size=BLOCK)


def _with(field, index, value):
    batch = _batch()
    batch[field] = batch[field].copy()
    batch[field][index] = value
    return batch


def test_sound_metadata_passes():
    _check(**_batch())


@pytest.mark.parametrize("batch,field", [
    (_with("block_tables", (0, 1), NUM_BLOCKS), "block_tables"),      # page past the pool
    (_with("block_tables", (1, 0), -1), "block_tables"),
    (_with("seq_lens", 1, PAGES * BLOCK + 1), "seq_lens"),            # longer than its row
    (_with("seq_lens", 0, 2), "seq_lens"),                            # shorter than its queries
    (_with("seq_lens", 2, 3), "seq_lens"),                            # live padding sequence
    (_with("query_start_loc", 2, 2), "query_start_loc"),             # decreasing
    (_with("query_start_loc", 3, 9), "query_start_loc"),             # past the tokens
    (_with("slot_mapping", 4, 0), "slot_mapping"),                    # padding token writes
    (_with("slot_mapping", 0, 2 * BLOCK), "slot_mapping"),           # another sequence's page
    ({**_batch(), "num_seqs": 4}, "num_seqs"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_metadata_is_named(batch, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        _check(**batch)


@pytest.mark.slow
def test_engine_debug_mode_checks_its_own_metadata(monkeypatch):
    """With the debug switch on, every step the runner builds (decode and
    prefill groups, padding) passes the check, and the check does run."""
    from sluice.runtime import LLM, SamplingParams
    from sluice.runtime import model_runner

    calls = []
    monkeypatch.setenv(DEBUG_ENV, "1")
    monkeypatch.setattr(model_runner, "check_host_metadata",
                        lambda *a, **k: calls.append(check_host_metadata(*a, **k)))
    llm = LLM("tiny", warmup=False, max_model_len=64, max_num_seqs=2,
              max_num_batched_tokens=16, kv_cache_memory=1 << 19)
    outs = llm.generate(["a longer prompt than one step", "b"],
                        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 3 for o in outs)
    assert len(calls) >= 4
