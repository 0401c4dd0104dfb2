"""Shared fixtures: the built-in ``tiny`` model (``tiny``), tiny random Hugging
Face checkpoints written with `transformers`, and `ThreadedServer` (an app served
by uvicorn on a background thread, for the live-server tests).

Every checkpoint is hidden 64, 2 layers, vocabulary 300 (the byte-level
tokenizer's 259 ids plus spare rows), with all weights (norms and biases
included) drawn at a scale that makes greedy continuations non-trivial.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

# A fresh cache directory per test session: compiled programs and converted models
# from an earlier run (or another checkout) are never read back. Two full runs over
# a warm persistent compilation cache crashed the process (SIGABRT, then SIGSEGV) at
# the same test; the one over a cold cache did not.
# Each pytest-xdist worker gets its own (a worker inherits the controller's environment,
# so the directory made there would be shared).
if "SLUICE_CACHE_DIR" not in os.environ or os.environ.get("SLUICE_TEST_CACHE_OWNER") not in (
        None, os.environ.get("PYTEST_XDIST_WORKER", "main")):
    import tempfile
    os.environ["SLUICE_CACHE_DIR"] = tempfile.mkdtemp(prefix="sluice-test-cache-")
    os.environ["SLUICE_TEST_CACHE_OWNER"] = os.environ.get("PYTEST_XDIST_WORKER", "main")

# Several CPU devices, so multi-instance tests put each instance on its own device
# (set before anything imports jax).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4").strip()

# The suite's time is mostly XLA:CPU compiling small programs, and LLVM's -O0 halves
# that (the fault-isolation poison test: 48 -> 32 s of CPU). Tests check behaviour,
# never speed; benchmarks (bench/) and the runtime keep XLA's default level.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs property tests with a fixed seed, so a submission's result does not depend on
# luck; developers' runs stay randomized and keep finding new cases.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# The costliest test files, most CPU first: CPU seconds of per-file runs on this
# 2-core machine (Dec 2; loaded, so for ranking): Gemma 3 ~180, engine ~175,
# preemption ~100, server ~60, fault isolation ~36, scheduling ~35, sampler ~26,
# server processes ~25; the others by their engines and models. `make test` hands
# whole files to two pytest-xdist workers in collection order (see pytest_configure),
# so these start first and the many short files fill in at the end. xdist's default
# order (most collected tests first) put several heavy few-test files last (Gemma 3
# 3 tests, fault isolation 9, the server processes 2, Ray 1), where a long file
# started last runs on alone after the other worker is done. A file missing here
# only runs later; keep the list roughly current.
HEAVY_FILES = (
    "test_gemma3.py", "test_engine.py", "test_cluster.py", "test_preemption.py",
    "test_server.py", "test_cli.py", "test_cluster_ray.py", "test_gguf.py",
    "test_fault_isolation.py", "test_scheduling_policies.py", "test_structured_server.py",
    "test_sampler.py", "test_server_process.py", "test_output_streams.py", "test_compiles.py",
)


def pytest_configure(config: pytest.Config) -> None:
    # xdist's --no-loadscope-reorder, set here so a plain `pytest -n 2 --dist loadfile`
    # gets it too (the scheduler reads it once collection is done)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps file order


class ThreadedServer:
    """An ASGI app served by uvicorn on a background thread, on 127.0.0.1 at a free
    port (``url``, ``port``); construction returns once uvicorn has started.

    ``config(app)`` builds the uvicorn settings (default: `quiet_config`; the
    connection-limit tests pass the server's `connection_config`). ``timeout``
    bounds both the start and `stop`. A context manager, or call `stop`."""

    def __init__(self, app, config=None, timeout: float = 30.0):
        import uvicorn

        from sluice.runtime.server import bind_socket  # imported late: it imports jax
        sock = bind_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.uv = uvicorn.Server((config or quiet_config)(app))
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.uv.serve(sockets=[sock])), daemon=True)
        self.thread.start()
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        while not self.uv.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(self.timeout)

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_to_finish(engine, requests: dict) -> dict:
    """Add ``requests`` (id -> (prompt token ids, SamplingParams)) to an `LLMEngine`
    and step it until nothing is unfinished; the finished outputs by request id."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.fixture
def compile_threads(monkeypatch) -> list[str]:
    """The names of the threads that compiled a constraint not cached yet (a spy on
    `structured_output._Compiler.compile`), in order."""
    from sluice.runtime import structured_output
    names: list[str] = []
    compile_ = structured_output._Compiler.compile

    def spy(self, constraint):
        if structured_output._Key(constraint.kind, constraint.spec) not in self.compiled:
            names.append(threading.current_thread().name)
        return compile_(self, constraint)

    monkeypatch.setattr(structured_output._Compiler, "compile", spy)
    return names


def quiet_config(app):
    """uvicorn settings for tests: no logging config, no access log, lifespan on."""
    import uvicorn
    return uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")


@pytest.fixture(scope="session")
def tiny():
    """The built-in ``tiny`` model (random weights, float32), built once for the
    session: tests read it and never change it (an engine pinned to a device
    copies the parameters there)."""
    from sluice.runtime import load_model
    return load_model("tiny", dtype="float32")


VOCAB = 300
BOS_ID, EOS_ID = 256, 257  # the byte-level tokenizer's <s> and </s>

_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False)

