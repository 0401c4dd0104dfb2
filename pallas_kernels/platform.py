"""Which Pallas lowering a kernel uses, and how it runs on CPU.

Every kernel here comes in two variants with one signature plus a keyword
``interpret: bool``:

- ``*_gpu``: the Pallas Triton lowering. Chosen over Mosaic GPU because on JAX
  0.11/0.12 Mosaic GPU kernels are written at warpgroup level (explicit TMA
  copies, barriers, WGMMA-shaped tiles) and a paged KV cache needs a gather of
  small, scattered pages per sequence, which Triton expresses directly as
  pointer loads with masks. Triton also runs on pre-Hopper GPUs and its kernels
  are plain Pallas, so ``interpret=True`` runs them unchanged on CPU.
  JAX 0.12 deprecates Pallas Triton (a DeprecationWarning at lowering) but
  keeps it: every GPU kernel compiles for H100/H200 on both 0.10.2 and
  0.12.0.1 (the compile tier, ``compile_tests/``), so the GPU path stays on
  Triton for the supported range (``jax<0.13`` in pyproject.toml), and a
  Mosaic GPU variant is the work for the JAX that removes it. What 0.12 does
  need is the target chip at lowering (an AOT compile names it through the
  target device, `dispatch` passes it on; an export without devices through
  ``jax.sharding.use_abstract_mesh``), and static slices within bounds (the
  KV update writes power-of-two pieces of each row rather than a masked
  over-wide slice).
- ``*_tpu``: the Mosaic TPU lowering, with the scalar tables (block tables,
  lengths, slots) prefetched into SMEM and pages moved by explicit DMAs.
  With ``interpret=True`` it runs under the TPU interpreter
  (`tpu_interpret_params`), which also simulates the DMAs and semaphores.

``pallas_kernels.dispatch`` chooses the variant from the platform being compiled for.
"""

from __future__ import annotations

from typing import Any

from jax.experimental.pallas import tpu as pltpu


def tpu_interpret_params() -> Any:
    """The ``interpret=`` value that runs a Mosaic TPU kernel on CPU.

    ``pltpu.InterpretParams`` (present in JAX 0.10.2 and later) interprets DMAs,
    semaphores and SMEM faithfully and reads uninitialised memory as NaN; older
    versions only offer the generic ``interpret=True``.
    """
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
