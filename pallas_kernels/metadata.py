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
