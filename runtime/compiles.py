"""Counts the XLA compilations of this process, by reason and function, and logs
each with its cause.

A compile while serving stalls the request that caused it (seconds on CPU, see
issue 24), so the runtime aims for none once warmed up. The reason of a compile:

- ``warmup``: on a thread inside `warming_up()` (the model runner's and the
  embedder's warm-ups);
- ``startup``: before the process is `mark_ready` (model loading, KV allocation);
- ``serving``: everything after, i.e. a shape or variant no warm-up covered.

Readiness is the server's: its lifespan calls `mark_ready` once every
instance it starts with has warmed up (a model runner's warm-up does not, since
another instance may still be starting), and a cluster instance launched later
(scale-up, replacement) starts inside `warming_up()`, so its start-up compiles
count as ``warmup`` too. A Ray actor is a process of its own: it counts its
compiles the same way, marks itself ready once its instance has warmed up, and
reports its totals to the driver, which adds them with `add_remote` (per
instance), so the driver's counts cover every process that serves.

`compile_ahead(programs, desc)` is the warm-ups' way to compile: it lowers each
program on the calling thread and compiles it, without running it, on
`compile_threads()` threads (XLA compiles without the GIL), counted as
``warmup``; jit's call path then finds the executables. `after_ready(work)`
runs warm-up work that may wait until the process serves (on a thread of its
own, counted as ``warmup``, started by `mark_ready`).

`install()` (idempotent) registers a ``jax.monitoring`` listener on JAX's
backend-compile event, which jax 0.10.2 through 0.12 record once per executable
built (compiled, or loaded from the persistent compilation cache: either way the
caller waits), with the jitted function's name. `counts()` returns the totals
so far, this process's and the ones reported to it, as ``{(reason, function):
n}`` (`remote(source)`: one reporter's); ``/metrics`` exports them as
``sluice:compiles_total{reason, function}``. Each compile is logged: at DEBUG
during warm-up and start-up, at WARNING while serving, with its duration and
its cause, the innermost Sluice source line on the compiling thread's stack
(e.g. ``runtime/embed.py:45 in mean_pooled``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import threading
import traceback
from typing import Callable, Iterator, Mapping, Sequence

import jax
from tqdm import tqdm

log = logging.getLogger(__name__)

# The event JAX records around each backend compile (jax._src.dispatch.BACKEND_COMPILE_EVENT).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
REASONS = ("warmup", "startup", "serving")

_THIS = os.path.abspath(__file__)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(_THIS))
_lock = threading.Lock()
_counts: collections.Counter[tuple[str, str]] = collections.Counter()
_remote: dict[str, dict[tuple[str, str], int]] = {}  # source -> its latest totals
_local = threading.local()  # .warmup: depth of nested warming_up() on this thread
_state = {"installed": False, "ready": False}
_after_ready: list[Callable[[], None]] = []  # work waiting for `mark_ready`
# Warm-ups compile at most this many programs at once (``$SLUICE_COMPILE_THREADS``
# overrides): each holds its module and the compiler's working memory.
MAX_COMPILE_THREADS = 8


def install() -> None:
    """Start counting (once per process; later calls do nothing)."""
    with _lock:
        if _state["installed"]:
            return
        _state["installed"] = True
    jax.monitoring.register_event_duration_secs_listener(_on_event)


def mark_ready() -> None:
    """From now on, compiles outside `warming_up()` are ``serving`` ones; starts
    the work `after_ready` holds."""
    with _lock:
        _state["ready"] = True
        waiting = list(_after_ready)
        _after_ready.clear()
    for work in waiting:
        _start(work)


def after_ready(work: Callable[[], None]) -> None:
    """Run ``work`` on a daemon thread, counted as warm-up, once the process is
    ready (at once if it is): compiles that may wait until the server answers
    (a model runner's deferred step programs, `ModelRunner.warmup`)."""
    with _lock:
        if not _state["ready"]:
            _after_ready.append(work)
            return
    _start(work)


def _start(work: Callable[[], None]) -> None:
    def run() -> None:
        with warming_up():
            try:
                work()
            except Exception:  # the process serves on without it: say so
                log.exception("deferred warm-up failed")

    threading.Thread(target=run, name="sluice-deferred-warmup", daemon=True).start()


@contextlib.contextmanager
def warming_up() -> Iterator[None]:
    """Compiles on this thread inside the block count as ``warmup``."""
    _local.warmup = getattr(_local, "warmup", 0) + 1
    try:
        yield
    finally:
        _local.warmup -= 1


def compile_threads() -> int:
    """Threads for warm-up compiles: ``$SLUICE_COMPILE_THREADS``, else the CPUs this
    process may run on (not the host's: a container's quota), at most 8 (Ray
    actors sharing a host set it to their share:
    `sluice.scheduler.ray_instance.local_compile_threads`)."""
    env = os.environ.get("SLUICE_COMPILE_THREADS")
    if env is not None:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"SLUICE_COMPILE_THREADS: must be a positive integer, got {env!r}")
        return int(env)
    return max(1, min(MAX_COMPILE_THREADS, len(os.sched_getaffinity(0))))


