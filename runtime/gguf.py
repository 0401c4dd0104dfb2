"""GGUF files (llama.cpp's format): config, tokenizer, chat template and
weights from one file, read with the `gguf` library (llama.cpp's own reader).

`open_gguf` reads and checks everything that costs no weight memory: the
header, the metadata, every tensor's name, type and shape. The config comes
from the architecture's metadata keys (``llama`` (also Mistral), ``qwen2``,
``gemma3``); the tokenizer is rebuilt as a `tokenizers` tokenizer from the
vocabulary (byte-level BPE for ``gpt2`` vocabularies, SentencePiece-style BPE
with byte fallback for ``llama`` ones), its merges (or, where the file has
none, the merges its scores imply), token types and BOS/EOS/pad ids; chat
templates come from ``tokenizer.chat_template`` (and named
``tokenizer.chat_template.NAME``). Any problem (truncated or corrupt file,
unknown architecture or tensor type, a vocabulary this builder cannot express,
missing or mis-shaped tensors) is a `GGUFError` naming the file, raised before
a single weight is dequantized.

`load_gguf_params` then dequantizes each tensor with `gguf.quants` into the
runtime dtype. llama.cpp's converter permutes the Q and K rows of Llama-family
models (for its interleaved rope); that is undone here, because Sluice rotates
in the Hugging Face "rotate half" layout.

Conventions llama.cpp applies to Gemma 3 without writing them into the file
(and transformers assumes too): every sixth layer has full attention, the
others slide; sliding layers use rope base 10000; queries are scaled by
``1/sqrt(key_length)``; norm weights are stored as ``1 + w`` already.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from sluice.runtime.checkpoint import to_device
from sluice.runtime.config import FULL, SLIDING, ModelConfig
from sluice.runtime.model import Params, checkpoint_shapes, fused_slot, param_shapes
from sluice.runtime.tokenizer import Tokenizer, _byte_to_unicode, set_special_token_processor


class GGUFError(ValueError):
    """A GGUF file that cannot be served; the message names the file and the problem."""


# llama.cpp tensor name (layer prefix stripped) -> our leaf.
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk",
    "attn_v.weight": "wv", "attn_output.weight": "wo", "attn_q.bias": "bq",
    "attn_k.bias": "bk", "attn_v.bias": "bv", "attn_output.bias": "bo",
    "ffn_norm.weight": "mlp_norm", "ffn_gate.weight": "w_gate", "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down", "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "post_attention_norm.weight": "post_attn_norm", "post_ffw_norm.weight": "post_mlp_norm",
}
_TOP_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "final_norm",
              "output.weight": "lm_head"}
# Leaves stored [in, out] here and [out, in] (rows = outputs) in GGUF.
_TRANSPOSED = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "gemma3": "Gemma3ForCausalLM"}
_GEMMA3_SLIDING_PATTERN = 6  # llama.cpp's: layers 6, 12, ... (1-based) attend fully
_GEMMA3_LOCAL_ROPE_THETA = 10_000.0

# Token types (gguf.TokenType).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

# Pre-tokenizer splits of byte-level vocabularies, by `tokenizer.ggml.pre`.
_GPT2_PRE = {"default", "gpt2", "gpt-2", "smollm", "starcoder", "refact", "olmo"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


@dataclasses.dataclass
class GGUFFile:
    """A checked GGUF file: its config, tokenizer and tensor plan (no weights read)."""

    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]
    reader: Any  # gguf.GGUFReader (memory-mapped)
    plan: list[tuple[Any, str, int | None]]  # (reader tensor, leaf, layer)


def open_gguf(path: str | Path) -> GGUFFile:
    """Read and check a GGUF file's metadata and tensor directory."""
    import gguf  # the reader pulls in numpy-heavy modules: only when a GGUF is used

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, KeyError, IndexError, TypeError, OSError) as e:
        # Truncated files fail as short reads or out-of-range offsets, corrupt ones as a bad
        # magic, version or value type, and unknown tensor types as an invalid enum value.
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    meta = _Metadata(reader, path)
    cfg = _config(meta, {t.name for t in reader.tensors})
    tokenizer, eos = _tokenizer(meta)
    plan = _plan(reader, cfg, path)
    return GGUFFile(path, cfg, tokenizer, eos, reader, plan)


