"""Where a batch-32 decode step's time goes on CPU, against the matmul roofline (issue 3).

Run from the repository root::

    .venv/bin/python bench/decode_breakdown.py

On ``smollm2-135m-random`` (float32), 32 decode rows at a context of 192 tokens,
each timed as the median of several calls after a warm-up, all in one process:

1. ``step``: the engine's jitted forward + logits (`model_runner._forward_logits`),
   default CPU attention (``chunked``), KV pool donated as in serving;
2. ``no_attention``: the same program with attention replaced by the identity and
   the KV write kept (so the rest of the step: matmuls, norms, RoPE, lm-head);
3. ``no_kv``: as 2 without the KV write;
4. ``torch_matmuls``: the same per-layer matmul chain plus lm-head in PyTorch
   (float32, 2 threads) on random weights of the same shapes, the peer's floor;
5. the machine's float32 matmul rate (2048^3, jitted, best of 8) and PyTorch's.

Each time is reported with the FLOP/s it implies for a decode step's FLOPs
(2 x matmul parameters x 32 rows, attention excluded from the numerator of 2-4)
and that as a fraction of the JAX roofline. Writes bench/results/decode_breakdown.json.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from sluice.pallas_kernels import reference
from sluice.pallas_kernels.metadata import AttentionMetadata
from sluice.runtime import attention
from sluice.runtime.kv_cache import KVCacheSpec
from sluice.runtime.loader import load_model
from sluice.runtime.model_runner import _forward_logits

ROWS, CONTEXT, BLOCK = 32, 192, 16
OUT = Path(__file__).resolve().parent / "results" / "decode_breakdown.json"


def median_ms(fn, repeats: int = 10) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def decode_inputs(spec: KVCacheSpec):
    pages = 256 // BLOCK
    tables = (np.arange(ROWS * pages).reshape(ROWS, pages) * 7) % spec.num_blocks
    slots = tables[:, (CONTEXT - 1) // BLOCK] * BLOCK + (CONTEXT - 1) % BLOCK
    meta = AttentionMetadata(jnp.asarray(slots, jnp.int32), jnp.arange(ROWS + 1, dtype=jnp.int32),
                             jnp.full(ROWS, CONTEXT, jnp.int32), jnp.asarray(tables, jnp.int32),
                             jnp.asarray(ROWS, jnp.int32), 1)
    return (jnp.zeros(ROWS, jnp.int32), jnp.full(ROWS, CONTEXT - 1, jnp.int32), (meta,),
            jnp.arange(ROWS, dtype=jnp.int32))


def jax_steps(model) -> dict[str, float]:
    attention.BACKENDS["bench-no-attention"] = attention.AttentionBackend(
        "bench-no-attention", reference.write_kv, lambda q, cache, layer, meta, **kw: q)
    attention.BACKENDS["bench-no-kv"] = attention.AttentionBackend(
        "bench-no-kv", lambda cache, layer, k, v, slots: cache,
        lambda q, cache, layer, meta, **kw: q)
    spec = KVCacheSpec.for_model(model.config, 1024, BLOCK)
    state = {"cache": jax.random.normal(jax.random.PRNGKey(0), spec.shape)}
    inputs = decode_inputs(spec)

    def run(backend: str):
        def call():
            logits, state["cache"] = _forward_logits(model.params, state["cache"], *inputs,
                                                     cfg=model.config, backend=backend)
            return logits
        return median_ms(call)

    return {"step": run("chunked"), "no_attention": run("bench-no-attention"),
            "no_kv": run("bench-no-kv")}


def torch_matmuls(cfg) -> float:
    torch.set_num_threads(2)
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
    q = cfg.num_heads * cfg.head_dim
    layers = [{n: torch.randn(*shape) * 0.02 for n, shape in
               (("q", (h, q)), ("k", (h, kv)), ("v", (h, kv)), ("o", (q, h)),
                ("g", (h, i)), ("u", (h, i)), ("d", (i, h)))} for _ in range(cfg.num_layers)]
    embed = torch.randn(cfg.vocab_size, h) * 0.02
    x = torch.randn(ROWS, h)

    def chain():
        with torch.no_grad():
            y = x
            for w in layers:
                a = y @ w["q"]
                y = y + a @ w["o"] + 0 * (y @ w["k"]).sum() + 0 * (y @ w["v"]).sum()
                y = y + (torch.nn.functional.silu(y @ w["g"]) * (y @ w["u"])) @ w["d"]
            return y @ embed.T
    return median_ms(chain)


def roofline() -> dict[str, float]:
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax_ms = min(median_ms(lambda: f(a), 1) for _ in range(8))
    t = torch.ones(n, n)
    torch_ms = min(median_ms(lambda: t @ t, 1) for _ in range(8))
    flops = 2 * n ** 3
    return {"jax_flops_per_s": flops / jax_ms * 1e3, "torch_flops_per_s": flops / torch_ms * 1e3}


def main() -> None:
    model = load_model("smollm2-135m-random", progress=False)
    cfg = model.config
    matmul_params = sum(int(np.prod(x.shape[1:])) * x.shape[0] for name, x in
                        model.params["layers"].items() if name.startswith("w"))
    matmul_params += cfg.vocab_size * cfg.hidden_size  # lm-head (tied embedding)
    flops = 2 * matmul_params * ROWS
    times = jax_steps(model)
    times["torch_matmuls"] = torch_matmuls(cfg)
    roof = roofline()
    rows = {name: {"ms": ms, "gflops_per_s": flops / ms / 1e6,
                   "fraction_of_jax_roofline": flops / ms * 1e3 / roof["jax_flops_per_s"]}
            for name, ms in times.items()}
    result = {"command": "bench/decode_breakdown.py", "rows": ROWS, "context": CONTEXT,
              "model": "smollm2-135m-random", "matmul_flops_per_step": flops, **roof,
              "times": rows,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "jax": jax.__version__, "torch": torch.__version__}}
    print(json.dumps(result, indent=1))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
