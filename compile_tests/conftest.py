"""The compile tier: every kernel and the engine's step compiled for real TPU
and GPU targets on a CPU-only machine (see `targets`).

Run from an accelerator environment (``make compile-test``), never the CPU
``.venv``: ``pytest compile_tests --targets v5e,v6e`` in ``.venv-tpu``,
``--targets h100,h200`` in ``.venv-gpu``, all four in ``.venv-jax012``. A target
whose plugin is missing fails (nothing here is skipped).

Offline by construction: JAX initialises only its CPU backend, and libtpu is
told where it is instead of asking the cloud metadata server (which it does by
default on a machine without TPU chips, and which hangs where the network drops
packets rather than refusing them).
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "JAX_PLATFORMS": "cpu",            # no accelerator runtime; compile-only topologies
    "TPU_SKIP_MDS_QUERY": "1",         # libtpu: no GCE metadata server query
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",  # what the metadata server would have said
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # several processes may compile at once (-n, CI)
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402

from compile_tests.targets import TARGETS  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--targets", default="v5e,v6e,h100,h200",
                     help="comma-separated compile targets: " + ", ".join(TARGETS))


def pytest_generate_tests(metafunc):
    if "target" in metafunc.fixturenames:
        names = [n for n in metafunc.config.getoption("targets").split(",") if n]
        unknown = sorted(set(names) - set(TARGETS))
        if unknown:
            raise pytest.UsageError(f"--targets: unknown {unknown}; choose from {sorted(TARGETS)}")
        metafunc.parametrize("target", [TARGETS[n] for n in names], ids=names)
