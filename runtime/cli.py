"""The ``sluice`` command line: ``sluice generate``, ``sluice serve`` (the
OpenAI-compatible HTTP server), ``sluice bench throughput`` and ``sluice
provision`` (defined in `sluice.provision.cli`), ``sluice rag build-index``
(`sluice.rag.cli`).

It answers at once: `COMMANDS` names each subcommand's help line and, as
``"module:function"`` strings, the function that adds its flags to its parser and
the one that runs it. ``main`` imports only the chosen command's module, and the
commands import JAX, the engine, the scheduler, Ray, ... inside their functions, so
``sluice --help`` imports none of them and ``sluice provision`` only the provisioner.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, TextIO

if TYPE_CHECKING:
    from sluice.runtime.async_engine import StreamLimits
    from sluice.runtime.llm import LLM
    from sluice.scheduler.async_cluster import AsyncCluster


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    configure: str  # "module:function": adds the command's flags to its parser
    run: str  # "module:function": args -> exit status


COMMANDS: dict[str, Command] = {
    "generate": Command("generate continuations of prompts",
                        f"{__name__}:configure_generate", f"{__name__}:cmd_generate"),
    "serve": Command("OpenAI-compatible HTTP server",
                     f"{__name__}:configure_serve", f"{__name__}:cmd_serve"),
    "bench": Command("benchmarks", f"{__name__}:configure_bench", f"{__name__}:cmd_bench"),
    "provision": Command("cheapest mix of accelerator types that meets an SLO",
                         "sluice.provision.cli:configure", "sluice.provision.cli:run"),
    "rag": Command("retrieval-augmented generation",
                   "sluice.rag.cli:configure", "sluice.rag.cli:run"),
}


def _load(spec: str) -> Callable[..., Any]:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


GiB = 1 << 30
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, access_log: str = "json",
                      stream: TextIO | None = None) -> logging.Handler:
    """Send Sluice's own loggers (``sluice.*``, the access log among them) and
    uvicorn's to ``stream`` (stderr) at ``level``, with one handler of their own.
    ``logging.basicConfig`` is not enough: orbax and absl call it at import, so a
    later call does nothing and INFO lines (the access log, migrations) were lost.
    ``access_log="off"`` silences the access log. Returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for name in ("sluice", "uvicorn"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "sluice_cli", False)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level.upper())
        logger.propagate = False
    handler.sluice_cli = True  # type: ignore[attr-defined]
    logging.getLogger("sluice.access").setLevel(
        logging.WARNING if access_log == "off" else logging.NOTSET)
    return handler


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny",
                   help="built-in model name (tiny, smollm2-135m-random), packaged real model "
                        "(smollm2-135m-instruct, gemma3-270m), Hugging Face checkpoint "
                        "directory or .gguf file (default: tiny)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="weight and activation dtype (default: float32 on CPU, bfloat16 "
                        "on GPU/TPU)")
    g.add_argument("--model-seed", type=int, default=0,
                   help="seed of the random weights of built-in models (default: 0)")
    g.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled step shapes in JAX's persistent compilation "
                        "cache under $SLUICE_CACHE_DIR/jax (on by default: a second start "
                        "loads them instead of compiling)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from sluice.scheduler.policies import FairOptions, PriorityOptions

    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--max-num-seqs", type=int, default=64,
                   help="most sequences running at once (default: 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="token budget of one engine step; longer prompts are prefilled in "
                        "chunks (default: 512)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's context, at most 2048)")
    g.add_argument("--kv-cache-memory", type=float, default=None,
                   help="GiB for the KV cache pool (default: 90%% of free accelerator memory; "
                        "on CPU what --max-num-seqs full-length sequences need, at most 2 GiB)")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "fair"],
                   help="admission order: fcfs, priority (request `priority`, lower first, "
                        "preempting lower-priority running requests), or fair (virtual token "
                        "counters per client) (default: fcfs)")
    add_option_flags(g, PriorityOptions, "with --scheduling-policy priority", "priority")
    add_option_flags(g, FairOptions, "with --scheduling-policy fair", "fair")
    g.add_argument("--swap-space", type=float, default=0.0,
                   help="GiB of host memory for the KV of preempted requests; 0 preempts by "
                        "recompute (default: 0)")
    g.add_argument("--preemption-mode", default="auto", choices=["auto", "swap"],
                   help="with --swap-space: swap only when copying is estimated cheaper than "
                        "recomputing (auto), or whenever host blocks are free (default: auto)")
    g.add_argument("--no-async-swap", action="store_true",
                   help="swap synchronously: swap-outs finish and swap-ins complete "
                        "on the engine thread before the step")
    g.add_argument("--no-kv-reuse", action="store_true",
                   help="do not keep finished conversations' KV in the swap space")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="disable automatic prefix caching")
    g.add_argument("--attention-backend", default="pallas",
                   help="attention implementation: pallas (Pallas kernels on GPU/TPU, the "
                        "chunked pure-JAX path on CPU), chunked, reference, or "
                        "pallas-interpret / pallas-tpu-interpret (kernels in interpret mode, "
                        "for testing) (default: pallas)")
    g.add_argument("--num-speculative-tokens", type=int, default=0,
                   help="n-gram (prompt-lookup) speculative decoding: draft tokens per decode "
                        "step (greedy and sampled requests; not structured outputs), "
                        "verified in one step; 0 disables (default: 0)")
    g.add_argument("--no-warmup", action="store_true",
                   help="skip compiling every shape bucket (and, for serve, the "
                        "embedder's) at start-up: first requests compile instead")


