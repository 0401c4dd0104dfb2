"""Tokenizers: Hugging Face ``tokenizer.json`` files through the `tokenizers`
library, the built-in byte-level tokenizer, and chat templates.

`Tokenizer` is the one interface the rest of Sluice uses: ``encode``,
``decode``, ``apply_chat_template``, ``eos_token_ids``.

A checkpoint directory's chat templates are read the way transformers reads
them: ``chat_template.jinja`` (and named ones in
``additional_chat_templates/NAME.jinja``) take priority over the
``chat_template`` entry of ``tokenizer_config.json`` (a string, or a list of
``{"name", "template"}``). The template named ``default`` (or the only one) is
used unless a caller names another. A loaded model without any template has
none: chatting with it is a ``ValueError`` naming the source, never a made-up
template; only the built-in models use `DEFAULT_CHAT_TEMPLATE`.
``add_bos_token`` / ``add_eos_token`` in ``tokenizer_config.json`` decide
whether encoding adds BOS/EOS, as transformers rebuilds the post-processor
from them.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

BYTE_BOS, BYTE_EOS, BYTE_PAD = "<s>", "</s>", "<pad>"

# A ChatML-style template for models that ship none (the built-in ones).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


class Tokenizer:
    """``chat_template`` is one template or named ones (``{"default": ..., ...}``);
    ``source`` names where the tokenizer came from, for error messages."""

    def __init__(self, hf: tokenizers.Tokenizer, eos_token_ids: tuple[int, ...] = (),
                 bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | dict[str, str] | None = None, source: str = "tokenizer"):
        self.hf = hf
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.source = source
        if isinstance(chat_template, str):
            chat_template = {"default": chat_template}
        self.chat_templates: dict[str, str] = dict(chat_template or {})

    @property
    def chat_template(self) -> str | None:
        """The template chats use by default: ``default``, else the only one, else None."""
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if len(self.chat_templates) == 1:
            return next(iter(self.chat_templates.values()))
        return None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The batch call releases the GIL while it tokenizes (``encode`` holds it, so a
        # multi-megabyte prompt on a worker thread still froze the server's event
        # loop), and skips the character offsets, which nothing here reads.
        return self.hf.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True,
                            template_name: str | None = None,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render ``messages`` with the model's Jinja chat template (sandboxed).

        ``template_name`` picks one of several named templates. ``tools`` (OpenAI
        ``tools`` entries) reach the template as ``tools``, as transformers passes
        them, and pick the template named ``tool_use`` when there is one and none
        is named; ``tojson`` writes JSON as transformers' does (no HTML escaping).
        """
        if not messages:
            raise ValueError("messages: must contain at least one message")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: must be an object with 'role' and 'content'")
        template = self._template(template_name if template_name is not None
                                  else self._tools_template(tools))
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def chat_template_for(self, tools: list[dict[str, Any]] | None) -> str | None:
        """The template a chat with ``tools`` renders through by default (None: none)."""
        name = self._tools_template(tools)
        return self.chat_template if name is None else self.chat_templates[name]

    def _tools_template(self, tools: list[dict[str, Any]] | None) -> str | None:
        """``tool_use`` when tools are given and the model has a template by that name."""
        return "tool_use" if tools and "tool_use" in self.chat_templates else None

    def _template(self, name: str | None) -> str:
        if name is not None:
            if name not in self.chat_templates:
                raise ValueError(f"chat_template: {self.source} has no template named {name!r} "
                                 f"(it has: {', '.join(sorted(self.chat_templates)) or 'none'})")
            return self.chat_templates[name]
        if self.chat_template is None:
            if self.chat_templates:
                raise ValueError(f"chat_template: {self.source} has several templates and none "
                                 f"named 'default'; name one of {sorted(self.chat_templates)}")
            raise ValueError(f"chat_template: {self.source} has no chat template, so it cannot "
                             "format chat messages (send a plain prompt instead)")
        return self.chat_template

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
        return cls(hf, (hf.token_to_id(BYTE_EOS),), BYTE_BOS, BYTE_EOS, DEFAULT_CHAT_TEMPLATE,
                   "the byte-level tokenizer")

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and the chat templates
        as a Hugging Face directory holds them (`from_dir` reads them back)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": self.bos_token, "eos_token": self.eos_token}))
        for name, template in self.chat_templates.items():
            f = (path / CHAT_TEMPLATE_FILE if name == "default"
                 else path / CHAT_TEMPLATE_DIR / f"{name}.jinja")
            f.parent.mkdir(exist_ok=True)
            f.write_text(template, encoding="utf-8")

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: tuple[int, ...] = (),
                 source: str | None = None) -> "Tokenizer":
        """Load ``tokenizer.json`` with ``tokenizer_config.json`` and the chat templates.

        ``source`` names the tokenizer in errors (default: the directory).
        """
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
        if "add_bos_token" in conf or "add_eos_token" in conf:
            set_special_token_processor(hf, bos if conf.get("add_bos_token") else None,
                                        eos if conf.get("add_eos_token") else None)
        return cls(hf, eos_ids, bos, eos, _dir_chat_templates(path, conf), source or str(path))


def set_special_token_processor(hf: tokenizers.Tokenizer, bos: str | None,
                                eos: str | None) -> None:
    """Make encoding add ``bos`` before and ``eos`` after the text (None: not that one)."""
    bos = bos if bos is not None and hf.token_to_id(bos) is not None else None
    eos = eos if eos is not None and hf.token_to_id(eos) is not None else None
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = " ".join([single] + ([f"{bos}:1"] if bos else []) + ["$B:1"]
                    + ([f"{eos}:1"] if eos else []))
    hf.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, hf.token_to_id(t)) for t in (bos, eos) if t])


def _dir_chat_templates(path: Path, conf: dict) -> dict[str, str]:
    """A checkpoint's named chat templates; the ``.jinja`` files win over the config."""
    files = {}
    if (path / CHAT_TEMPLATE_FILE).is_file():
        files["default"] = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (path / CHAT_TEMPLATE_DIR).is_dir():
        for f in sorted((path / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if files:
        return files
    template = conf.get("chat_template")
    if isinstance(template, list):
        try:
            return {t["name"]: t["template"] for t in template}
        except (TypeError, KeyError) as e:
            raise ValueError(f"{path / 'tokenizer_config.json'}: field 'chat_template' must be "
                             "a string or a list of {'name', 'template'} objects") from e
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path / 'tokenizer_config.json'}: field 'chat_template' must be a "
                         f"string, got {type(template).__name__}")
    return {"default": template} if template else {}


def _strftime_now(fmt: str) -> str:
    """Templates may print today's date (transformers provides the same helper)."""
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


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
