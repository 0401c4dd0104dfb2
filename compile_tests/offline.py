"""Environment for compiling against accelerator plugins on a machine without
accelerators or network; apply before JAX is imported.

JAX initialises only its CPU backend (compile-only topologies need no other),
and libtpu is told where it is instead of asking the cloud metadata server,
which it does by default when it finds no TPU chips and which hangs where the
network drops packets rather than refusing them.
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "JAX_PLATFORMS": "cpu",            # no accelerator runtime; compile-only topologies
    "TPU_SKIP_MDS_QUERY": "1",         # libtpu: no GCE metadata server query
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",  # what the metadata server would have said
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # several processes may compile at once
}


def apply() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
