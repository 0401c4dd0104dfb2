"""The batch description every attention backend receives.

A step's tokens are flattened into one ragged batch: sequence ``s`` owns query
rows ``query_start_loc[s]:query_start_loc[s+1]`` and, after this step's keys and
values are written, ``seq_lens[s]`` tokens of KV held in the pages listed in
``block_tables[s]``. Rows past ``query_start_loc[num_seqs]`` and sequences past
``num_seqs`` are padding: their ``seq_lens`` are 0 and their slots are out of
range, so they write nothing and read nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Per-step ragged batch metadata (all int32 device arrays).

    slot_mapping:    [T]   flat KV slot (block * block_size + offset) of each
                           query token's new key/value; >= num_slots for padding.
    query_start_loc: [S+1] start row of each sequence's queries; non-decreasing.
    seq_lens:        [S]   KV length of each sequence including this step's tokens.
    block_tables:    [S, P] pages of each sequence, in order.
    num_seqs:        []    number of live sequences (the rest are padding).
    max_query_len:   static upper bound on any sequence's query rows this step.
    """

    slot_mapping: jax.Array
    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_tables: jax.Array
    num_seqs: jax.Array
    max_query_len: int = dataclasses.field(metadata=dict(static=True))


DEBUG_ENV = "SLUICE_CHECK_METADATA"


def check_host_metadata(slot_mapping: np.ndarray, query_start_loc: np.ndarray,
                        seq_lens: np.ndarray, block_tables: np.ndarray, num_seqs: int, *,
                        num_blocks: int, block_size: int) -> None:
    """Validate one group's metadata on the host before it reaches a kernel.

    The kernels clamp their indices so bad metadata cannot read or write outside
    the tables or the pool, but it silently attends to wrong pages; this check
    (run by the model runner when ``SLUICE_CHECK_METADATA=1``, and by tests)
    names the field instead. Raises ValueError on the first violation.
    """
    num_tokens, (num_rows, pages) = slot_mapping.shape[0], block_tables.shape
    num_slots = num_blocks * block_size
    qsl = np.asarray(query_start_loc, np.int64)

    def fail(field: str, problem: str) -> None:
        raise ValueError(f"{field}: {problem}")

    if not 0 <= num_seqs <= num_rows:
        fail("num_seqs", f"{num_seqs} is outside [0, {num_rows}]")
    if qsl.shape != (num_rows + 1,) or seq_lens.shape != (num_rows,):
        fail("query_start_loc", f"shape {qsl.shape} / seq_lens {seq_lens.shape} do not match "
                                f"{num_rows} table rows")
    if qsl[0] != 0 or np.any(np.diff(qsl) < 0) or qsl[-1] > num_tokens:
        fail("query_start_loc", f"must rise from 0 to at most {num_tokens} tokens, got {qsl}")
    q_lens = np.diff(qsl)[:num_seqs]
    lens = np.asarray(seq_lens[:num_seqs], np.int64)
    if np.any(lens < q_lens) or np.any(lens > pages * block_size):
        fail("seq_lens", f"each must cover its queries and fit {pages} pages of {block_size}")
    if np.any(seq_lens[num_seqs:] != 0) or np.any(qsl[num_seqs + 1:] != qsl[num_seqs]):
        fail("seq_lens", "padding sequences (past num_seqs) must be empty")
    for s in range(num_seqs):
        used = block_tables[s, :-(-int(lens[s]) // block_size)]
        if np.any(used < 0) or np.any(used >= num_blocks):
            fail("block_tables", f"sequence {s} lists pages outside the pool of {num_blocks}")
        pos = np.arange(lens[s] - q_lens[s], lens[s])
        want = used[pos // block_size] * block_size + pos % block_size
        if np.any(slot_mapping[qsl[s]:qsl[s + 1]] != want):
            fail("slot_mapping", f"sequence {s}'s slots are not its own pages' positions")
    pad = slot_mapping[qsl[num_seqs]:]
    if np.any((pad >= 0) & (pad < num_slots)):
        fail("slot_mapping", f"padding tokens must have slots >= {num_slots}")
