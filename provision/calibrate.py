"""Calibrating the roofline model by measured profiles.

Modelled profiles assume fixed efficiencies (`sluice.provision.perfmodel`:
``BW_EFF`` of peak memory bandwidth, ``FLOP_EFF`` of peak FLOP/s,
``STEP_OVERHEAD_S`` per engine step). A measured profile of a catalog type shows
what that hardware really reaches with Sluice on it, so where one exists the
model's efficiencies are fitted to it, and every type is then re-modelled with
the fitted values: a measurement on one GPU corrects the estimate for all of
them (the software's efficiency transfers better than raw peak figures do).

Interface:

- ``Calibration(bw_eff, flop_eff, overhead_s, error, buckets, measured)``: fitted
  values, the RMS error in log(rate) over the ``buckets`` measured buckets used,
  and the measured types they came from. ``tuning`` is the `Instance` fields.
- ``fit(instance, measured, buckets, slo) -> Calibration``: the efficiencies that
  make ``instance``'s modelled max rates match ``measured.tputs`` (least squares
  in log rate over the buckets measured above 0; Nelder-Mead in log space,
  efficiencies capped at 1). A measured rate is the last one that passed, a lower
  bound on the true one, so the fit errs on the safe side.
- ``combine(calibrations) -> Calibration``: geometric means, for several
  measured types.
- ``calibrate(catalog, model, buckets, slo, profiles, spot=False, types=None)
  -> (profiles, calibration | None)``: modelled profiles re-fitted to the
  ``measured`` profiles among ``profiles`` whose names are catalog instances
  (``NAME`` or ``NAMExCHIPS``), labelled ``calibrated``; plain ``modelled``
  ones, and None, when there is nothing to fit to.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy.optimize import minimize

from sluice.provision.catalog import Accelerator
from sluice.provision.perfmodel import Instance, ModelSpec
from sluice.provision.profiles import TypeProfile, modelled_profiles
from sluice.provision.workload import SLO, Buckets

_BOUNDS = {"bw_eff": (1e-4, 1.0), "flop_eff": (1e-4, 1.0), "overhead_s": (1e-6, 10.0)}


@dataclasses.dataclass(frozen=True)
class Calibration:
    bw_eff: float
    flop_eff: float
    overhead_s: float
    error: float
    buckets: int
    measured: tuple[str, ...]

    @property
    def tuning(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in _BOUNDS}

    def __str__(self) -> str:
        return (f"calibrated from {', '.join(self.measured)} (measured): bandwidth efficiency "
                f"{self.bw_eff:.3g}, FLOP efficiency {self.flop_eff:.3g}, step overhead "
                f"{self.overhead_s * 1e3:.3g} ms; RMS log-rate error {self.error:.3f} over "
                f"{self.buckets} buckets")


def _with(instance: Instance, x: np.ndarray) -> Instance:
    values = {name: float(np.clip(math.exp(v), *_BOUNDS[name])) for name, v in zip(_BOUNDS, x)}
    return dataclasses.replace(instance, **values)


def fit(instance: Instance, measured: TypeProfile, buckets: Buckets, slo: SLO) -> Calibration:
    cells = [c for c in np.ndindex(*buckets.shape) if measured.tputs[c] > 0]
    if not cells:
        raise ValueError(f"profile {measured.name!r}: no bucket has a measured rate above 0; "
                         "nothing to calibrate from")
    target = np.log([measured.tputs[c] for c in cells])

    def rates(x: np.ndarray) -> np.ndarray:
        inst = _with(instance, x)
        return np.array([inst.max_rate(*buckets.representative(*c), slo, *buckets.upper(*c))
                         for c in cells])

    def errors(x: np.ndarray) -> np.ndarray:
        # A bucket the model cannot serve at all counts as a 1000x miss, not -inf.
        return np.log(np.maximum(rates(x), np.exp(target) * 1e-3)) - target

    x0 = np.log([getattr(instance, name) for name in _BOUNDS])
    res = minimize(lambda x: float(np.mean(errors(x) ** 2)), x0, method="Nelder-Mead",
                   options={"xatol": 1e-3, "fatol": 1e-5, "maxfev": 400})
    unserved = [buckets.label(*c) for c, r in zip(cells, rates(res.x)) if r == 0]
    if unserved:
        raise ValueError(f"profile {measured.name!r}: measured rates in {', '.join(unserved)}, "
                         f"but {instance.name} cannot serve them with any efficiency (memory "
                         "or SLO); is the profile named after the right type and chip count?")
    best = _with(instance, res.x)
    return Calibration(best.bw_eff, best.flop_eff, best.overhead_s,
                       float(np.sqrt(np.mean(errors(res.x) ** 2))), len(cells), (measured.name,))


def combine(calibrations: Sequence[Calibration]) -> Calibration:
    if not calibrations:
        raise ValueError("combine: no calibrations")
    geo = {name: float(np.exp(np.mean([math.log(getattr(c, name)) for c in calibrations])))
           for name in _BOUNDS}
    weights = [c.buckets for c in calibrations]
    error = float(np.sqrt(np.average([c.error ** 2 for c in calibrations], weights=weights)))
    return Calibration(**geo, error=error, buckets=sum(weights),
                       measured=tuple(m for c in calibrations for m in c.measured))


def instance_named(catalog: dict[str, Accelerator], model: ModelSpec, name: str) -> Instance | None:
    """The catalog instance a profile name denotes (``NAME`` or ``NAMExCHIPS``), if any."""
    if name in catalog:
        return Instance(catalog[name], 1, model)
    base, sep, chips = name.rpartition("x")
    if sep and base in catalog and chips.isdigit():
        return Instance(catalog[base], int(chips), model)
    return None


def calibrate(catalog: dict[str, Accelerator], model: ModelSpec, buckets: Buckets, slo: SLO,
              profiles: Sequence[TypeProfile], spot: bool = False,
              types: Sequence[str] | None = None
              ) -> tuple[list[TypeProfile], Calibration | None]:
    fits = []
    for p in profiles:
        inst = instance_named(catalog, model, p.name) if p.source == "measured" else None
        if inst is not None and (p.tputs > 0).any():
            fits.append(fit(inst, p, buckets, slo))
    if not fits:
        return modelled_profiles(catalog, model, buckets, slo, spot, types), None
    cal = combine(fits)
    return modelled_profiles(catalog, model, buckets, slo, spot, types, tuning=cal.tuning,
                             source="calibrated"), cal
