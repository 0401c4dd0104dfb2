"""The attention interface between the model and the kernels.

The model calls exactly two operations per layer, both on the shared paged KV
pool (see `sluice.pallas_kernels.reference` for its layout):

- ``write_kv(cache, layer, k, v, slot_mapping) -> cache``: store this step's
  keys/values.
- ``attend(q, cache, layer, meta, scale=, sliding_window=, soft_cap=,
  num_kv_heads=) -> out``: ragged causal attention of the flattened queries
  over the pages in ``meta``; ``num_kv_heads`` is the model's KV-head count,
  which the pool's may exceed (padding heads, `pallas_kernels.pool_layout`;
  None: the pool's count).

A backend is a pair of such functions. The registry is deliberately small:

- ``reference``: pure JAX; always available and defines correctness.
- ``chunked``: pure JAX, the reference computed a few pages at a time with an
  online softmax up to the longest sequence only (`sluice.pallas_kernels.chunked`):
  the fastest path on CPU.
- ``pallas``: the Pallas kernels for the platform the step is compiled for
  (Mosaic TPU on TPU, Triton on GPU) and ``chunked`` on CPU, where it is the
  fastest correct path (see `sluice.pallas_kernels.dispatch`).
- ``pallas-interpret`` / ``pallas-tpu-interpret``: the GPU / TPU kernels in
  Pallas interpret mode, on any platform; slow, for checking the kernels
  end to end on CPU.

The pure-JAX paths lay each sequence's queries out padded to the group's
``max_query_len``, so a step's attention work grows with sequences x
``max_query_len``. For them (`AttentionBackend.query_piece`) the model runner
cuts every prompt chunk into pieces of at most `QUERY_PIECE` query rows, each
piece a sequence of the metadata over its request's pages (its ``seq_lens``
end at the piece's last token, so causal masking is unchanged): the chunks
stay back to back in the token rows, and the padding inside attention is at
most one piece per chunk instead of the whole token bucket per chunk. The
natively ragged kernels (Triton, Mosaic) take the chunks whole.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from sluice.pallas_kernels import chunked, dispatch, reference
from sluice.pallas_kernels.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend", "BACKENDS", "QUERY_PIECE"]

# Query rows per piece of a prompt chunk on the padded-query paths: small enough
# that a piece's padding is cheap, large enough that re-reading the request's
# pages per piece stays below the query padding it saves (measured in
# bench/RESULTS.md, offline throughput).
QUERY_PIECE = 32


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    name: str
    write_kv: Callable
    attend: Callable
    # Whether `attend`'s cost grows with the block-table width even past the
    # longest sequence (true of the reference); if not, the engine keeps one
    # full-width table and compiles no per-width shapes.
    cost_grows_with_table_width: bool = False
    # Platforms on which `attend` pads each sequence's queries to max_query_len
    # (it runs a pure-JAX path there); "*": every platform.
    pads_queries_on: tuple[str, ...] = ()

    def query_piece(self, platform: str) -> int | None:
        """Most query rows per sequence the model runner should give `attend` on
        ``platform`` (a prompt chunk is cut into pieces of this many), or None
        to pass chunks whole (natively ragged kernels)."""
        padded = "*" in self.pads_queries_on or platform in self.pads_queries_on
        return QUERY_PIECE if padded else None


BACKENDS: dict[str, AttentionBackend] = {
    "reference": AttentionBackend("reference", reference.write_kv,
                                  reference.ragged_paged_attention,
                                  cost_grows_with_table_width=True, pads_queries_on=("*",)),
    "chunked": AttentionBackend("chunked", reference.write_kv, chunked.ragged_paged_attention,
                                pads_queries_on=("*",)),
    # chunked on CPU (dispatch's fallback for platforms without kernels)
    "pallas": AttentionBackend("pallas", dispatch.write_kv, dispatch.ragged_paged_attention,
                               pads_queries_on=("cpu",)),
    **{name: AttentionBackend(name, ops.write_kv, ops.attend)
       for name, ops in (("pallas-interpret", dispatch.interpreted("gpu")),
                         ("pallas-tpu-interpret", dispatch.interpreted("tpu")))},
}


def get_backend(name: str) -> AttentionBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"attention_backend: unknown backend {name!r}; "
                         f"choose from {sorted(BACKENDS)}") from None
