"""The package's import graph follows its layers, so the structure stays readable.

Every module of the ``sluice`` package is parsed (`ast`, no import executed) and every
``import`` / ``from ... import`` in it is an edge, wherever it sits: module level,
inside a function, under ``if TYPE_CHECKING``. A module may import from its own layer
or a lower one. The test fails on an edge that goes up, and on a module that is not in
`LAYERS` (a new module must be placed, which is the point of the check).

The layers, low to high (data flows down: server/API -> engine -> scheduler + KV
manager -> model -> kernels):

- L0 kernels: ``sluice.pallas_kernels.*``, nothing from the rest of the package.
- L1 model: configuration, weights and their formats, tokenizers, the pure model,
  its runner and the per-request data the layers above pass down.
- L2 per-instance scheduler and KV manager: ``scheduler.local``, ``policies``,
  ``runtime.block_manager``, ``swap``.
- L3 engine: the engine step and what drives it in one process (intake,
  migration endpoint, async front, offline ``LLM``).
- L4 global scheduler and services: cluster, instances (local and Ray), the
  migration driver, fleet; the provisioner; RAG's retrieval and SLA machinery.
- L5 front: the HTTP server and its protocol, metrics, the CLIs, RAG's HTTP routes.

Placements that differ from a folder's first guess are explained next to the entry.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sluice.pallas_kernels": "pallas_kernels", "sluice.runtime": "runtime",
            "sluice.scheduler": "scheduler", "sluice.provision": "provision", "sluice.rag": "rag"}

KERNELS, MODEL, INSTANCE, ENGINE, SERVICES, FRONT = range(6)

LAYERS: dict[str, int] = {
    "sluice.pallas_kernels": KERNELS,
    **{f"sluice.runtime.{m}": MODEL for m in (
        "config", "model", "attention", "rope", "kv_cache", "sampler", "sampling_params",
        "tokenizer", "detokenizer", "checkpoint", "gguf", "loader", "compile_cache",
        "model_runner", "request", "outputs", "embed",
        # grammars and tool-call formats compiled to per-request token masks the sampler
        # applies: request-level data, below the engine
        "structured_output", "tool_calls",
        "compiles",  # counts and logs XLA compiles; imports nothing from the package
        "devices",  # JAX's default device, where unnamed placements go: no imports
        # the names serving options accept (sluice serve --help lists them, light): no imports
        "option_names",
        "export",  # writes a Model back as a checkpoint: model-level, like the loader
        # the one-sequence reference decoder: a loop over the pure model, no engine
        "generate",
    )},
    **{m: INSTANCE for m in (
        "sluice.scheduler.local", "sluice.scheduler.policies", "sluice.runtime.block_manager",
        "sluice.runtime.swap", "sluice.runtime.kv_manager",
        # n-gram draft proposals for speculative decoding: a scheduling decision
        "sluice.runtime.spec_decode",
        # the package docstring only: importing it runs nothing
        "sluice.scheduler",
    )},
    **{f"sluice.runtime.{m}": ENGINE for m in (
        "engine", "intake", "migration", "async_engine", "llm", "engine_worker",
        # the front-end interface the server is written against, and the health every
        # front end (one engine or a cluster, L4) reports: the engine's upper edge
        "frontend", "health",
        "benchmark",  # offline throughput of an `LLM` (`sluice bench throughput`)
    )},
    # The package's facade: lazily re-exports `LLM`, `AsyncEngine`, ... (L3 and lower).
    "sluice.runtime": ENGINE,
    **{f"sluice.scheduler.{m}": SERVICES for m in (
        "cluster", "instance", "ray_instance", "async_cluster", "migration", "fleet",
        "autoscale")},
    **{f"sluice.provision.{m}": SERVICES for m in (
        "catalog", "workload", "perfmodel", "profiles", "planner", "simulate", "replan",
        "calibrate")},
    "sluice.provision": SERVICES,
    **{f"sluice.rag.{m}": SERVICES for m in (
        "agents", "answer_type", "bm25", "capacity", "config", "corpus", "cost", "dense",
        "embedder", "generation", "hybrid", "index", "intent", "pipeline", "profiling",
        "retrieval", "service", "sla", "text", "build", "synthetic")},
    "sluice.rag": SERVICES,
    **{f"sluice.runtime.{m}": FRONT for m in (
        "server", "openai_protocol", "http_errors", "metrics", "cli")},
    **{m: FRONT for m in ("sluice.provision.cli", "sluice.rag.cli", "sluice.rag.http")},
}


def modules(root: Path = ROOT, packages: dict[str, str] = PACKAGES) -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name)."""
    found = {}
    for package, folder in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def layer(module: str) -> int | None:
    """The module's layer: its own entry, else (kernels) its package's."""
    if module in LAYERS:
        return LAYERS[module]
    if module.startswith("sluice.pallas_kernels."):
        return KERNELS
    return None


def imports(name: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every package module this file imports. ``from P import X``
    is an edge to ``P.X`` when that is a module, else to ``P``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            edges += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                edges.append((node.lineno, sub if sub in known else base))
    return [(line, m) for line, m in edges if m == "sluice" or m.startswith("sluice.")]


def violations(root: Path = ROOT, packages: dict[str, str] = PACKAGES) -> list[str]:
    found = modules(root, packages)
    known = set(found)
    problems = [f"{m}: not in LAYERS (place it in tests/test_layering.py)"
                for m in found if layer(m) is None]
    for name, path in found.items():
        own = layer(name)
        if own is None:
            continue
        for line, target in imports(name, path, known):
            if target not in known:
                problems.append(f"{name}:{line} imports {target}, which is not a module")
                continue
            if target.startswith("sluice.pallas_kernels") != name.startswith(
                    "sluice.pallas_kernels") and own == KERNELS:
                problems.append(f"{name}:{line} (kernels) imports {target}")
            elif layer(target) is not None and layer(target) > own:
                problems.append(f"{name}:{line} (L{own}) imports {target} (L{layer(target)})")
    return problems


def test_every_import_follows_the_layers():
    problems = violations()
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_every_layer_entry_is_a_module():
    """A stale entry (a module deleted or renamed) would hide a missing placement."""
    assert not set(LAYERS) - set(modules())


@pytest.mark.parametrize("source, message", [
    ("from sluice.runtime.server import OpenAIServer\n", "(L1) imports sluice.runtime.server"),
    ("def f():\n    import sluice.scheduler.cluster\n", "(L1) imports sluice.scheduler.cluster"),
    ("from . import server\n", "(L1) imports sluice.runtime.server"),
])
def test_the_check_sees_an_upward_import(tmp_path, source, message):
    """The check itself: an upward edge, also inside a function or relative, is reported;
    so is a module missing from the map."""
    for folder, files in {"runtime": ["config", "server", "brand_new"],
                          "scheduler": ["cluster"]}.items():
        (tmp_path / folder).mkdir()
        for f in files:
            (tmp_path / folder / f"{f}.py").write_text(source if f == "config" else "")
    problems = violations(tmp_path, {"sluice.runtime": "runtime", "sluice.scheduler": "scheduler"})
    assert any(message in p for p in problems), problems
    assert "sluice.runtime.brand_new: not in LAYERS (place it in tests/test_layering.py)" in problems
