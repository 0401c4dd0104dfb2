"""The accelerator catalog: hardware figures and $/hour of each accelerator type.

Interface:

- ``load_catalog(path=None) -> dict[str, Accelerator]``: the built-in
  ``catalog.json`` (versioned next to this module), with the types of the user's
  file at ``path`` merged over it: a type named in both is replaced field by field
  (so a user file may give only ``price``), a new name adds a type. Raises
  ``CatalogError`` naming the type and field of any missing or bad value.
- ``Accelerator.price(spot) -> float``: $/hour of one chip.

File format (JSON)::

    {"version": 1, "as_of": "YYYY-MM-DD", "note": "...",
     "accelerators": {"NAME": {"kind": "gpu"|"tpu", "memory_gb": 80,
        "memory_bandwidth_gbs": 3350, "bf16_tflops": 989, "interconnect": "NVLink 4",
        "interconnect_gbs": 450, "chips_per_instance": [1, 2, 4, 8],
        "price": {"on_demand": {"usd_per_hour": 11.06, "source": "...", "as_of": "..."},
                  "spot": {...same fields...}}}}}

The built-in prices are list prices as of the file's ``as_of`` date; users
override them with their own file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

BUILTIN = Path(__file__).with_name("catalog.json")
_NUMBERS = ("memory_gb", "memory_bandwidth_gbs", "bf16_tflops", "interconnect_gbs")


class CatalogError(ValueError):
    """A catalog entry is missing a field or has a bad value; the message names both."""


@dataclasses.dataclass(frozen=True)
class Price:
    usd_per_hour: float
    source: str
    as_of: str


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    kind: str
    memory_gb: float
    memory_bandwidth_gbs: float
    bf16_tflops: float
    interconnect: str
    interconnect_gbs: float
    chips_per_instance: tuple[int, ...]
    on_demand: Price
    spot: Price

    def price(self, spot: bool = False) -> float:
        return (self.spot if spot else self.on_demand).usd_per_hour


def load_catalog(path: str | Path | None = None) -> dict[str, Accelerator]:
    raw = _read(BUILTIN)["accelerators"]
    if path is not None:
        user = _read(Path(path))
        if not isinstance(user.get("accelerators"), dict):
            raise CatalogError(f"{path}: accelerators: missing or not an object")
        for name, entry in user["accelerators"].items():
            raw[name] = _merge(raw.get(name, {}), entry) if isinstance(entry, dict) else entry
    return {name: _parse(name, entry) for name, entry in raw.items()}


def _read(path: Path) -> dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: the top level must be an object")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _parse(name: str, e: Any) -> Accelerator:
    if not isinstance(e, dict):
        raise CatalogError(f"accelerator {name!r}: must be an object")
    where = f"accelerator {name!r}"
    if e.get("kind") not in ("gpu", "tpu"):
        raise CatalogError(f"{where}: kind: must be 'gpu' or 'tpu', got {e.get('kind')!r}")
    for field in _NUMBERS:
        _positive(where, field, e.get(field))
    if not isinstance(e.get("interconnect"), str):
        raise CatalogError(f"{where}: interconnect: missing or not a string")
    chips = e.get("chips_per_instance")
    if (not isinstance(chips, list) or not chips
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in chips)):
        raise CatalogError(f"{where}: chips_per_instance: must be a non-empty list of "
                           f"positive integers, got {chips!r}")
    price = e.get("price")
    if not isinstance(price, dict):
        raise CatalogError(f"{where}: price: missing or not an object")
    return Accelerator(name=name, kind=e["kind"],
                       **{f: float(e[f]) for f in _NUMBERS},
                       interconnect=e["interconnect"], chips_per_instance=tuple(sorted(chips)),
                       on_demand=_price(where, "on_demand", price.get("on_demand")),
                       spot=_price(where, "spot", price.get("spot")))


def _price(where: str, which: str, p: Any) -> Price:
    if not isinstance(p, dict):
        raise CatalogError(f"{where}: price.{which}: missing or not an object")
    _positive(where, f"price.{which}.usd_per_hour", p.get("usd_per_hour"))
    for field in ("source", "as_of"):
        if not isinstance(p.get(field), str) or not p[field]:
            raise CatalogError(f"{where}: price.{which}.{field}: missing or not a string")
    return Price(float(p["usd_per_hour"]), p["source"], p["as_of"])


def _positive(where: str, field: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise CatalogError(f"{where}: {field}: must be a positive number, got {v!r}")
