"""The attention interface between the model and the kernels.

The model calls exactly two operations per layer, both on the shared paged KV
pool (see `sluice.pallas_kernels.reference` for its layout):

- ``write_kv(cache, layer, k, v, slot_mapping) -> cache``: store this step's
  keys/values.
- ``attend(q, cache, layer, meta, scale=, sliding_window=, soft_cap=) -> out``:
  ragged causal attention of the flattened queries over the pages in ``meta``.

A backend is a pair of such functions. ``reference`` (pure JAX) is always
available and defines correctness; kernel backends register here with the same
signatures.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from sluice.pallas_kernels import reference
from sluice.pallas_kernels.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend", "BACKENDS"]


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    name: str
    write_kv: Callable
    attend: Callable


BACKENDS: dict[str, AttentionBackend] = {
    "reference": AttentionBackend("reference", reference.write_kv,
                                  reference.ragged_paged_attention),
}


def get_backend(name: str) -> AttentionBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"attention_backend: unknown backend {name!r}; "
                         f"choose from {sorted(BACKENDS)}") from None
