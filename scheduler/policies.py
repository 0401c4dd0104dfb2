"""Scheduling policies for `sluice.scheduler.local.LocalScheduler`.

A policy orders the waiting queue, names the running request to preempt when
blocks run out, says whether a waiting request may displace a running one
(``outranks``), and is told what each step served (``account``):

- `FCFSPolicy`: arrival order; the latest admitted is preempted first; no
  displacement.
- `PriorityPolicy`: the request ``priority`` field, lower value first (vLLM's
  convention), then arrival; a waiting request displaces a running one of
  strictly worse priority (the scheduler bounds how often one request can be
  displaced). Priorities may change while requests run. Optional aging
  (``aging_s``): a waiting request's effective priority improves by one level
  per ``aging_s`` seconds it has waited (since arrival or its last
  preemption), which bounds how long a preempted or low-priority request
  starves; off by default (strict priority). Optional resume deadline
  (``resume_deadline_s``): a request preempted in mid-generation that has waited
  that long is admitted before anything else (longest-paused first), without
  displacing running requests, which bounds the pause a preemption puts between
  two of its tokens while new requests keep their priority order; once resumed,
  a preempted request is protected from displacement for as long again, so it
  is not bounced out after a token; off by default; 0 resumes such requests
  first at once. ``displace_streaming=False`` never displaces a request that
  has produced a token (it still goes when memory runs out): a displacement
  then costs the victim time to first token, never a pause in its stream,
  which trades some priority responsiveness for the time-between-tokens tail.
- `FairPolicy`: virtual token counters per client (Sheng et al., "Fairness in
  Serving Large Language Models", OSDI 2024): each client's counter grows by
  ``w_in`` per prompt token and ``w_out`` per generated token, divided by the
  client's weight; the waiting request of the least-served client goes first,
  and a client that returns after being idle is lifted to the least counter
  among active clients, so idle time is not banked. It never displaces running
  requests (fairness comes from admission order), which keeps context switches
  to those memory pressure forces.

The options of a policy are stated once, in its options dataclass
(`PriorityOptions`, `FairOptions`): each field's default, validation, help text
and CLI flag (`option`). `EngineConfig` holds one object of each (its
``priority`` and ``fair`` fields, named as in `OPTIONS`), `make_policy` builds
the named policy from its own and refuses another policy's options that are not
at their defaults, and the CLI's flags are generated from the fields.

Every policy reads time from its ``clock`` (``time.monotonic`` unless one is
injected), and the scheduler stamps the times policies compare with it
(``waiting_since``, ``running_since``, the ``now`` of `Policy.protected`), so
tests drive aging and deadlines with a fake clock instead of sleeping.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

from sluice.runtime.request import Request


def option(default: Any, help: str, flag: str | None = None,
           parse: Callable[[str], Any] | None = None, metavar: str | None = None,
           span: int = 1) -> Any:
    """A policy option's field: its ``default`` and ``help``, and the CLI ``flag``
    generated for it, parsed by ``parse`` (which raises ``ValueError`` on bad
    text; a bool default gives a switch that flips it). ``span=n``: the flag sets
    this field and the next ``n - 1`` ones, from the tuple ``parse`` returns
    (``--fair-weights IN,OUT``); those fields take ``flag=None``."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, flag=flag, parse=parse, metavar=metavar, span=span))


def parse_pair(text: str) -> tuple[float, float]:
    """``"A,B"`` -> two floats."""
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"expected two numbers A,B, got {text!r}") from None
    return a, b


def parse_client_weights(text: str) -> dict[str, float]:
    """``"alice=2,bob=0.5"`` -> {client: weight} (a client at most once)."""
    weights = {}
    for item in text.split(","):
        client, sep, weight = item.rpartition("=")
        if client in weights:
            raise ValueError(f"client {client!r} is given twice")
        try:
            weights[client] = float(weight)
        except ValueError:
            sep = ""
        if not sep or not client:
            raise ValueError(f"expected CLIENT=WEIGHT, got {item!r}")
    return weights


