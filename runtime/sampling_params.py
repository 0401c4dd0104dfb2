"""Per-request sampling settings, shaped like vLLM's ``SamplingParams``.

Fields and defaults follow vLLM so an OpenAI-style request maps one to one:
``temperature`` (0 = greedy), ``top_p``, ``top_k`` (0 or -1 = off), ``min_p``,
``repetition_penalty`` (HF/vLLM: divides positive logits of seen tokens,
multiplies negative ones), ``presence_penalty`` / ``frequency_penalty`` (OpenAI:
subtracted per generated occurrence), ``seed``, ``max_tokens``, ``stop`` strings,
``stop_token_ids``, ``ignore_eos``, ``logprobs`` (number of top alternatives to
return besides the chosen token; 0 = the chosen token only; None = no logprobs),
``prompt_logprobs`` (vLLM's: the log-probability of every prompt token but the
first, given the tokens before it, with this many top alternatives; None = none;
a request asking for them computes its whole prompt, taking no prefix-cache hit),
``include_stop_str_in_output``, ``skip_special_tokens`` and
``structured_outputs`` (a `StructuredOutputs` constraint, or a dict of its fields:
JSON schema, JSON object, regex, choice or grammar; checked when made, see
`sluice.runtime.structured_output`).

Everything is checked in ``__post_init__``, so a bad request fails when it is
made rather than on the device: the `ValueError` message starts with the field
name (``"top_p: must be in (0, 1], got 0"``). Numbers must be real numbers of the
right kind (a bool is not an int, a string is not a float); float fields accept
ints and store floats. ``stop`` and ``stop_token_ids`` are normalized to lists.

Every numeric field has a range (`RANGES`), chosen so that any accepted value
runs through the sampler, which computes in int32 and float32:

============================ ==================================================
field                        accepted values
============================ ==================================================
``n``                        1 .. 128 (`MAX_N`)
``temperature``              0 .. 3.4028235e38 (float32's largest; < 1e-5 = greedy)
``top_p``                    (0, 1]
``top_k``                    -1 .. 2**31 - 1 (-1 and 0 = off; >= vocabulary = off)
``min_p``                    [0, 1]
``repetition_penalty``       (0, 3.4028235e38]
``presence_penalty``         [-2, 2]
``frequency_penalty``        [-2, 2]
``seed``                     None or -2**63 .. 2**63 - 1 (int64; used modulo 2**32)
``max_tokens``               1 .. 2**31 - 1 (capped by the context left)
``logprobs``                 None or 0 .. 20 (`MAX_LOGPROBS`)
``prompt_logprobs``          None or 0 .. 20 (`MAX_LOGPROBS`)
``stop_token_ids``           each 0 .. 2**31 - 1
============================ ==================================================

NaN, infinities and integers too large for a float (``10**400``) are refused
like any other out-of-range value, never with an ``OverflowError``.
"""

from __future__ import annotations

import dataclasses
import math

from sluice.runtime.structured_output import StructuredOutputs

# vLLM treats temperatures below this as greedy; the sampler uses the same bound.
GREEDY_TEMPERATURE = 1e-5

MAX_LOGPROBS = 20
MAX_N = 128  # completions per request; bounds what one request can ask of the engine
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32


@dataclasses.dataclass(frozen=True)
class Range:
    """The accepted values of one numeric field: ``kind`` (int or float) between
    ``lo`` and ``hi``, each bound included unless ``*_open``; ``optional``: None is
    accepted too."""

    kind: type
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    optional: bool = False

    def __str__(self) -> str:
        def bound(v: float) -> str:
            return str(v) if self.kind is int else f"{v:g}"
        return (f"{'(' if self.lo_open else '['}{bound(self.lo)}, "
                f"{bound(self.hi)}{')' if self.hi_open else ']'}")

    def check(self, name: str, value: object) -> None:
        """Raise ``ValueError`` naming ``name`` unless ``value`` is accepted."""
        if value is None and self.optional:
            return
        kinds = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"{name}: must be {'an int' if self.kind is int else 'a number'}, "
                             f"got {_short(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}: must be finite, got {value!r}")
        # ints compare exactly with the float bounds (no conversion, no OverflowError)
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        if not (above and below):
            raise ValueError(f"{name}: must be in {self}, got {_short(value)}")


RANGES: dict[str, Range] = {
    "n": Range(int, 1, MAX_N),
    "temperature": Range(float, 0.0, FLOAT32_MAX),
    "top_p": Range(float, 0.0, 1.0, lo_open=True),
    "top_k": Range(int, -1, INT32_MAX),
    "min_p": Range(float, 0.0, 1.0),
    "repetition_penalty": Range(float, 0.0, FLOAT32_MAX, lo_open=True),
    "presence_penalty": Range(float, -2.0, 2.0),
    "frequency_penalty": Range(float, -2.0, 2.0),
    "seed": Range(int, INT64_MIN, INT64_MAX, optional=True),
    "max_tokens": Range(int, 1, INT32_MAX),
    "logprobs": Range(int, 0, MAX_LOGPROBS, optional=True),
    "prompt_logprobs": Range(int, 0, MAX_LOGPROBS, optional=True),
}
TOKEN_ID_RANGE = Range(int, 0, INT32_MAX)  # each of ``stop_token_ids``


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
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        for name, rule in RANGES.items():
            value = getattr(self, name)
            rule.check(name, value)
            if rule.kind is float:
                setattr(self, name, float(value))
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be a bool, got {getattr(self, name)!r}")
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _token_ids(self.stop_token_ids)
        self.structured_outputs = _structured_outputs(self.structured_outputs)

    @property
    def is_greedy(self) -> bool:
        """Whether this request takes the argmax (temperature below `GREEDY_TEMPERATURE`)."""
        return self.temperature < GREEDY_TEMPERATURE


def _short(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 4,000-digit int is not echoed)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _structured_outputs(value: object) -> StructuredOutputs | None:
    if value is None or isinstance(value, StructuredOutputs):
        return value
    if isinstance(value, dict):
        return StructuredOutputs.from_dict(value)
    raise ValueError("structured_outputs: must be a StructuredOutputs or a dict, "
                     f"got {_short(value)}")


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
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"stop_token_ids: must be a list of non-negative ints, got {_short(ids)}")
    for i in ids:
        try:
            TOKEN_ID_RANGE.check("stop_token_ids", i)
        except ValueError:
            raise ValueError(f"stop_token_ids: must be a list of ints in {TOKEN_ID_RANGE}, "
                             f"got {_short(i)}") from None
    return list(ids)