# name -> (HF class name, config overrides, save_pretrained max_shard_size or None)
CHECKPOINTS: dict[str, tuple[str, dict, str | None]] = {
    # GQA 4:1, tied embeddings, llama3 rope scaling with all three frequency bands
    # (original context 64 with head_dim 16: wavelengths 6..19000), in 9 shards.
    "llama_gqa_tied_llama3_sharded": ("LlamaForCausalLM", dict(
        num_key_value_heads=1, tie_word_embeddings=True, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "40KB"),
    # Plain multi-head attention, linear rope scaling, q/k/v/o bias, explicit head_dim
    # (4 heads x 32 != hidden 64), a non-default rope theta.
    "llama_linear_bias_headdim": ("LlamaForCausalLM", dict(
        num_key_value_heads=4, head_dim=32, attention_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.5, "rope_theta": 50000.0}), None),
    # Sliding window (8) much shorter than the test sequences.
    "mistral_sliding": ("MistralForCausalLM", dict(sliding_window=8), None),
    # q/k/v bias, GQA 4:2, in several shards. Sliding window switched on but, with
    # max_window_layers = num layers, applied to no layer (HF semantics).
    "qwen2_bias_sharded": ("Qwen2ForCausalLM", dict(
        rope_theta=1000000.0, use_sliding_window=True, sliding_window=8, max_window_layers=2),
        "60KB"),
    # Qwen2 with a sliding window on every layer (max_window_layers 0), tied embeddings.
    "qwen2_sliding_tied": ("Qwen2ForCausalLM", dict(
        num_key_value_heads=1, use_sliding_window=True, sliding_window=6, max_window_layers=0,
        tie_word_embeddings=True), None),
}


def hf_model_class(arch: str):
    import transformers
    return getattr(transformers, arch)


def hf_config(arch: str, overrides: dict):
    import transformers
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    kw = {**_BASE, **overrides}
    rope = kw.pop("rope_scaling", None)
    theta = kw.pop("rope_theta", None)
    cfg = cfg_cls(**kw)
    params = dict(cfg.rope_parameters or {})
    if theta is not None:
        params["rope_theta"] = theta
    if rope is not None:
        params.update(rope)
    if params:
        cfg.rope_parameters = params
    return cfg


def build_hf_model(arch: str, overrides: dict, seed: int = 0):
    """A random HF model in eval mode, eager attention, weights at a useful scale."""
    import torch
    torch.manual_seed(seed)
    cfg = hf_config(arch, overrides)
    cfg._attn_implementation = "eager"
    model = hf_model_class(arch)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.15)
    return model


def save_checkpoint(model, path: Path, max_shard_size: str | None = None) -> Path:
    from sluice.runtime.tokenizer import Tokenizer
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    Tokenizer.byte_level().hf.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(name) -> (hf_model, path)``, built once per session."""
    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            arch, overrides, shard = CHECKPOINTS[name]
            model = build_hf_model(arch, overrides)
            path = save_checkpoint(model, tmp_path_factory.mktemp(name), shard)
            built[name] = (model, path)
        return built[name]

    return get


@pytest.fixture
def small_checkpoint(hf_checkpoint, tmp_path):
    """A private, writable copy of a small single-file Llama checkpoint."""
    _, src = hf_checkpoint("llama_linear_bias_headdim")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d, indent=2))
