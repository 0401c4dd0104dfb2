"""JAX's persistent compilation cache for Sluice processes.

Every start of an engine compiles its step shapes (tens of seconds for a small
real model on two CPU cores). With the cache on, compiled executables are
written under ``$SLUICE_CACHE_DIR/jax`` (default ``~/.cache/sluice/jax``) and
a later start with the same model, shapes, JAX version and device loads them
instead of compiling. `LLM` and ``sluice serve`` turn it on unless asked not
to (``compile_cache=False``, ``--no-compile-cache``).

The setting is process-wide (JAX has one cache per process) and takes effect
for compilations after the call; it can be called again with another
directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from sluice.runtime.checkpoint import default_cache_dir

log = logging.getLogger(__name__)

# Compilations shorter than this are not worth a disk entry (JAX's own default is 1 s;
# a start compiles many step shapes that each take less on an idle machine).
MIN_COMPILE_SECONDS = 0.2


def enable_compile_cache(directory: str | Path | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at ``directory`` (default
    ``$SLUICE_CACHE_DIR/jax``). Returns the directory, or None when it cannot
    be created (the process then compiles as usual)."""
    path = Path(directory) if directory is not None else default_cache_dir() / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache unavailable (%s); compiling every start", e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
