"""Compile a function for a target and read the evidence off the compiled module."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable

import jax

from compile_tests.targets import Target, device

# Parameter numbers the compiled entry computation hands back as outputs, from
# the module header's ``input_output_alias={ {1}: (57, {}, may-alias), ... }``.
_ALIAS = re.compile(r"\{[\d,\s]*\}:\s*\((\d+),\s*\{[\d,\s]*\},\s*(?:may|must)-alias\)")


def compile_for(target: Target, fn: Callable, args: tuple, *, donate: tuple[int, ...] = (),
                static: dict[str, Any] | None = None) -> tuple[Any, str, float]:
    """``jit(fn)`` lowered for ``target``'s device and compiled; returns
    (compiled, its HLO text, compile seconds). ``args`` are ShapeDtypeStructs
    placed on the target (`sds`)."""
    start = time.perf_counter()
    jitted = jax.jit(fn, donate_argnums=donate, static_argnames=tuple(static or ()))
    compiled = jitted.lower(*args, **(static or {})).compile()
    return compiled, compiled.as_text(), time.perf_counter() - start


def sds(target: Target, shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype,
                                sharding=jax.sharding.SingleDeviceSharding(device(target)))


def kernel_calls(hlo: str, target: Target) -> int:
    """How many of the target's Pallas kernel custom calls the module holds."""
    return len(re.findall(rf'custom_call_target="{re.escape(target.kernel_call)}"', hlo))


def aliased_params(hlo: str) -> set[int]:
    header = hlo.split("\n", 1)[0]
    match = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", header)
    return {int(p) for p in _ALIAS.findall(match.group(1))} if match else set()


def pool_copies(hlo: str, shape: tuple[int, ...]) -> list[str]:
    """Instructions that copy a whole pool-shaped array (a donation that did
    not take, or a kernel whose output is not aliased to its input)."""
    dims = ",".join(map(str, shape))
    pattern = re.compile(rf"= \w+\[{dims}\]\S* copy(?:-start)?\(")
    return [line.strip() for line in hlo.splitlines() if pattern.search(line)]


def assert_kernels(hlo: str, target: Target, at_least: int = 1) -> None:
    n = kernel_calls(hlo, target)
    assert n >= at_least, (f"{target.name}: {n} {target.kernel_call} custom calls, expected "
                           f">= {at_least} (the CPU fallback was compiled?)")


class PoolCopied(AssertionError):
    """The compiled module copies the whole KV pool (its own type, so a known
    case can be expected to fail in exactly this way and no other)."""


def assert_pool_not_copied(hlo: str, shape: tuple[int, ...]) -> None:
    copies = pool_copies(hlo, shape)
    if copies:
        raise PoolCopied(f"KV pool copied: {copies[:2]}")


def assert_pool_in_place(hlo: str, param: int, shape: tuple[int, ...]) -> None:
    """Parameter ``param`` (the KV pool, ``shape``) is aliased to an output and
    never copied whole."""
    assert param in aliased_params(hlo), f"KV pool (parameter {param}) is not aliased to an output"
    assert_pool_not_copied(hlo, shape)


def record(target: Target, compiled, seconds: float, **case) -> None:
    """Append the compiler's cost model of this module to $COMPILE_REPORT (JSON
    lines), the input of bench/compile_roofline.py."""
    path = os.environ.get("COMPILE_REPORT")
    if not path:
        return
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    entry = dict(target=target.name, jax=jax.__version__, seconds=round(seconds, 2), **case,
                 cost={k: float(v) for k, v in (cost or {}).items()
                       if k in ("flops", "bytes accessed", "transcendentals",
                                "optimal_seconds", "utilization")})
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
