"""The accelerators the compile tier builds for, without having them.

A target is a compile-only device: libtpu's deviceless topology for TPU
(`jax.experimental.topologies.get_topology_desc(platform="tpu", ...)`), and the
``jax-cuda12`` PJRT plugin given an XLA ``GpuTargetConfig`` for a GPU (the text
protos in ``tests/data/gpu-targets``: compute capability, SM count, shared
memory and register limits, memory size and bandwidth). ``jit(f).lower(...)``
with arguments placed on such a device, then ``.compile()``, runs the real
compiler for that chip: Mosaic for TPU, XLA GPU with the Triton pipeline and
ptxas for GPU. Nothing runs; nothing needs the hardware or the network.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

GPU_TARGETS_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "gpu-targets"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str          # "tpu" or "gpu" (the PJRT plugin)
    kernel_call: str       # custom-call target of the Pallas kernels on this platform
    hbm_bytes: int         # device memory (sizes the engine step's model)
    topology: str = ""     # TPU topology name
    gpu_config: str = ""   # GpuTargetConfig file in tests/data/gpu-targets


TARGETS = {t.name: t for t in [
    Target("v5e", "tpu", "tpu_custom_call", 16 << 30, topology="v5e:2x2"),
    Target("v6e", "tpu", "tpu_custom_call", 32 << 30, topology="v6e:2x2"),
    Target("h100", "gpu", "__gpu$xla.gpu.triton", 80 << 30, gpu_config="h100.txtpb"),
    Target("h200", "gpu", "__gpu$xla.gpu.triton", 141 << 30, gpu_config="h200.txtpb"),
]}


@functools.lru_cache(maxsize=None)
def device(target: Target) -> jax.Device:
    """One compile-only device of ``target`` (the first chip of its topology)."""
    if target.platform == "tpu":
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology)
    else:
        config = (GPU_TARGETS_DIR / target.gpu_config).read_text()
        topo = topologies.get_topology_desc(platform="cuda", topology_name="",
                                            target_config=config, topology="1x1x1")
    return topo.devices[0]


def sharding(target: Target) -> SingleDeviceSharding:
    return SingleDeviceSharding(device(target))