def load_gguf_params(f: GGUFFile, dtype, progress: bool = True) -> Params:
    """Dequantize every tensor of a checked file into the parameter pytree (host numpy
    per leaf, then one device array per leaf)."""
    import gguf
    import jax.numpy as jnp
    from tqdm import tqdm

    cfg, np_dtype = f.config, np.dtype(jnp.dtype(dtype))
    shapes = param_shapes(cfg)
    layer_bufs = {k: np.empty(s, np_dtype) for k, s in shapes["layers"].items()}
    top: dict[str, np.ndarray] = {}
    for t, leaf, layer in tqdm(f.plan, desc=f"loading {f.path.name}", unit="tensor",
                               disable=not progress):
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(_rows_cols(t))
        if cfg.architecture == "LlamaForCausalLM" and leaf in ("wq", "wk", "bq", "bk"):
            w = _unpermute_rows(w, cfg.num_heads if leaf in ("wq", "bq") else cfg.num_kv_heads)
        w = (w.T if leaf in _TRANSPOSED else w).astype(np_dtype)
        if layer is None:
            top[leaf] = w
        else:
            stored, cols = fused_slot(cfg, leaf)
            layer_bufs[stored][layer][..., cols] = w
    return to_device(top, layer_bufs)


def _rows_cols(t) -> tuple[int, ...]:
    """A tensor's numpy shape: GGUF lists dimensions fastest first."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (weights and biases alike): within each head it
    interleaves the two rope halves (row pairs (i, i + d/2) become rows (2i, 2i + 1));
    put the halves back."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Metadata:
    """Typed access to a reader's key/value fields, with errors naming the file."""

    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise GGUFError(f"{self.path}: metadata {key!r} is unreadable ({e})") from e

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path}: metadata {key!r} is missing")
        return value

    def positive_int(self, key: str) -> int:
        value = self.require(key)
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise GGUFError(f"{self.path}: metadata {key!r} must be a positive integer, "
                            f"got {value!r}")
        return int(value)


def _config(meta: _Metadata, tensor_names: set[str]) -> ModelConfig:
    arch = meta.require("general.architecture")
    if arch not in _ARCHITECTURES:
        raise GGUFError(f"{meta.path}: unsupported architecture {arch!r}; "
                        f"supported: {', '.join(_ARCHITECTURES)}")
    if "rope_freqs.weight" in tensor_names or meta.get(f"{arch}.rope.scaling.type",
                                                       "none") != "none":
        raise GGUFError(f"{meta.path}: rope scaling ({meta.get(f'{arch}.rope.scaling.type')!r}"
                        ", or a rope_freqs tensor) is not supported for GGUF files")
    hidden = meta.positive_int(f"{arch}.embedding_length")
    heads = meta.positive_int(f"{arch}.attention.head_count")
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    if kv_heads <= 0 or heads % kv_heads:
        raise GGUFError(f"{meta.path}: attention.head_count {heads} is not a multiple of "
                        f"attention.head_count_kv {kv_heads}")
    head_dim = int(meta.get(f"{arch}.attention.key_length")
                   or meta.get(f"{arch}.rope.dimension_count") or hidden // heads)
    layers = meta.positive_int(f"{arch}.block_count")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.require("tokenizer.ggml.tokens"))
    # Generation ends at EOS and, where the file names one, at the end-of-turn token.
    eos = tuple(dict.fromkeys(int(i) for i in (meta.get("tokenizer.ggml.eos_token_id"),
                                               meta.get("tokenizer.ggml.eot_token_id"))
                              if i is not None))
    common = dict(
        architecture=_ARCHITECTURES[arch], vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=meta.positive_int(f"{arch}.feed_forward_length"), num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos)
    if arch == "qwen2":
        return ModelConfig(**common, qkv_bias=True)
    if arch == "llama":
        return ModelConfig(**common, qkv_bias="blk.0.attn_q.bias" in tensor_names,
                           o_bias="blk.0.attn_output.bias" in tensor_names)
    # Newer files state the pattern: a period, or one flag per layer (true: sliding).
    pattern = meta.get("gemma3.attention.sliding_window_pattern", _GEMMA3_SLIDING_PATTERN)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise GGUFError(f"{meta.path}: gemma3.attention.sliding_window_pattern has "
                            f"{len(pattern)} entries for {layers} layers")
        kinds = tuple(SLIDING if flag else FULL for flag in pattern)
    else:
        kinds = tuple(FULL if (i + 1) % int(pattern) == 0 else SLIDING for i in range(layers))
    return ModelConfig(
        **common, hidden_act="gelu_tanh",
        sliding_window=int(meta.require("gemma3.attention.sliding_window")),
        layer_types=kinds,
        rope_local_theta=float(meta.get("gemma3.rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_THETA)),
        qk_norm=True, sandwich_norms=True, embed_scale=float(hidden) ** 0.5,
        query_pre_attn_scalar=float(head_dim))


def _plan(reader, cfg: ModelConfig, path: Path) -> list[tuple[Any, str, int | None]]:
    """Match every tensor to a leaf, checking types and shapes; all leaves covered."""
    import gguf

    shapes = checkpoint_shapes(cfg)
    plan, seen = [], set()
    for t in reader.tensors:
        leaf, layer = _target(t.name)
        if leaf is None:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} for {cfg.architecture}")
        want = shapes.get(leaf) if layer is None else shapes["layers"].get(leaf)
        if want is None or (layer is not None and not 0 <= layer < cfg.num_layers):
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} for {cfg.architecture} "
                            f"with {cfg.num_layers} layers")
        want = want if layer is None else want[1:]
        want = tuple(reversed(want)) if leaf in _TRANSPOSED else tuple(want)
        if _rows_cols(t) != want:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {list(_rows_cols(t))}, "
                            f"the metadata implies {list(want)}")
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
                and t.tensor_type not in gguf.quants._type_traits:
            raise GGUFError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, "
                            "which the gguf library cannot dequantize")
        plan.append((t, leaf, layer))
        seen.add((leaf, layer))
    expected = {(leaf, None) for leaf in shapes if leaf != "layers"}
    expected |= {(leaf, i) for leaf in shapes["layers"] for i in range(cfg.num_layers)}
    missing = sorted(expected - seen, key=str)
    if missing:
        raise GGUFError(f"{path}: the file lacks {len(missing)} tensors, first: "
                        f"{_gguf_name(*missing[0])!r}")
    return plan


