"""Functional Llama-family forward pass (Llama 2/3, Mistral, Qwen2).

Parameters are a plain pytree (see `init_params` for the structure): per-layer
weights are stacked on a leading layer axis so the layers run as one
``lax.scan``, which keeps compile time flat in depth. Linear weights are stored
``[in, out]`` so activations multiply on the left.

``forward(params, cfg, token_ids, positions, kv_cache, meta)`` is pure: it
writes the step's keys/values into the paged pool, attends through the
`sluice.runtime.attention` interface and returns the final-normed hidden states
of every token plus the updated pool. ``meta`` is one `AttentionMetadata` or a
tuple of them covering consecutive row ranges (each group's rows are as many as
its ``slot_mapping``), so the engine can give decode rows and prefill chunks
their own padded shapes. ``compute_logits`` projects selected rows to
vocabulary logits in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sluice.runtime.attention import AttentionMetadata, get_backend
from sluice.runtime.config import ModelConfig
from sluice.runtime.rope import apply_rope, inverse_frequencies

Params = dict


def param_shapes(cfg: ModelConfig) -> Params:
    """Shape of every parameter, as the same pytree `init_params` builds."""
    L, H, I = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = {
        "attn_norm": (L, H), "wq": (L, H, q), "wk": (L, H, kv), "wv": (L, H, kv),
        "wo": (L, q, H), "mlp_norm": (L, H), "w_gate": (L, H, I), "w_up": (L, H, I),
        "w_down": (L, I, H),
    }
    if cfg.qkv_bias:
        layers.update(bq=(L, q), bk=(L, kv), bv=(L, kv))
    if cfg.o_bias:
        layers["bo"] = (L, H)
    shapes = {"embed": (cfg.vocab_size, H), "layers": layers, "final_norm": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (H, cfg.vocab_size)
    return shapes


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> Params:
    """Seeded random weights (normal, std 0.02; norms one; biases small)."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = []
    for path, shape, key in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def _linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    y = x @ w
    return y if b is None else y + b


@functools.partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("kv_cache",))
def forward(params: Params, cfg: ModelConfig, token_ids: jax.Array, positions: jax.Array,
            kv_cache: jax.Array, meta: AttentionMetadata | tuple[AttentionMetadata, ...],
            backend: str = "reference") -> tuple[jax.Array, jax.Array]:
    """Run all layers over a ragged batch; returns (normed hidden [T, H], kv_cache)."""
    return forward_unjitted(params, cfg, token_ids, positions, kv_cache, meta, backend)


def forward_unjitted(params: Params, cfg: ModelConfig, token_ids: jax.Array,
                     positions: jax.Array, kv_cache: jax.Array,
                     meta: AttentionMetadata | tuple[AttentionMetadata, ...],
                     backend: str = "reference") -> tuple[jax.Array, jax.Array]:
    """`forward` without its own jit, for callers that jit a larger step around it."""
    attn = get_backend(backend)
    groups = meta if isinstance(meta, tuple) else (meta,)
    bounds = np.cumsum([0] + [g.slot_mapping.shape[0] for g in groups])
    if bounds[-1] != token_ids.shape[0]:
        raise ValueError(f"meta: groups cover {bounds[-1]} rows, batch has {token_ids.shape[0]}")
    T = token_ids.shape[0]
    inv_freq = jnp.asarray(inverse_frequencies(cfg), jnp.float32)
    scale = 1.0 / float(np.sqrt(cfg.head_dim))
    h = params["embed"][token_ids]

    def layer(carry, xs):
        h, cache = carry
        lp, idx = xs
        x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
        q = _linear(x, lp["wq"], lp.get("bq")).reshape(T, cfg.num_heads, cfg.head_dim)
        k = _linear(x, lp["wk"], lp.get("bk")).reshape(T, cfg.num_kv_heads, cfg.head_dim)
        v = _linear(x, lp["wv"], lp.get("bv")).reshape(T, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        outs = []
        for g, lo, hi in zip(groups, bounds[:-1], bounds[1:]):
            cache = attn.write_kv(cache, idx, k[lo:hi], v[lo:hi], g.slot_mapping)
        for g, lo, hi in zip(groups, bounds[:-1], bounds[1:]):
            outs.append(attn.attend(q[lo:hi], cache, idx, g, scale=scale,
                                    sliding_window=cfg.sliding_window))
        o = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
        h = h + _linear(o.reshape(T, -1), lp["wo"], lp.get("bo"))
        x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
        h = h + (jax.nn.silu(x @ lp["w_gate"]) * (x @ lp["w_up"])) @ lp["w_down"]
        return (h, cache), None

    (h, kv_cache), _ = jax.lax.scan(
        layer, (h, kv_cache), (params["layers"], jnp.arange(cfg.num_layers, dtype=jnp.int32)))
    return rms_norm(h, params["final_norm"], cfg.rms_norm_eps), kv_cache


def compute_logits(params: Params, hidden: jax.Array) -> jax.Array:
    """Vocabulary logits (float32) for hidden rows [N, H]."""
    head = params["lm_head"] if "lm_head" in params else params["embed"].T
    return jnp.dot(hidden, head, preferred_element_type=jnp.float32)
