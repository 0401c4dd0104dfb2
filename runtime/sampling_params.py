"""Per-request sampling settings, shaped like vLLM's ``SamplingParams``.

Fields and defaults follow vLLM so an OpenAI-style request maps one to one:
``temperature`` (0 = greedy), ``top_p``, ``top_k`` (0 or -1 = off), ``min_p``,
``repetition_penalty`` (HF/vLLM: divides positive logits of seen tokens,
multiplies negative ones), ``presence_penalty`` / ``frequency_penalty`` (OpenAI:
subtracted per generated occurrence), ``seed``, ``max_tokens``, ``stop`` strings,
``stop_token_ids``, ``ignore_eos``, ``logprobs`` (number of top alternatives to
return besides the chosen token; 0 = the chosen token only; None = no logprobs),
``include_stop_str_in_output`` and ``skip_special_tokens``.

Everything is checked in ``__post_init__``, so a bad request fails when it is
made rather than on the device: the `ValueError` message starts with the field
name (``"top_p: must be in (0, 1], got 0"``). Numbers must be real numbers of the
right kind (a bool is not an int, a string is not a float); float fields accept
ints and store floats. ``stop`` and ``stop_token_ids`` are normalized to lists.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

# vLLM treats temperatures below this as greedy; the sampler uses the same bound.
GREEDY_TEMPERATURE = 1e-5

MAX_LOGPROBS = 20


@dataclasses.dataclass
class SamplingParams:
    """How to pick the tokens of one request; see the module docstring."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        for name, (ok, rule) in _FLOAT_RULES.items():
            value = getattr(self, name)
            _check_number(name, value, float)
            _require(ok(value), name, rule, value)
            setattr(self, name, float(value))
        for name, (ok, rule) in _INT_RULES.items():
            value = getattr(self, name)
            if value is not None or name != "logprobs":  # logprobs None = none returned
                _check_number(name, value, int)
                _require(ok(value), name, rule, value)
        if self.seed is not None:
            _check_number("seed", self.seed, int)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be a bool, got {getattr(self, name)!r}")
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _token_ids(self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        """Whether this request takes the argmax (temperature below `GREEDY_TEMPERATURE`)."""
        return self.temperature < GREEDY_TEMPERATURE


_FLOAT_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: v >= 0, "must be >= 0"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "min_p": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "must be > 0"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
}
_INT_RULES: dict[str, tuple[Callable[[int], bool], str]] = {
    "n": (lambda v: v >= 1, "must be >= 1"),
    "top_k": (lambda v: v >= -1, "must be -1 (off) or >= 0"),
    "max_tokens": (lambda v: v >= 1, "must be >= 1"),
    "logprobs": (lambda v: 0 <= v <= MAX_LOGPROBS, f"must be in [0, {MAX_LOGPROBS}]"),
}


def _check_number(name: str, value: object, kind: type) -> None:
    """``value`` must be an int (``kind`` int) or a finite int or float (``kind`` float)."""
    kinds = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{name}: must be {'an int' if kind is int else 'a number'}, "
                         f"got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name}: {rule}, got {value!r}")


def _stop_strings(stop: object) -> list[str]:
    if stop is None:
        return []
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) for s in strings):
        raise ValueError(f"stop: must be a string or a list of strings, got {stop!r}")
    if not all(strings):
        raise ValueError(f"stop: stop strings must not be empty, got {stop!r}")
    return list(strings)


def _token_ids(ids: object) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"stop_token_ids: must be a list of non-negative ints, got {ids!r}")
    return list(ids)
