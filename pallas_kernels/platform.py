"""Which Pallas lowering a kernel uses, and how it runs on CPU.

Every kernel here comes in two variants with one signature plus a keyword
``interpret: bool``:

- ``*_gpu``: the Pallas Triton lowering. Chosen over Mosaic GPU because on JAX
  0.11/0.12 Mosaic GPU kernels are written at warpgroup level (explicit TMA
  copies, barriers, WGMMA-shaped tiles) and a paged KV cache needs a gather of
  small, scattered pages per sequence, which Triton expresses directly as
  pointer loads with masks. Triton also runs on pre-Hopper GPUs and its kernels
  are plain Pallas, so ``interpret=True`` runs them unchanged on CPU.
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
