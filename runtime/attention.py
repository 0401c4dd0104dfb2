"""The attention interface between the model and the kernels.

The model calls exactly two operations per layer, both on the shared paged KV
pool (see `sluice.pallas_kernels.reference` for its layout):

- ``write_kv(cache, layer, k, v, slot_mapping) -> cache``: store this step's
  keys/values.
- ``attend(q, cache, layer, meta, scale=, sliding_window=, soft_cap=) -> out``:
  ragged causal attention of the flattened queries over the pages in ``meta``.

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
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from sluice.pallas_kernels import chunked, dispatch, reference
from sluice.pallas_kernels.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend", "BACKENDS"]


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    name: str
    write_kv: Callable
    attend: Callable
    # Whether `attend`'s cost grows with the block-table width even past the
    # longest sequence (true of the reference); if not, the engine keeps one
    # full-width table and compiles no per-width shapes.
    cost_grows_with_table_width: bool = False


BACKENDS: dict[str, AttentionBackend] = {
    "reference": AttentionBackend("reference", reference.write_kv,
                                  reference.ragged_paged_attention,
                                  cost_grows_with_table_width=True),
    "chunked": AttentionBackend("chunked", reference.write_kv, chunked.ragged_paged_attention),
    "pallas": AttentionBackend("pallas", dispatch.write_kv, dispatch.ragged_paged_attention),
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
