"""Tokenizers: Hugging Face ``tokenizer.json`` files through the `tokenizers`
library, the built-in byte-level tokenizer, and chat templates.

`Tokenizer` is the one interface the rest of Sluice uses: ``encode``,
``decode``, ``apply_chat_template``, ``eos_token_ids``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

BYTE_BOS, BYTE_EOS, BYTE_PAD = "<s>", "</s>", "<pad>"

# A ChatML-style template for models that ship none (the built-in ones).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class Tokenizer:
    def __init__(self, hf: tokenizers.Tokenizer, eos_token_ids: tuple[int, ...] = (),
                 bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None):
        self.hf = hf
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the model's Jinja chat template (sandboxed)."""
        if not messages:
            raise ValueError("messages: must contain at least one message")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: must be an object with 'role' and 'content'")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """Built-in tokenizer: ids 0-255 are bytes, then <s>, </s>, <pad>."""
        byte_to_char = _byte_to_unicode()
        vocab = {byte_to_char[b]: b for b in range(256)}
        hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([BYTE_BOS, BYTE_EOS, BYTE_PAD])
        bos_id = hf.token_to_id(BYTE_BOS)
        hf.post_processor = processors.TemplateProcessing(
            single=f"{BYTE_BOS} $A", special_tokens=[(BYTE_BOS, bos_id)])
        return cls(hf, (hf.token_to_id(BYTE_EOS),), BYTE_BOS, BYTE_EOS)

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: tuple[int, ...] = ()) -> "Tokenizer":
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` for the chat template)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: tokenizer file not found")
        try:
            hf = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"{tok_file}: cannot parse tokenizer: {e}") from e
        conf = _read_json(path / "tokenizer_config.json")
        bos, eos = _token_text(conf.get("bos_token")), _token_text(conf.get("eos_token"))
        eos_ids = tuple(eos_token_ids)
        if not eos_ids and eos is not None and hf.token_to_id(eos) is not None:
            eos_ids = (hf.token_to_id(eos),)
        template = conf.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(hf, eos_ids, bos, eos, template)


def _raise_template_error(message: str):
    raise ValueError(f"chat template: {message}")


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}