def add_option_flags(group: argparse._ArgumentGroup, options: type, scope: str,
                     prefix: str) -> None:
    """The flags of an options dataclass's fields (`sluice.scheduler.policies.option`):
    each field's flag, default, help and metavar are stated once, on the field; the
    parsed value lands under ``{prefix}_{field}`` (`option_values` builds the options
    back). A bool field gives a switch that flips its default; a flag that spans
    fields takes their defaults as a tuple; fields without a flag belong to a span."""
    fields = dataclasses.fields(options)
    for i, f in enumerate(fields):
        meta = f.metadata
        if meta.get("flag") is None:
            continue
        dest, text = f"{prefix}_{f.name}", f"{scope}: {meta['help']}"
        if isinstance(f.default, bool):
            group.add_argument(meta["flag"], dest=dest, default=f.default,
                               action="store_false" if f.default else "store_true", help=text)
            continue
        default = f.default
        if meta["span"] > 1:
            default = tuple(g.default for g in fields[i:i + meta["span"]])
            text += f" (default: {','.join(f'{d:g}' for d in default)})"
        group.add_argument(meta["flag"], dest=dest, type=_argument_type(meta["parse"]),
                           default=default, metavar=meta["metavar"], help=text)


def option_values(args: argparse.Namespace, options: type, prefix: str) -> Any:
    """The ``options`` dataclass from the flags `add_option_flags` added."""
    fields, values = dataclasses.fields(options), {}
    for i, f in enumerate(fields):
        meta = f.metadata
        if meta.get("flag") is None:
            continue
        value = getattr(args, f"{prefix}_{f.name}")
        span = fields[i:i + meta["span"]]
        values.update(zip((g.name for g in span), value) if len(span) > 1 else [(f.name, value)])
    return options(**values)


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` for argparse: its ``ValueError`` is the flag's error message."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def _engine_kwargs(args: argparse.Namespace) -> dict:
    from sluice.scheduler.policies import FairOptions, PriorityOptions

    return dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=args.max_model_len,
                kv_cache_memory=None if args.kv_cache_memory is None
                else int(args.kv_cache_memory * GiB),
                enable_prefix_caching=not args.no_prefix_caching,
                scheduling_policy=args.scheduling_policy,
                priority=option_values(args, PriorityOptions, "priority"),
                fair=option_values(args, FairOptions, "fair"),
                swap_space=int(args.swap_space * GiB), preemption_mode=args.preemption_mode,
                async_swap=not args.no_async_swap,
                kv_reuse=not args.no_kv_reuse,
                attention_backend=args.attention_backend, warmup=not args.no_warmup,
                # a server answers once a covering set of step programs is compiled
                defer_warmup=args.command == "serve" and not args.full_warmup,
                num_speculative_tokens=args.num_speculative_tokens)


def _make_llm(args: argparse.Namespace) -> LLM:
    from sluice.runtime.llm import LLM

    return LLM(args.model, dtype=args.dtype, seed=args.model_seed,
               compile_cache=not args.no_compile_cache, **_engine_kwargs(args))


def _make_cluster(args: argparse.Namespace, limits: StreamLimits) -> AsyncCluster:
    """``--instances N``: N engines under the global scheduler, one per device
    in this process, or one per Ray actor with ``--ray``."""
    from sluice.runtime.compile_cache import enable_compile_cache
    from sluice.runtime.engine import EngineConfig
    from sluice.runtime.loader import load_model
    from sluice.scheduler.async_cluster import AsyncCluster, local_cluster
    from sluice.scheduler.cluster import ClusterConfig

    engine_config = EngineConfig(**_engine_kwargs(args))
    config = ClusterConfig(dispatch=args.dispatch, migrate=not args.no_migration)
    cache = None if args.no_compile_cache else enable_compile_cache()
    if args.ray:
        from sluice.scheduler.ray_instance import ModelSpec, ray_cluster  # imports Ray
        # the actors share this process's compilation cache (the first fills it)
        spec = ModelSpec(args.model, args.dtype, args.model_seed,
                         None if cache is None else str(cache))
        cluster = ray_cluster(spec, engine_config, args.instances, config, args.ray_address)
    else:
        model = load_model(args.model, dtype=args.dtype, seed=args.model_seed)
        cluster = local_cluster(model, engine_config, args.instances, config)
    if args.autoscale is not None:
        from sluice.scheduler.autoscale import attach
        attach(cluster, args.autoscale, args.max_instances or 2 * args.instances,
               args.autoscale_profile)
    return AsyncCluster(cluster, limits)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``sluice`` parser with the flags of ``commands`` (default: all of them);
    the others are listed with their help line but take no flags."""
    chosen = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice LLM serving runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if name in chosen:
            _load(command.configure)(p)
    return parser


def configure_generate(gen: argparse.ArgumentParser) -> None:
    _add_model_args(gen)
    _add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True,
                     help="prompt text (repeat for a batch)")
    gen.add_argument("--max-tokens", type=int, default=32,
                     help="most tokens to generate per prompt (default: 32)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 is greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    gen.add_argument("--top-k", type=int, default=0, help="top-k sampling; 0 disables (default: 0)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")


def configure_serve(srv: argparse.ArgumentParser) -> None:
    from sluice.runtime.option_names import (ACCESS_LOG_FORMATS, AUTOSCALERS, COMPAT_MODES,
                                             DISPATCH_POLICIES)

    _add_model_args(srv)
    _add_engine_args(srv)
    g = srv.add_argument_group("server")
    g.add_argument("--full-warmup", action="store_true",
                   help="compile every step program before answering (default: a covering "
                        "set first, the rest in the background, steps padded to a compiled "
                        "shape meanwhile: a sooner start)")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one "
                   "(default: 8000)")
    g.add_argument("--api-key", default=os.environ.get("SLUICE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on API routes (default: "
                        "$SLUICE_API_KEY; unset: no check)")
    g.add_argument("--served-model-name", default=None,
                   help="model name clients send and responses report (default: --model)")
    g.add_argument("--max-waiting", type=int, default=None,
                   help="most sequences queued without a token yet (each completion of each "
                        "prompt, each embedding input); more get 429 with Retry-After, a "
                        "request that could never fit gets 400 (default: unbounded)")
    g.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="largest request body; larger ones get 413 (default: 4 MiB)")
    g.add_argument("--max-embedding-inputs", type=int, default=2048,
                   help="most inputs in one /v1/embeddings request; more get 400 "
                        "(default: 2048, as OpenAI)")
    g.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request body must arrive within this; else 408 (default: 30)")
    g.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a connection whose request headers have not all arrived this long "
                        "after it opened (or after its last response) is closed (default: 10)")
    g.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="SECONDS",
                   help="an idle keep-alive connection is closed after this (default: 5)")
    g.add_argument("--limit-concurrency", type=int, default=1024,
                   help="most connections and requests at once; past it uvicorn answers 503 "
                        "(default: 1024)")
    g.add_argument("--max-header-bytes", type=int, default=16 << 10,
                   help="largest request line + headers; larger get 400 (default: 16 KiB)")
    g.add_argument("--stream-stall-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a stream whose reader leaves output unread this long is aborted and "
                        "counted in sluice:num_streams_stalled (default: 60)")
    g.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="level of Sluice's and uvicorn's logs on stderr (default: info)")
    g.add_argument("--access-log", default="json", choices=[*ACCESS_LOG_FORMATS, "off"],
                   help="one line per request (id, status, tokens, latency) as JSON or "
                        "key=value text, or none (default: json)")
    g.add_argument("--metrics-compat", default=None, choices=COMPAT_MODES,
                   help="/metrics also under these servers' names, labels and meaning "
                        "(vllm: the vllm: series routers and dashboards written for vLLM "
                        "read), besides sluice: (default: sluice: only)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM before they are "
                        "aborted (default: 30)")
    g.add_argument("--instances", type=int, default=1,
                   help="engines behind the global scheduler, one per device (default: 1; "
                        "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    g.add_argument("--dispatch", default="freest", choices=list(DISPATCH_POLICIES),
                   help="with --instances > 1: how requests are placed (default: freest)")
    g.add_argument("--no-migration", action="store_true",
                   help="with --instances > 1: never live-migrate running requests")
    g.add_argument("--autoscale", default=None, choices=list(AUTOSCALERS),
                   help="resize the cluster (from --instances, never fewer) as load changes: "
                        "by the global scheduler's freeness, or by the provisioner's MILP "
                        "re-planner over --autoscale-profile (default: a fixed size)")
    g.add_argument("--max-instances", type=int, default=None,
                   help="with --autoscale: most instances (default: twice --instances)")
    g.add_argument("--autoscale-profile", default=None, metavar="FILE",
                   help="with --autoscale replan: the instances' profile, a `sluice "
                        "provision` profile file holding one type")
    g.add_argument("--ray", action="store_true",
                   help="run each instance in a Ray actor (a local Ray cluster unless "
                        "--ray-address is given)")
    g.add_argument("--ray-address", default=None,
                   help="address of an existing Ray cluster (with --ray)")
    g.add_argument("--ray-dashboard", action="store_true",
                   help="with --ray: start Ray's dashboard with the local cluster (default: "
                        "off, no port opened for it)")
    g.add_argument("--rag-index", default=None,
                   help="serve POST /v1/rag/query over this `sluice rag build-index` directory")


