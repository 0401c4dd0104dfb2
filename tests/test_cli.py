"""The ``sluice`` command line.

``generate`` runs on the batched engine; ``--no-warmup`` skips compiling every
shape bucket up front (minutes on a 2-core CPU) so each test compiles only the
shapes its prompt needs. Greedy output must equal the one-at-a-time reference
decoder's.
"""

from __future__ import annotations

import json

import pytest

from sluice.runtime import greedy_generate, load_model
from sluice.runtime.cli import main


def _expected(model_name, prompt, max_tokens, **kw) -> str:
    model = load_model(model_name, progress=False, **kw)
    out = greedy_generate(model, model.tokenizer.encode(prompt), max_tokens)
    return prompt + model.tokenizer.decode(out)


FAST = ["--no-warmup"]


def test_generate_with_builtin_model(capsys):
    rc = main(["generate", "--model", "tiny", "--prompt", "Hi", "--max-tokens", "8", *FAST])
    assert rc == 0
    out = capsys.readouterr().out
    assert out == _expected("tiny", "Hi", 8) + "\n"
    assert out.startswith("Hi") and len(out) > len("Hi\n")


def test_generate_model_seed_changes_weights(capsys):
    args = ["generate", "--model", "tiny", "--prompt", "Hi", "--max-tokens", "8",
            "--dtype", "float32", *FAST]
    assert main(args + ["--model-seed", "3"]) == 0
    out3 = capsys.readouterr().out
    assert out3 == _expected("tiny", "Hi", 8, seed=3, dtype="float32") + "\n"
    assert main(args) == 0
    assert capsys.readouterr().out != out3


def test_generate_with_checkpoint_directory(hf_checkpoint, tmp_path, monkeypatch, capsys):
    _, path = hf_checkpoint("llama_gqa_tied_llama3_sharded")
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path / "cache"))
    args = ["generate", "--model", str(path), "--prompt", "Hello", "--max-tokens", "6",
            "--dtype", "float32", *FAST]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first == _expected(path, "Hello", 6, dtype="float32", use_cache=False) + "\n"
    assert any((tmp_path / "cache").iterdir())  # the default cache location is honoured
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_bad_model_path_returns_2(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["generate", "--model", str(missing), "--prompt", "Hi", *FAST]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("sluice: error:")
    assert str(missing) in captured.err


def test_broken_checkpoint_returns_2(small_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path / "cache"))
    (small_checkpoint / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["generate", "--model", str(small_checkpoint), "--prompt", "Hi", *FAST]) == 2
    err = capsys.readouterr().err
    assert "sluice: error:" in err and "model.safetensors" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", "tiny"])  # --prompt is required
    assert info.value.code == 2
    assert "--prompt" in capsys.readouterr().err


def test_bench_throughput_writes_json(tmp_path, capsys):
    out_file = tmp_path / "tp.json"
    rc = main(["bench", "throughput", "--model", "tiny", "--num-prompts", "3", "--input-len", "8",
               "--output-len", "4", "--max-model-len", "256", "--output-json", str(out_file),
               *FAST])
    assert rc == 0
    result = json.loads(out_file.read_text())
    assert result["num_prompts"] == 3 and result["output_tokens"] == 12
    assert result["output_tokens_per_s"] > 0
    assert json.loads(capsys.readouterr().out) == result


def test_bad_engine_flag_value_returns_2(capsys):
    assert main(["generate", "--model", "tiny", "--prompt", "Hi", "--max-model-len", "1",
                 *FAST]) == 2
    assert "max_model_len" in capsys.readouterr().err