@dataclasses.dataclass(frozen=True)
class PriorityOptions:
    resume_deadline_s: float | None = option(
        None, "a request preempted in mid-generation that has waited this long resumes "
        "before new requests, bounding the pause between its tokens (default: strict "
        "priority)", "--resume-deadline", float, "SECONDS")
    aging_s: float | None = option(
        None, "a waiting request gains one priority level per SECONDS waited, bounding "
        "starvation (default: off)", "--priority-aging", float, "SECONDS")
    displace_streaming: bool = option(
        True, "never displace a request that has produced a token (no pause in a stream "
        "for priority's sake)", "--no-displace-streaming")

    def __post_init__(self) -> None:
        if self.aging_s is not None and not (_finite(self.aging_s) and self.aging_s > 0):
            raise ValueError(f"priority.aging_s: must be a number > 0, got {self.aging_s!r}")
        if self.resume_deadline_s is not None and not (_finite(self.resume_deadline_s)
                                                       and self.resume_deadline_s >= 0):
            raise ValueError(f"priority.resume_deadline_s: must be a number >= 0, got "
                             f"{self.resume_deadline_s!r}")
        if not isinstance(self.displace_streaming, bool):
            raise ValueError(f"priority.displace_streaming: must be true or false, got "
                             f"{self.displace_streaming!r}")


@dataclasses.dataclass(frozen=True)
class FairOptions:
    w_in: float = option(1.0, "service counted per prompt token (IN) and per generated "
                         "token (OUT)", "--fair-weights", parse_pair, "IN,OUT", span=2)
    w_out: float = option(2.0, "service counted per generated token")
    weights: dict[str, float] | None = option(
        None, "relative shares of service per client (the request's `user`, else its API "
        "key); unlisted clients: 1", "--client-weights", parse_client_weights, "CLIENT=W,...")

    def __post_init__(self) -> None:
        for field, w in (("w_in", self.w_in), ("w_out", self.w_out)):
            if not _finite(w) or w < 0:
                raise ValueError(f"fair.{field}: must be a finite number >= 0, got {w!r}")
        if self.weights is not None and not isinstance(self.weights, dict):
            raise ValueError(f"fair.weights: must map client names to weights, got "
                             f"{self.weights!r}")
        for client, w in (self.weights or {}).items():
            if not _finite(w) or w <= 0:
                raise ValueError(f"fair.weights: the weight of {client!r} must be a finite "
                                 f"number > 0, got {w!r}")


class Policy:
    """FCFS behaviour; subclasses override what they change."""

    name = "fcfs"
    displaces = False  # whether `outranks` can ever be true (skips the scan when not)
    # the time policies and the scheduler's policy timestamps are read from
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def next_waiting(self, waiting: list[Request]) -> Request:
        """The waiting request to admit next."""
        return waiting[0]

    def victim(self, running: list[Request]) -> Request:
        """The running request to preempt when blocks run out."""
        return running[-1]

    def outranks(self, waiting: Request, running: Request) -> bool:
        """Whether ``waiting`` should displace ``running`` when it cannot be admitted."""
        return False

    def displacer(self, waiting: list[Request]) -> Request:
        """The waiting request displacements are made for (it then takes the room)."""
        return self.next_waiting(waiting)

    def protected(self, running: Request, now: float) -> bool:
        """Whether ``running`` may not be displaced now."""
        return False

    def order(self, running: list[Request]) -> list[Request]:
        """The order running requests get budget and blocks in a step (the most
        important first, so memory pressure preempts the least important)."""
        return running

    def on_add(self, request: Request, active: list[Request]) -> None:
        """A request arrived; ``active`` are the others waiting or running."""

    def account(self, scheduled: list[tuple[Request, int]]) -> None:
        """A step was scheduled: (request, new tokens) pairs."""


class FCFSPolicy(Policy):
    pass


