"""Compiles counted by `sluice.runtime.compiles` (issue 24)."""

from __future__ import annotations

import jax
import numpy as np

from sluice.runtime import compiles


def test_counter_attributes_compiles_to_warmup_and_serving():
    compiles.install()
    compiles.install()  # idempotent: one listener, each compile counted once
    f = jax.jit(lambda x: x * 3 + 1)
    before = compiles.counts()
    with compiles.warming_up():
        f(np.ones(3, np.float32))
    ready = compiles._state["ready"]
    compiles.mark_ready()
    try:
        f(np.ones(5, np.float32))  # a new shape: compiles again
        f(np.ones(5, np.float32))  # cached: nothing
    finally:
        compiles._state["ready"] = ready
    new = {k: v - before.get(k, 0) for k, v in compiles.counts().items()
           if v != before.get(k, 0)}
    assert new == {("warmup", "jit(<lambda>)"): 1, ("serving", "jit(<lambda>)"): 1}