def _target(name: str) -> tuple[str | None, int | None]:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name], None
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        return _LAYER_NAMES.get(parts[2]), int(parts[1])
    return None, None


def _gguf_name(leaf: str, layer: int | None) -> str:
    if layer is None:
        return next(n for n, lf in _TOP_NAMES.items() if lf == leaf)
    return f"blk.{layer}." + next(n for n, lf in _LAYER_NAMES.items() if lf == leaf)


# ------------------------------------------------------------------ tokenizer


def _tokenizer(meta: _Metadata) -> tuple[Tokenizer, tuple[int, ...]]:
    """The file's vocabulary as a `Tokenizer`, and the ids that end generation."""
    kind = meta.require("tokenizer.ggml.model")
    tokens = list(meta.require("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"{meta.path}: tokenizer.ggml.token_type has {len(types)} entries for "
                        f"{len(tokens)} tokens")
    if kind == "gpt2":
        hf = _byte_level_bpe(meta, tokens, types)
        add_bos_default = False
    elif kind == "llama":
        hf = _sentencepiece_bpe(meta, tokens, types)
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise GGUFError(f"{meta.path}: tokenizer.ggml.model {kind!r} cannot be rebuilt "
                        "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")
    special = {}
    for name in ("bos", "eos", "unknown", "padding", "eot"):
        i = meta.get(f"tokenizer.ggml.{name}_token_id")
        if i is not None:
            if not 0 <= int(i) < len(tokens):
                raise GGUFError(f"{meta.path}: tokenizer.ggml.{name}_token_id {i} is outside "
                                f"the vocabulary of {len(tokens)}")
            special[name] = tokens[int(i)]
    _add_special_tokens(hf, tokens, types, kind, list(special.values()))
    bos, eos = special.get("bos"), special.get("eos")
    set_special_token_processor(
        hf, bos if meta.get("tokenizer.ggml.add_bos_token", add_bos_default) else None,
        eos if meta.get("tokenizer.ggml.add_eos_token", False) else None)
    stop = tuple(dict.fromkeys(hf.token_to_id(special[n]) for n in ("eos", "eot") if n in special))
    return Tokenizer(hf, stop, bos, eos, _chat_templates(meta), str(meta.path)), stop


def _byte_level_bpe(meta: _Metadata, tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise GGUFError(f"{meta.path}: a 'gpt2' vocabulary needs tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _GPT2_PRE and pre not in _SPLITS:
        raise GGUFError(f"{meta.path}: tokenizer.ggml.pre {pre!r} is not supported "
                        f"(supported: {', '.join(sorted(_GPT2_PRE | _SPLITS.keys()))})")
    # Tokens are spelled in GPT-2's byte alphabet; a few files spell special ones in UTF-8.
    spelling = _byte_to_unicode()
    alphabet = set(spelling.values())
    vocab = _vocab(meta, [t if set(t) <= alphabet else
                          "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens])
    pairs = []
    for m in merges:
        left, _, right = m.partition(" ")
        if not left or not right:
            raise GGUFError(f"{meta.path}: tokenizer.ggml.merges entry {m!r} is not 'A B'")
        pairs.append((left, right))
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    if pre in _SPLITS:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece_bpe(meta: _Metadata, tokens: list[str],
                       types: list[int]) -> tokenizers.Tokenizer:
    """SentencePiece BPE: '▁' for spaces, byte fallback (<0xXX> tokens), merges ranked by
    the merged piece's score, as SentencePiece merges the best-scoring pair first."""
    # Some files store normal pieces of spaces as real spaces; SentencePiece spells them
    # '▁'. User-defined ones (Gemma's runs of spaces) keep their text: they are matched
    # whole in the raw input, as SentencePiece matches user-defined symbols.
    tokens = ["\u2581" * len(t) if ty == _NORMAL and t and t == " " * len(t) else t
              for t, ty in zip(tokens, types)]
    vocab = _vocab(meta, tokens)
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise GGUFError(f"{meta.path}: a 'llama' vocabulary needs tokenizer.ggml.merges or "
                            "one tokenizer.ggml.scores entry per token")
        pairs = _merges_from_scores(tokens, types, scores, vocab)
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=_unk(meta, tokens),
                                         fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                              normalizers.Replace(" ", "\u2581")])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.decoder = decoders.Sequence(steps)
    return hf


def _merges_from_scores(tokens, types, scores, vocab) -> list[tuple[str, str]]:
    """Every split of a normal token into two vocabulary pieces is a merge, ranked by
    the token's score (file order, then the longer left piece, breaks ties)."""
    ranked = []
    for i, (t, kind, score) in enumerate(zip(tokens, types, scores)):
        if kind != _NORMAL:
            continue
        for cut in range(len(t) - 1, 0, -1):
            left, right = t[:cut], t[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(score), i, -cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _vocab(meta: _Metadata, tokens: list[str]) -> dict[str, int]:
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise GGUFError(f"{meta.path}: token {t!r} appears twice in the vocabulary (ids "
                            f"{vocab[t]} and {i}); a tokenizer cannot map it to both")
        vocab[t] = i
    return vocab


def _unk(meta: _Metadata, tokens: list[str]) -> str | None:
    i = meta.get("tokenizer.ggml.unknown_token_id")
    return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]


def _add_special_tokens(hf: tokenizers.Tokenizer, tokens, types, kind: str, named) -> None:
    """Control tokens (and the named BOS/EOS/...) match whole and are special (skipped
    when decoding); user-defined ones match whole as ordinary text."""
    alphabet = set(_byte_to_unicode().values()) if kind == "gpt2" else None
    special = [t for t, ty in zip(tokens, types) if ty == _CONTROL and
               (alphabet is None or set(t) <= alphabet)]
    special += [t for t in named if t not in special]
    hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                           for t in special])
    user = [t for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED and hf.token_to_id(t) is not None]
    if user:
        hf.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in user])


def _chat_templates(meta: _Metadata) -> dict[str, str]:
    templates = {}
    if (default := meta.get("tokenizer.chat_template")) is not None:
        templates["default"] = default
    for name in meta.get("tokenizer.chat_templates") or ():
        if (t := meta.get(f"tokenizer.chat_template.{name}")) is not None:
            templates[name] = t
    return templates