def test_generate_with_swap_flags_matches_default(capsys):
    """The preemption flags reach the engine: a pool too small for both prompts
    forces preemption by swap (synchronous copies), output unchanged."""
    args = ["generate", "--model", "tiny", "--prompt", "swap me " * 10, "--prompt",
            "and me " * 10, "--max-tokens", "60", "--ignore-eos", *FAST]
    assert main(args) == 0
    plain = capsys.readouterr().out
    # 14 blocks of 16 tokens (32 KiB each for tiny): one request fits, not both.
    small = ["--kv-cache-memory", str(14 * 32 * 1024 / 2**30), "--max-model-len", "192",
             "--swap-space", "0.01", "--preemption-mode", "swap", "--no-async-swap",
             "--no-kv-reuse"]
    assert main(args + small) == 0
    assert capsys.readouterr().out == plain
    from sluice.runtime.cli import _engine_kwargs, build_parser
    kw = _engine_kwargs(build_parser().parse_args(args + small))
    assert (kw["preemption_mode"], kw["async_swap"], kw["kv_reuse"]) == ("swap", False, False)
    # and the engine they build really swapped, synchronously
    from sluice.runtime import SamplingParams
    from sluice.runtime.cli import _make_llm
    llm = _make_llm(build_parser().parse_args(args + small))
    llm.generate(["swap me " * 10, "and me " * 10],
                 SamplingParams(max_tokens=60, ignore_eos=True, temperature=0.0))
    engine = llm.engine
    assert engine.scheduler.num_swap_outs > 0 and engine.scheduler.num_recomputes == 0
    assert engine.swapper.stats.blocks_in > 0 and not engine.swapper.asynchronous


def test_priority_flags_reach_the_policy(capsys):
    from sluice.runtime.cli import _engine_kwargs, build_parser
    from sluice.runtime.engine import EngineConfig, LLMEngine

    args = ["generate", "--model", "tiny", "--prompt", "x", "--scheduling-policy", "priority",
            "--resume-deadline", "0.25", "--priority-aging", "2", "--no-displace-streaming"]
    kw = _engine_kwargs(build_parser().parse_args(args))
    engine = LLMEngine(load_model("tiny"), EngineConfig(**dict(kw, warmup=False)))
    policy = engine.scheduler.policy
    assert (policy.resume_deadline_s, policy.aging_s, policy.displace_streaming) == (0.25, 2.0,
                                                                                    False)
    # a deadline with a policy it does not apply to is refused with a clear error
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--resume-deadline", "1",
                 *FAST]) == 2
    assert "priority.resume_deadline_s: applies to the priority policy" in \
        capsys.readouterr().err