class PriorityPolicy(Policy):
    name = "priority"
    displaces = True

    def __init__(self, clock: Callable[[], float] | None = None, **options: Any):
        """``options``: `PriorityOptions` fields."""
        opts = PriorityOptions(**options)
        self.aging_s = opts.aging_s
        self.resume_deadline_s = opts.resume_deadline_s
        self.displace_streaming = opts.displace_streaming
        if clock is not None:
            self.clock = clock

    def effective(self, request: Request, now: float | None = None) -> float:
        """The priority a waiting request competes with (aged, if aging is on)."""
        if self.aging_s is None or request.waiting_since is None:
            return request.priority
        now = self.clock() if now is None else now
        return request.priority - (now - request.waiting_since) / self.aging_s

    def next_waiting(self, waiting: list[Request]) -> Request:
        now = self.clock()
        overdue = self._overdue(waiting, now)
        if overdue:
            return min(overdue, key=lambda r: r.waiting_since)
        return self._first_by_priority(waiting, now)

    def displacer(self, waiting: list[Request]) -> Request:
        """Priority order: the resume deadline claims free room, never displaces."""
        return self._first_by_priority(waiting, self.clock())

    def _first_by_priority(self, waiting: list[Request], now: float) -> Request:
        return min(waiting, key=lambda r: (self.effective(r, now), r.arrival_time))

    def protected(self, running: Request, now: float) -> bool:
        if not self.displace_streaming and running.output_token_ids:
            return True
        return (self.resume_deadline_s is not None and running.num_preemptions > 0
                and running.running_since is not None
                and now - running.running_since < self.resume_deadline_s)

    def _overdue(self, waiting: list[Request], now: float) -> list[Request]:
        """Preempted mid-generation and paused for at least the resume deadline."""
        if self.resume_deadline_s is None:
            return []
        return [r for r in waiting if r.output_token_ids and r.waiting_since is not None
                and now - r.waiting_since >= self.resume_deadline_s]

    def rank(self, running: Request) -> float:
        """A running request's priority, keeping the aging it was admitted with
        (else an aged request would be displaced right back by the one it displaced)."""
        if running.running_since is None:
            return running.priority
        return self.effective(running, running.running_since)

    def victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: (self.rank(r), r.arrival_time))

    def outranks(self, waiting: Request, running: Request) -> bool:
        return self.effective(waiting) < self.rank(running)

    def order(self, running: list[Request]) -> list[Request]:
        return sorted(running, key=lambda r: (r.priority, r.arrival_time))


class FairPolicy(Policy):
    name = "fair"
    W_IN, W_OUT = FairOptions.w_in, FairOptions.w_out  # default service per token

    def __init__(self, **options: Any):
        """``options``: `FairOptions` fields."""
        opts = FairOptions(**options)
        self.w_in, self.w_out = opts.w_in, opts.w_out
        self.weights = dict(opts.weights or {})
        self.counters: dict[str, float] = {}

    @staticmethod
    def client(request: Request) -> str:
        return request.client or ""

    def counter(self, request: Request) -> float:
        return self.counters.get(self.client(request), 0.0)

    def on_add(self, request: Request, active: list[Request]) -> None:
        me = self.client(request)
        others = {self.client(r) for r in active} - {me}
        if me in {self.client(r) for r in active} or not others:
            self.counters.setdefault(me, 0.0)
            return
        floor = min(self.counters.get(c, 0.0) for c in others)
        self.counters[me] = max(self.counters.get(me, 0.0), floor)

    def next_waiting(self, waiting: list[Request]) -> Request:
        return min(waiting, key=lambda r: (self.counter(r), r.arrival_time))

    def victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: (self.counter(r), r.arrival_time))

    def account(self, scheduled: list[tuple[Request, int]]) -> None:
        for req, n in scheduled:
            cost = 0.0
            if req.first_scheduled_time is None:  # the prompt is charged once
                cost += self.w_in * len(req.prompt_token_ids)
            if req.num_computed_tokens + n == req.num_tokens:  # this step samples a token
                cost += self.w_out
            c = self.client(req)
            self.counters[c] = self.counters.get(c, 0.0) + cost / self.weights.get(c, 1.0)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


POLICIES = {p.name: p for p in (FCFSPolicy, PriorityPolicy, FairPolicy)}


# policy -> its options class; also the `EngineConfig` field that holds them
OPTIONS = {"priority": PriorityOptions, "fair": FairOptions}
Options = PriorityOptions | FairOptions


def changed_options(options: Options) -> list[str]:
    """The fields of ``options`` that are not at their defaults."""
    return [f.name for f in dataclasses.fields(options)
            if getattr(options, f.name) != f.default]


def make_policy(name: str, **options: Options | None) -> Policy:
    """The policy ``name``, given its options object by its `OPTIONS` name
    (``make_policy("fair", fair=FairOptions(...))``); another policy's options
    are refused unless they are at their defaults (they would do nothing)."""
    if name not in POLICIES:
        raise ValueError(f"scheduling_policy: unknown policy {name!r}; "
                         f"choose from {sorted(POLICIES)}")
    for key, value in options.items():
        if key not in OPTIONS:
            raise TypeError(f"make_policy: unknown options {key!r}")
        if value is not None and not isinstance(value, OPTIONS[key]):
            raise ValueError(f"{key}: must be a {OPTIONS[key].__name__}, got {value!r}")
        changed = changed_options(value) if key != name and value is not None else []
        if changed:
            raise ValueError(f"{key}.{changed[0]}: applies to the {key} policy, not {name!r}")
    own = options.get(name)
    kwargs = {f.name: getattr(own, f.name) for f in dataclasses.fields(own)} if own else {}
    return POLICIES[name](**kwargs)
