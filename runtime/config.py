"""Model configuration: the subset of a Hugging Face ``config.json`` that the
forward pass needs, plus the built-in configs.

`ModelConfig.from_hf_dict` understands LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM and Gemma3ForCausalLM configs and rejects anything else with
a clear error, so an unsupported checkpoint fails before a single tensor is
read. (GGUF files build the same config from their metadata:
`sluice.runtime.gguf`.)

Gemma 3 adds: ``layer_types`` (per layer, sliding-window or full attention,
each kind with its own rope base: ``rope_local_theta`` for sliding layers),
``qk_norm`` (RMS norms over each head's queries and keys), ``sandwich_norms``
(norms after attention and around the feed-forward block), ``embed_scale``,
``hidden_act="gelu_tanh"`` (GeGLU), ``query_pre_attn_scalar`` (attention scale
``1/sqrt(scalar)`` instead of ``1/sqrt(head_dim)``). ``attn_logit_softcap`` is
part of the model (and the attention interface) but no Gemma 3 config sets it to
effect: transformers' and llama.cpp's Gemma 3 ignore ``attn_logit_softcapping``,
and so does Sluice.
Norm weights are always the multiplier itself: Gemma's ``(1 + w)`` is applied
when a checkpoint is converted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Gemma3ForCausalLM")
SLIDING, FULL = "sliding_attention", "full_attention"


class ConfigError(ValueError):
    """A model config that Sluice cannot serve; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``"linear"`` or ``"llama3"`` (Hugging Face semantics)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma 3 (see the module docstring); the defaults are the Llama family's.
    hidden_act: str = "silu"
    layer_types: tuple[str, ...] = ()  # () = every layer alike (sliding_window or none)
    rope_local_theta: float | None = None
    qk_norm: bool = False
    sandwich_norms: bool = False
    embed_scale: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (`from_dict` inverts it), for caches of converted models."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        d["layer_types"] = tuple(d.get("layer_types") or ())
        return cls(**d)

    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full attention)."""
        if not self.layer_types:
            return (self.sliding_window,) * self.num_layers
        return tuple(self.sliding_window if t == SLIDING else None for t in self.layer_types)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"{source}: unsupported architecture {archs or d.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if arch == "Gemma3ForCausalLM":
            return _gemma3_from_hf(cls, d, source)
        for field in ("vocab_size", "hidden_size", "intermediate_size",
                      "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(field), int) or d[field] <= 0:
                raise ConfigError(f"{source}: field {field!r} must be a positive integer, got {d.get(field)!r}")
        if d.get("mlp_bias"):
            raise ConfigError(f"{source}: field 'mlp_bias' = true is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' must be 'silu', got {d['hidden_act']!r}")
        num_heads = d["num_attention_heads"]
        num_kv_heads = d.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {num_heads} is not a multiple of "
                              f"num_key_value_heads {num_kv_heads}")
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        attention_bias = bool(d.get("attention_bias", False))
        qwen2 = arch == "Qwen2ForCausalLM"
        sliding = _qwen2_sliding_window(d, source) if qwen2 else d.get("sliding_window")
        eos = d.get("eos_token_id")
        # transformers >= 5 writes `rope_parameters` (theta included); older, `rope_scaling`.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6 if qwen2 else 1e-5),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rope_scaling=_parse_rope_scaling(rope, source),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            sliding_window=sliding,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=as_id_tuple(eos),
        )


def _gemma3_from_hf(cls, d: dict[str, Any], source: str) -> "ModelConfig":
    """Gemma 3 text config (transformers' Gemma3TextConfig fields and defaults)."""
    for field in ("vocab_size", "hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads"):
        if not isinstance(d.get(field), int) or d[field] <= 0:
            raise ConfigError(f"{source}: field {field!r} must be a positive integer, got {d.get(field)!r}")
    act = d.get("hidden_activation", d.get("hidden_act", "gelu_pytorch_tanh"))
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"{source}: field 'hidden_activation' must be 'gelu_pytorch_tanh', "
                          f"got {act!r}")
    if d.get("final_logit_softcapping") is not None:
        raise ConfigError(f"{source}: field 'final_logit_softcapping' is not supported")
    n = d["num_hidden_layers"]
    pattern = d.get("sliding_window_pattern", 6)
    types = tuple(d.get("layer_types") or (
        FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)))
    if len(types) != n or set(types) - {SLIDING, FULL}:
        raise ConfigError(f"{source}: field 'layer_types' must list {n} of {SLIDING!r} / {FULL!r}")
    # transformers >= 5: rope_parameters per layer type; older: rope_theta, rope_local_base_freq.
    rope = d.get("rope_parameters") or {}
    full, local = rope.get(FULL, {}), rope.get(SLIDING, {})
    for kind in (full, local, d.get("rope_scaling") or {}):
        if kind.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: field 'rope_parameters' type {kind['rope_type']!r} "
                              "is not supported for Gemma 3")
    num_heads = d["num_attention_heads"]
    num_kv_heads = d.get("num_key_value_heads") or num_heads
    if num_heads % num_kv_heads:
        raise ConfigError(f"{source}: num_attention_heads {num_heads} is not a multiple of "
                          f"num_key_value_heads {num_kv_heads}")
    return cls(
        architecture="Gemma3ForCausalLM",
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=n,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=d.get("head_dim", 256),
        max_position_embeddings=d.get("max_position_embeddings", 131072),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(full.get("rope_theta", d.get("rope_theta", 1_000_000.0))),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        qkv_bias=bool(d.get("attention_bias", False)),
        o_bias=bool(d.get("attention_bias", False)),
        sliding_window=d.get("sliding_window", 4096),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=as_id_tuple(d.get("eos_token_id")),
        hidden_act="gelu_tanh",
        layer_types=types,
        rope_local_theta=float(local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0))),
        qk_norm=True,
        sandwich_norms=True,
        embed_scale=float(d["hidden_size"]) ** 0.5,
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
    )


