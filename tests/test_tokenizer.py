"""Tokenizers: the byte-level built-in, tokenizer.json directories, chat
templates from tokenizer_config.json, and EOS ids from generation_config.json."""

from __future__ import annotations

import json

import pytest

from conftest import BOS_ID, EOS_ID, edit_json
from sluice.runtime import load_model
from sluice.runtime.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

TEXTS = [
    "hello world",
    "héllo wörld — naïve café",
    "日本語のテキスト 🙂🚀 русский текст",
    "tabs\tnew\nlines \x00 nul \x7f del",
    "",
]

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
RENDERED = "<s>[SYSTEM] Be brief.</s>\n[USER] Hi 🙂</s>\n"


@pytest.fixture(scope="module")
def byte_tok():
    return Tokenizer.byte_level()


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_round_trip(byte_tok, text):
    ids = byte_tok.encode(text)
    assert ids == [BOS_ID] + list(text.encode("utf-8"))  # one id per UTF-8 byte
    assert byte_tok.decode(ids) == text
    assert byte_tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))


def test_byte_level_special_tokens(byte_tok):
    assert byte_tok.vocab_size == 259
    assert byte_tok.eos_token_ids == (EOS_ID,)
    assert byte_tok.decode([BOS_ID, 72, 105, EOS_ID], skip_special_tokens=False) == "<s>Hi</s>"
    assert byte_tok.decode([BOS_ID, 72, 105, EOS_ID]) == "Hi"


def test_decode_of_split_multibyte_character(byte_tok):
    """Decoding a prefix that ends inside a UTF-8 sequence must not raise."""
    ids = byte_tok.encode("é", add_special_tokens=False)
    assert len(ids) == 2
    assert isinstance(byte_tok.decode(ids[:1]), str)
    assert byte_tok.decode(ids) == "é"


def test_tokenizer_json_round_trip(tmp_path, byte_tok):
    """A saved byte-level tokenizer.json loads back with identical behaviour (BOS included)."""
    byte_tok.hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == byte_tok.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_ids == ()  # nothing says which token ends a turn
    assert tok.chat_template is None  # no template is made up for a real checkpoint
    with pytest.raises(ValueError, match=f"{tmp_path}.* no chat template"):
        tok.apply_chat_template(MESSAGES)


def test_from_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def _write_tokenizer_dir(path, config: dict) -> None:
    Tokenizer.byte_level().hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_chat_template_from_tokenizer_config(tmp_path):
    _write_tokenizer_dir(tmp_path, {"bos_token": "<s>", "eos_token": {"content": "</s>"},
                                    "chat_template": TEMPLATE})
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template == TEMPLATE
    assert tok.eos_token_ids == (EOS_ID,)  # from eos_token, absent other sources
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == RENDERED
    rendered = tok.apply_chat_template(MESSAGES)
    assert rendered == RENDERED + "[ASSISTANT] "
    # The rendered special tokens are the tokenizer's special tokens.
    ids = tok.encode(rendered, add_special_tokens=False)
    assert ids[0] == BOS_ID and ids.count(EOS_ID) == 2


def test_named_chat_templates_use_default(tmp_path):
    _write_tokenizer_dir(tmp_path, {"chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": TEMPLATE},
    ], "bos_token": "<s>", "eos_token": "</s>"})
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == RENDERED


def test_chat_template_jinja_file_alone(tmp_path):
    """transformers >= 4.4x saves the template as chat_template.jinja, not in the config."""
    _write_tokenizer_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>"})
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template == TEMPLATE
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == RENDERED


def test_jinja_files_win_over_config_and_named_ones_are_selectable(tmp_path):
    _write_tokenizer_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>",
                                    "chat_template": "CONFIG"})
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS {{ messages | length }}")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == RENDERED
    assert tok.apply_chat_template(MESSAGES, template_name="tool_use") == "TOOLS 2"
    with pytest.raises(ValueError, match="no template named 'nope'.*default, tool_use"):
        tok.apply_chat_template(MESSAGES, template_name="nope")


def test_named_templates_without_default_must_be_named(tmp_path):
    _write_tokenizer_dir(tmp_path, {"chat_template": [{"name": "a", "template": "A"},
                                                      {"name": "b", "template": "B"}]})
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="none named 'default'"):
        tok.apply_chat_template(MESSAGES)
    assert tok.apply_chat_template(MESSAGES, template_name="b") == "B"


@pytest.mark.parametrize("conf, first, last", [
    ({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}, 104, 111),
    ({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True},
     BOS_ID, EOS_ID),
])
def test_add_bos_token_from_tokenizer_config(tmp_path, conf, first, last):
    """tokenizer.json's post-processor adds BOS; tokenizer_config.json's flags override it."""
    _write_tokenizer_dir(tmp_path, conf)
    ids = Tokenizer.from_dir(tmp_path).encode("hello")
    assert (ids[0], ids[-1]) == (first, last)


def test_chat_template_reaches_loaded_model(small_checkpoint):
    (small_checkpoint / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}))
    model = load_model(small_checkpoint, dtype="float32", use_cache=False, progress=False)
    assert model.tokenizer.apply_chat_template(MESSAGES) == RENDERED + "[ASSISTANT] "


def test_default_chat_template(byte_tok):
    assert byte_tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|user|>\nHi\n<|assistant|>\n")


@pytest.mark.parametrize("messages, needle", [
    ([], "messages"),
    ([{"role": "user"}], "messages[0]"),
    ([{"role": "user", "content": "a"}, "not a message"], "messages[1]"),
])
def test_bad_messages_raise(byte_tok, messages, needle):
    with pytest.raises(ValueError) as info:
        byte_tok.apply_chat_template(messages)
    assert needle in str(info.value)


def test_template_raise_exception_is_value_error(tmp_path):
    _write_tokenizer_dir(tmp_path, {"chat_template":
                                    "{{ raise_exception('roles must alternate') }}"})
    with pytest.raises(ValueError, match="chat template: roles must alternate"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(MESSAGES)


def test_chat_template_is_sandboxed(tmp_path):
    _write_tokenizer_dir(tmp_path, {"chat_template":
                                    "{{ messages.__class__.__mro__[1].__subclasses__() }}"})
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(MESSAGES)


# ------------------------------------------------------------------ EOS ids


@pytest.mark.parametrize("eos, expected", [
    (258, (258,)),
    ([257, 258], (257, 258)),
])
def test_generation_config_eos_reaches_model(small_checkpoint, eos, expected):
    edit_json(small_checkpoint / "generation_config.json", eos_token_id=eos)
    model = load_model(small_checkpoint, dtype="float32", use_cache=False, progress=False)
    assert model.eos_token_ids == expected
    assert model.tokenizer.eos_token_ids == expected
    assert model.config.eos_token_ids == (EOS_ID,)  # config.json's own value is unchanged


def test_eos_falls_back_to_config_then_tokenizer_config(small_checkpoint):
    (small_checkpoint / "generation_config.json").unlink()
    model = load_model(small_checkpoint, dtype="float32", use_cache=False, progress=False)
    assert model.eos_token_ids == (EOS_ID,)  # config.json

    edit_json(small_checkpoint / "config.json", eos_token_id=None)
    (small_checkpoint / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    model = load_model(small_checkpoint, dtype="float32", use_cache=False, progress=False)
    assert model.eos_token_ids == (258,)  # tokenizer_config.json's eos_token
