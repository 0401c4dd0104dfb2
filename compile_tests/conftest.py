"""The compile tier: every kernel and the engine's step compiled for real TPU
and GPU targets on a CPU-only machine (see `targets`).

Run from an accelerator environment (``make compile-test``), never the CPU
``.venv``: ``pytest compile_tests --targets v5e,v6e`` in ``.venv-tpu``,
``--targets h100,h200`` in ``.venv-gpu``, all four in ``.venv-jax012``. A target
whose plugin is missing fails (nothing here is skipped).

Offline by construction (`offline`): JAX initialises only its CPU backend and
libtpu does not query the cloud metadata server.
"""

from __future__ import annotations

from compile_tests import offline

offline.apply()

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