def compile_ahead(programs: Sequence[Callable[[], jax.stages.Lowered]], desc: str) -> None:
    """Compile every program without running it: each callable lowers one (on this
    thread, in order) and `compile_threads()` threads compile them meanwhile,
    counted as ``warmup``; returns once all are compiled (a compile's error is
    raised here). ``desc`` labels the progress bar."""
    with concurrent.futures.ThreadPoolExecutor(compile_threads()) as pool, \
            tqdm(total=len(programs), desc=desc, unit="program") as bar:
        done = []
        for lower in programs:
            done.append(pool.submit(_compile_warm, lower()))
            done[-1].add_done_callback(lambda _: bar.update())
        for future in done:
            future.result()


def _compile_warm(lowered: jax.stages.Lowered) -> None:
    with warming_up():  # `_local` is per thread: this one's compile is warm-up too
        lowered.compile()


def add_remote(source: str, totals: Mapping[tuple[str, str], int]) -> None:
    """Count another process's compiles (a Ray actor's; ``source``: its instance's
    name, unique in this process) in `counts`. ``totals`` are that process's
    `counts` so far, so each report replaces the previous one from ``source``; a
    source's last report stays after it is gone (its compiles happened, and a
    cumulative metric must never go down)."""
    with _lock:
        _remote[source] = dict(totals)


def remote(source: str) -> dict[tuple[str, str], int]:
    """The totals ``source`` last reported (`add_remote`); {} if none."""
    with _lock:
        return dict(_remote.get(source, {}))


def counts() -> dict[tuple[str, str], int]:
    """Compiles so far, this process's and those reported to it (`add_remote`):
    {(reason, function): count}."""
    with _lock:
        summed = collections.Counter(_counts)
        for totals in _remote.values():
            summed.update(totals)
    return dict(summed)


def total(reason: str) -> int:
    """Compiles so far for one reason, over all functions."""
    return sum(n for (r, _), n in counts().items() if r == reason)


def _reason() -> str:
    if getattr(_local, "warmup", 0):
        return "warmup"
    return "serving" if _state["ready"] else "startup"


def _on_event(event: str, duration: float, **kwargs) -> None:
    if event != COMPILE_EVENT:
        return
    function = str(kwargs.get("fun_name", "unknown"))
    reason = _reason()
    with _lock:
        _counts[reason, function] += 1
    level = logging.WARNING if reason == "serving" else logging.DEBUG
    if log.isEnabledFor(level):
        log.log(level, "compiled %s in %.2f s (%s), caused by %s on thread %s", function,
                duration, reason, _cause(), threading.current_thread().name)


def _cause() -> str:
    """The innermost frame of this package's code (outside this module) on the stack."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path == _THIS or not path.startswith(_PACKAGE_DIR + os.sep):
            continue
        relative = os.path.relpath(path, _PACKAGE_DIR)
        if not relative.startswith("."):  # not a virtual environment in the checkout
            return f"{relative}:{frame.lineno} in {frame.name}"
    return "code outside sluice"