def _qwen2_sliding_window(d: dict[str, Any], source: str) -> int | None:
    """Qwen2 slides only layers ``>= max_window_layers`` (or those ``layer_types``
    marks), and only with ``use_sliding_window``; one window for all layers or none."""
    window = d.get("sliding_window")
    if not d.get("use_sliding_window", False) or window is None:
        return None
    n = d["num_hidden_layers"]
    types = d.get("layer_types") or [
        "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
        for i in range(n)]
    if all(t == "full_attention" for t in types):
        return None
    if all(t == "sliding_attention" for t in types):
        return window
    raise ConfigError(f"{source}: field 'layer_types' mixes sliding-window and full attention "
                      f"layers ({types}); only all-or-none sliding windows are supported")


def as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _parse_rope_scaling(d: dict[str, Any] | None, source: str) -> RopeScaling | None:
    if not d:
        return None
    kind = d.get("rope_type", d.get("type"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"{source}: field 'rope_scaling' type {kind!r} is not supported "
                          "(supported: linear, llama3)")
    if kind == "linear":
        return RopeScaling("linear", float(d["factor"]))
    return RopeScaling(
        "llama3",
        float(d["factor"]),
        float(d.get("low_freq_factor", 1.0)),
        float(d.get("high_freq_factor", 4.0)),
        int(d.get("original_max_position_embeddings", 8192)),
    )


# Built-in configs with seeded random weights (no files needed).
TINY = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=259, hidden_size=128, intermediate_size=352,
    num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=2048,
    rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=256, eos_token_ids=(257,),
)

SMOLLM2_135M = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
    rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    bos_token_id=256, eos_token_ids=(257,),
)

BUILTIN_CONFIGS: dict[str, ModelConfig] = {"tiny": TINY, "smollm2-135m-random": SMOLLM2_135M}