def test_fair_flags_reach_the_policy(capsys):
    from sluice.runtime.cli import _engine_kwargs, build_parser
    from sluice.runtime.engine import EngineConfig, LLMEngine

    args = ["generate", "--model", "tiny", "--prompt", "x", "--scheduling-policy", "fair",
            "--fair-weights", "0.5,4", "--client-weights", "alice=2,key:ab=0.5"]
    kw = _engine_kwargs(build_parser().parse_args(args))
    policy = LLMEngine(load_model("tiny"), EngineConfig(**dict(kw, warmup=False))).scheduler.policy
    assert (policy.w_in, policy.w_out, policy.weights) == (0.5, 4.0, {"alice": 2.0, "key:ab": 0.5})
    for flag, value in (("--fair-weights", "1"), ("--client-weights", "alice"),
                        ("--client-weights", "=2"), ("--client-weights", "bob=x"),
                        ("--client-weights", "a=1,a=2")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(args + [flag, value])
        assert f"argument {flag}" in capsys.readouterr().err
    assert main(args[:7] + ["--client-weights", "alice=0", *FAST]) == 2
    assert "fair.weights: the weight of 'alice' must be a finite number > 0" in \
        capsys.readouterr().err


# -- start-up: a command imports only what it needs --------------------------------

HEAVY = ("jax", "scipy", "ray", "torch", "uvicorn", "sluice.scheduler", "sluice.rag",
         "sluice.runtime.engine")


def _imported_by(argv: list[str]) -> tuple[str, set[str]]:
    """Run ``sluice ARGV`` in a fresh interpreter (as the console script does) and
    return its stdout and the `HEAVY` modules it had imported when it finished."""
    import subprocess
    import sys
    code = ("import sys\nfrom sluice.runtime.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print([m for m in sys.modules if m.startswith({HEAVY!r})])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    out, _, last = done.stdout.rstrip().rpartition("\n")
    return out, set(json.loads(last.replace("'", '"')))


def test_help_imports_nothing_heavy():
    out, heavy = _imported_by(["--help"])
    assert heavy == set(), heavy
    for name in ("generate", "serve", "bench", "provision", "rag"):
        assert name in out


@pytest.mark.parametrize("command", [["serve"], ["generate"], ["bench"], ["bench", "throughput"]])
def test_command_help_imports_no_jax(command):
    """Each command's --help lists its flags (their choices included) without JAX,
    uvicorn or the engine; the policies' option classes (plain data) may load."""
    out, heavy = _imported_by([*command, "--help"])
    assert heavy <= {"sluice.scheduler", "sluice.scheduler.policies"}, heavy
    assert "usage: sluice " + " ".join(command) in out
    if command == ["serve"]:
        from sluice.runtime.option_names import DISPATCH_POLICIES
        assert all(name in out for name in DISPATCH_POLICIES)


def test_provision_help_imports_neither_jax_nor_scipy():
    out, heavy = _imported_by(["provision", "--help"])
    assert heavy == set(), heavy
    # it documents the workload file and lists the model presets
    assert '"rate": 8.0' in out and "arrival_cv" in out
    from sluice.provision.perfmodel import MODELS
    assert all(name in out for name in MODELS)


def test_provision_run_does_not_import_jax(tmp_path):
    wl = tmp_path / "w.json"
    wl.write_text(json.dumps({"model": "llama-3-8b", "rate": 2, "requests": [[100, 50]]}))
    out, heavy = _imported_by(["provision", "--workload", str(wl), "--slo", "tpot=0.05",
                               "--types", "L4,H100", "--no-verify",
                               "--output", str(tmp_path / "plan.json")])
    assert "status: optimal" in out
    assert "jax" not in heavy and "sluice.runtime.engine" not in heavy and "scipy" in heavy


@pytest.mark.parametrize("flag, env", [("sk-flag 'quoted' $x", None), ("sk-env", "sk-env"),
                                       ("sk-flag", "sk-other")])
def test_ready_curl_line_works_as_pasted(monkeypatch, flag, env):
    """The curl line ``sluice serve`` prints sends the server's key when pasted into a
    shell: a key given by --api-key alone is written out (``$SLUICE_API_KEY`` is unset
    there), the shell's own variable is referenced, not echoed."""
    import os
    import subprocess

    from sluice.runtime.cli import curl_example
    if env is None:
        monkeypatch.delenv("SLUICE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("SLUICE_API_KEY", env)
    line = curl_example("http://127.0.0.1:8000", "tiny", False, flag)
    assert line.startswith("curl ") and ("$SLUICE_API_KEY" in line) == (flag == env)
    # the words the shell hands curl: printf in its place, in the same environment
    words = subprocess.run(["bash", "-c", "printf '%s\\n' " + line[len("curl "):]],
                           env=dict(os.environ), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert f"Authorization: Bearer {flag}" in words
    assert json.loads(words[-1])["prompt"] == "The quick brown fox"
    assert "Authorization" not in curl_example("http://h:1", "tiny", True, None)


def test_make_run_takes_port_and_args():
    """``make run PORT= ARGS=`` passes both to ``sluice serve`` (dry run: -n, with the
    install step taken as done)."""
    import shlex
    import subprocess
    from pathlib import Path
    import os
    root = Path(__file__).resolve().parents[1]
    # under `make test` the outer make's settings would make this one print its directory
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    make = ["make", "--no-print-directory", "-n", "-o", "install"]
    dry = subprocess.run([*make, "run", "PORT=8123", "ARGS=--no-warmup --api-key 'k 1'"],
                         cwd=root, capture_output=True, text=True, check=True, env=env).stdout
    words = shlex.split(dry.strip().splitlines()[-1])
    assert words[0].endswith("sluice") and words[1] == "serve"
    assert words[-5:] == ["--port", "8123", "--no-warmup", "--api-key", "k 1"]
    default = subprocess.run([*make, "run"], cwd=root, capture_output=True, text=True,
                             check=True, env=env).stdout
    assert shlex.split(default.strip().splitlines()[-1])[-2:] == ["--port", "8000"]


# -- the Ray path ---------------------------------------------------------------------

def test_start_ray_opens_no_dashboard_unless_asked_and_logs_its_addresses(monkeypatch):
    """``start_ray`` (Ray's own ``init`` and ``nodes`` faked: what is under test is what
    it asks Ray for and what it logs): no dashboard by default, one with
    ``dashboard=True``; the GCS, raylet and object-manager addresses are logged; a
    running Ray is left alone."""
    import logging

    import ray

    from sluice.scheduler import ray_instance
    calls: list[dict] = []

    def init(**kw):
        calls.append(kw)
        web = "127.0.0.1:8265" if kw["include_dashboard"] else ""
        return type("Context", (), {"address_info": {
            "node_id": "n1", "gcs_address": "10.0.0.5:6380", "node_ip_address": "10.0.0.5",
            "webui_url": web}})

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "nodes", lambda: [
        {"NodeID": "n0", "NodeManagerAddress": "10.0.0.9"},
        {"NodeID": "n1", "NodeManagerAddress": "10.0.0.5", "NodeManagerPort": 41000,
         "ObjectManagerPort": 41001}])
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(ray_instance.__name__)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        ray_instance.start_ray()
        ray_instance.start_ray(dashboard=True)
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        ray_instance.start_ray()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [c["include_dashboard"] for c in calls] == [False, True]
    assert all(c["address"] is None and c["log_to_driver"] is False for c in calls)
    quiet, loud = (r.getMessage() for r in records)
    assert "started a local cluster, GCS at 10.0.0.5:6380" in quiet
    assert "raylet at 10.0.0.5:41000, object manager at 10.0.0.5:41001" in quiet
    assert "dashboard off" in quiet and "dashboard at http://127.0.0.1:8265" in loud


def test_serve_ray_starts_ray_before_jax_initializes():
    """``sluice serve --ray`` starts Ray before anything initializes a JAX backend (a
    fork after JAX's threads exist is what JAX warns may deadlock): the call is
    intercepted in a fresh interpreter, which stops there."""
    import subprocess
    import sys
    code = ("import sys\nimport jax._src.xla_bridge as xb\n"
            "from sluice.scheduler import ray_instance\n"
            "def fake(address, dashboard):\n"
            "    print('jax_initialized', xb.backends_are_initialized(), 'dashboard', dashboard)\n"
            "    sys.exit(0)\n"
            "ray_instance.start_ray = fake\n"
            "from sluice.runtime.cli import main\n"
            "main(['serve', '--ray', '--instances', '2', '--port', '0', '--ray-dashboard'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["jax_initialized", "False", "dashboard", "True"]


def test_serve_ray_passes_the_compile_cache_choice_to_the_actors(monkeypatch, tmp_path):
    """``--ray``: the actors' `ModelSpec` carries the driver's compilation cache
    directory, and none with ``--no-compile-cache`` (``ray_cluster`` is intercepted:
    what is under test is what the CLI asks it for)."""
    from sluice.runtime import cli, compile_cache
    from sluice.runtime.async_engine import StreamLimits
    from sluice.scheduler import ray_instance

    class Intercepted(Exception):
        pass

    specs = []

    def fake_cluster(spec, *args, **kwargs):
        specs.append(spec)
        raise Intercepted

    monkeypatch.setattr(compile_cache, "enable_compile_cache", lambda: tmp_path / "jax")
    monkeypatch.setattr(ray_instance, "ray_cluster", fake_cluster)
    for extra in ([], ["--no-compile-cache"]):
        args = cli.build_parser(["serve"]).parse_args(
            ["serve", "--ray", "--instances", "2", *extra])
        with pytest.raises(Intercepted):
            cli._make_cluster(args, StreamLimits())
    assert [s.compile_cache for s in specs] == [str(tmp_path / "jax"), None]


def test_serve_defers_part_of_the_warmup_unless_asked_for_all():
    """``sluice serve`` answers once a covering set of step programs is compiled
    (`EngineConfig.defer_warmup`); ``--full-warmup`` compiles every one first, and
    the offline commands always do."""
    from sluice.runtime import cli

    def defer(argv: list[str]) -> bool:
        args = cli.build_parser([argv[0]]).parse_args(argv)
        return cli._engine_kwargs(args)["defer_warmup"]

    assert defer(["serve"]) is True
    assert defer(["serve", "--full-warmup"]) is False
    assert defer(["generate", "--prompt", "hi"]) is False
