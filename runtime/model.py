"""Functional decoder forward pass: the Llama family (Llama 2/3, Mistral,
Qwen2) and Gemma 3.

Parameters are a plain pytree (see `param_shapes` for the structure): per-layer
weights are stacked on a leading layer axis so the layers run as one
``lax.scan``, which keeps compile time flat in depth. The query, key and value
projections are stored as one matrix (``wqkv``), and so are the gate and up
projections (``w_gate_up``), so that a step runs one matrix product for each
group instead of three or two (`bench/step_regression.py --tag fused-batch32`:
the batch-32 decode step 5% faster on CPU; batch 1 unchanged). Checkpoints keep them apart; `fused_slot` says where a
checkpoint's projection lives in the fused layout (loaders write into it,
export reads out of it) and `checkpoint_shapes` gives the per-projection shapes. Models whose layers differ
(Gemma 3 interleaves sliding-window and full-attention layers, each with its
own rope base) scan over one period of the pattern, its layers unrolled, so
every attention call still gets a static window. Linear weights are stored
``[in, out]`` so activations multiply on the left. Norm weights are the
multiplier itself (Gemma's ``1 + w`` is added at conversion).

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
from sluice.runtime.devices import default_device
from sluice.runtime.rope import apply_rope, inverse_frequencies

Params = dict


# Fused leaf -> the checkpoint leaves it holds, concatenated on the last axis in this order.
FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gate_up": ("w_gate", "w_up")}
# Part of the converted-parameter cache's key: a cache of another layout is not restored.
PARAMS_LAYOUT = "fused-qkv-gate-up"


def param_shapes(cfg: ModelConfig) -> Params:
    """Shape of every parameter, as the pytree `init_params` builds and `forward` takes."""
    shapes = checkpoint_shapes(cfg)
    layers = dict(shapes["layers"])
    for fused, parts in FUSED.items():
        if parts[0] in layers:
            first = layers[parts[0]]
            layers[fused] = (*first[:-1], sum(layers.pop(p)[-1] for p in parts))
    return {**shapes, "layers": layers}


def fused_slot(cfg: ModelConfig, leaf: str) -> tuple[str, slice]:
    """(stored leaf, columns of its last axis) of a checkpoint leaf: ``wk`` lives in
    ``wqkv[..., q:q + kv]``; an unfused leaf is all of itself."""
    layers = checkpoint_shapes(cfg)["layers"]
    for fused, parts in FUSED.items():
        if leaf in parts:
            lo = sum(layers[p][-1] for p in parts[:parts.index(leaf)])
            return fused, slice(lo, lo + layers[leaf][-1])
    return leaf, slice(None)


def checkpoint_shapes(cfg: ModelConfig) -> Params:
    """Shape of every parameter with each projection apart, as checkpoints store them."""
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
    if cfg.qk_norm:
        layers.update(q_norm=(L, cfg.head_dim), k_norm=(L, cfg.head_dim))
    if cfg.sandwich_norms:
        layers.update(post_attn_norm=(L, H), post_mlp_norm=(L, H))
    shapes = {"embed": (cfg.vocab_size, H), "layers": layers, "final_norm": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (H, cfg.vocab_size)
    return shapes


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> Params:
    """Seeded random weights (normal, std 0.02; norms one; biases small), drawn per
    checkpoint leaf and then fused (`FUSED`), committed to the default device as a
    checkpoint's are (`checkpoint.to_device`).

    Drawn with numpy on the host: drawing with ``jax.random`` ran a program per leaf
    shape, and compiling them took ~4 CPU-s of every start of ``tiny`` (one Ray actor
    waited for another's to reach the compilation cache)."""
    rng = np.random.default_rng(seed)
    shapes = checkpoint_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    out = [np.ones(shape, np.float32) if "norm" in path
           else 0.02 * rng.standard_normal(shape, np.float32)
           for path, shape in zip(paths, leaves)]
    params = jax.tree_util.tree_unflatten(treedef, out)
    layers = params["layers"]
    for fused, parts in FUSED.items():
        if parts[0] in layers:
            layers[fused] = np.concatenate([layers.pop(p) for p in parts], axis=-1)
    return jax.device_put(jax.tree_util.tree_map(lambda a: a.astype(dtype), params),
                          default_device())


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
    windows = cfg.layer_windows()
    inv_freq = {None: jnp.asarray(inverse_frequencies(cfg), jnp.float32)}
    if cfg.rope_local_theta is not None:  # sliding layers rotate with their own base
        local = jnp.asarray(inverse_frequencies(cfg, cfg.rope_local_theta), jnp.float32)
        inv_freq.update({w: local for w in windows if w is not None})
    scale = 1.0 / float(np.sqrt(cfg.query_pre_attn_scalar or cfg.head_dim))
    act = (functools.partial(jax.nn.gelu, approximate=True) if cfg.hidden_act == "gelu_tanh"
           else jax.nn.silu)
    eps = cfg.rms_norm_eps
    h = params["embed"][token_ids]
    if cfg.embed_scale is not None:
        h = h * jnp.asarray(cfg.embed_scale, h.dtype)

    def layer(carry, lp, idx, window):
        h, cache = carry
        x = rms_norm(h, lp["attn_norm"], eps)
        qkv = _linear(x, lp["wqkv"], lp.get("bqkv"))
        nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q = qkv[:, :nq].reshape(T, cfg.num_heads, cfg.head_dim)
        k = qkv[:, nq:nq + nkv].reshape(T, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[:, nq + nkv:].reshape(T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = rms_norm(q, lp["q_norm"], eps), rms_norm(k, lp["k_norm"], eps)
        freqs = inv_freq.get(window, inv_freq[None])
        q, k = apply_rope(q, positions, freqs), apply_rope(k, positions, freqs)
        outs = []
        for g, lo, hi in zip(groups, bounds[:-1], bounds[1:]):
            cache = attn.write_kv(cache, idx, k[lo:hi], v[lo:hi], g.slot_mapping)
        for g, lo, hi in zip(groups, bounds[:-1], bounds[1:]):
            outs.append(attn.attend(q[lo:hi], cache, idx, g, scale=scale, sliding_window=window,
                                    soft_cap=cfg.attn_logit_softcap,
                                    num_kv_heads=cfg.num_kv_heads))
        o = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
        o = _linear(o.reshape(T, -1), lp["wo"], lp.get("bo"))
        h = h + (rms_norm(o, lp["post_attn_norm"], eps) if cfg.sandwich_norms else o)
        x = rms_norm(h, lp["mlp_norm"], eps)
        gate_up = x @ lp["w_gate_up"]
        inter = cfg.intermediate_size
        m = (act(gate_up[:, :inter]) * gate_up[:, inter:]) @ lp["w_down"]
        h = h + (rms_norm(m, lp["post_mlp_norm"], eps) if cfg.sandwich_norms else m)
        return h, cache

    # Scan over whole periods of the layer pattern, then run the remainder unrolled.
    # Each layer's weights are indexed out of the stacked parameters by layer number
    # inside the loop: scanning over a reshaped [n, p, ...] view instead made XLA copy
    # every weight (the whole model) into the loop state on every step.
    L, p = cfg.num_layers, _period(windows)
    n = L // p

    def layer_params(i):
        return jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), params["layers"])

    def period(carry, k):
        for j in range(p):
            i = k * p + j
            carry = layer(carry, layer_params(i), i, windows[j])
        return carry, None

    carry, _ = jax.lax.scan(period, (h, kv_cache), jnp.arange(n, dtype=jnp.int32))
    for i in range(n * p, L):
        carry = layer(carry, layer_params(i), i, windows[i])
    h, kv_cache = carry
    return rms_norm(h, params["final_norm"], eps), kv_cache


def _period(windows: tuple) -> int:
    """The shortest p with windows[i] == windows[i % p] for every layer."""
    return next(p for p in range(1, len(windows) + 1)
                if all(w == windows[i % p] for i, w in enumerate(windows)))


def compute_logits(params: Params, hidden: jax.Array) -> jax.Array:
    """Vocabulary logits (float32) for hidden rows [N, H]."""
    if "lm_head" in params:
        return jnp.dot(hidden, params["lm_head"], preferred_element_type=jnp.float32)
    # tied: contract with the embedding's hidden axis as stored ([V, H]); a transposed
    # operand (embed.T) can make XLA materialize the transpose, the whole table, per call
    return jax.lax.dot_general(hidden, params["embed"], (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
