"""`Health`: whether a front end (one engine, or a cluster of instances) can take
requests. Every front end reports it (``health()``), the server answers ``GET
/health`` from it and `sluice.runtime.metrics` exports it; it lives below all
three so the engine and scheduler layers need not import the metrics module."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Health:
    """Whether the server can take requests: its engines (instances) by state and
    the cumulative counts of what went wrong with them."""

    serving: int  # engines (instances) that take new requests
    draining: int = 0
    dead: int = 0  # died and not (yet) replaced
    deaths: int = 0
    replaced: int = 0
    quarantined: int = 0  # requests failed after instances running them died
    reason: str | None = None  # why nothing serves; None while something does

    @property
    def ok(self) -> bool:
        return self.serving > 0