def configure_bench(bench: argparse.ArgumentParser) -> None:
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    tp = bench_sub.add_parser("throughput", help="offline generation throughput")
    _add_model_args(tp)
    _add_engine_args(tp)
    tp.add_argument("--num-prompts", type=int, default=32, help="number of requests (default: 32)")
    tp.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: 128)")
    tp.add_argument("--output-len", type=int, default=128, help="generated tokens (default: 128)")
    tp.add_argument("--output-json", default=None, help="write the result to this JSON file")


def cmd_generate(args: argparse.Namespace) -> int:
    from sluice.runtime.sampling_params import SamplingParams

    llm = _make_llm(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    for prompt, out in zip(args.prompt, llm.generate(args.prompt, params)):
        print(prompt + out.outputs[0].text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from sluice.runtime.async_engine import AsyncEngine, StreamLimits
    from sluice.runtime.server import ServerConfig, bind_socket, run_server

    if args.max_waiting is not None and args.max_waiting < 0:
        raise ValueError(f"max_waiting: must be >= 0, got {args.max_waiting}")
    if args.max_body_bytes < 1:
        raise ValueError(f"max_body_bytes: must be >= 1, got {args.max_body_bytes}")
    configure_logging(args.log_level, args.access_log)
    name = args.served_model_name or args.model
    config = ServerConfig(
        name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
        max_waiting=args.max_waiting,
        body_timeout_s=args.body_timeout, max_embedding_inputs=args.max_embedding_inputs,
        access_log_format="json" if args.access_log == "off" else args.access_log,
        timeout_keep_alive_s=args.timeout_keep_alive, header_timeout_s=args.header_timeout,
        limit_concurrency=args.limit_concurrency, max_header_bytes=args.max_header_bytes,
        metrics_compat=args.metrics_compat)
    limits = StreamLimits(stall_timeout_s=args.stream_stall_timeout)
    sock = bind_socket(args.host, args.port)  # fail on a taken port before loading the model
    if args.ray:  # before anything starts JAX's threads: Ray forks its processes
        from sluice.scheduler.ray_instance import start_ray
        start_ray(args.ray_address, args.ray_dashboard)
    many = args.instances != 1 or args.ray or args.autoscale is not None
    llm = None if many else _make_llm(args)
    front = _make_cluster(args, limits) if many else AsyncEngine(llm.engine, limits)
    # so a first /v1/embeddings request compiles nothing; with --ray each actor warms up
    # its own (`EngineActor`: embeddings run there), and the driver holds no weights
    if not args.no_warmup and not args.ray:
        from sluice.runtime.embed import warmup
        warmup(front.model, front.max_model_len)
    # A model with a chat template is shown a question; others a prompt to continue.
    chat = llm is not None and llm.tokenizer.chat_template is not None

    def ready(host: str, port: int) -> None:
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        print(f"sluice: serving {name} at {url}\n{curl_example(url, name, chat, args.api_key)}",
              flush=True)

    parts = []
    if args.rag_index is not None:
        from sluice.rag.http import rag_part
        scaler = front.cluster.autoscaler if many else None  # RAG's replicas are an input
        parts.append(rag_part(args.rag_index, scaler.add_demand if scaler else None))
    asyncio.run(run_server(front, config, sock, args.shutdown_timeout, ready, parts))
    return 0


def curl_example(url: str, model: str, chat: bool, api_key: str | None) -> str:
    """A curl command line that works as pasted into a POSIX shell: a key that is the
    shell's $SLUICE_API_KEY is referenced by name (not echoed); one given by
    --api-key alone is written out, since the variable is unset."""
    path, body = ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": "What is the capital of France?"}]}) if chat else (
        "/v1/completions", {"prompt": "The quick brown fox"})
    body = json.dumps({"model": model, **body, "max_tokens": 16})
    auth = ""
    if api_key:
        auth = (' -H "Authorization: Bearer $SLUICE_API_KEY"'
                if api_key == os.environ.get("SLUICE_API_KEY")
                else f" -H {shlex.quote(f'Authorization: Bearer {api_key}')}")
    return (f"curl {url}{path} -H 'Content-Type: application/json'{auth} "
            f"-d {shlex.quote(body)}")


def cmd_bench(args: argparse.Namespace) -> int:
    from sluice.runtime.benchmark import random_prompts, throughput

    llm = _make_llm(args)
    prompts = random_prompts(args.num_prompts, args.input_len, llm.model.config.vocab_size)
    result = {"model": args.model, **throughput(llm, prompts, args.output_len)}
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word that is not an option (the top level has only -h).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser([chosen] if chosen in COMMANDS else []).parse_args(argv)
    command = _load(COMMANDS[args.command].run)
    try:
        return command(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"sluice: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
