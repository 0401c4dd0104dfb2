"""Roofline step-time model of one serving instance, and its SLO-limited rate.

Interface:

- ``ModelSpec``: what the model costs (parameters, layers, hidden size, KV bytes
  per token); ``MODELS`` holds presets; ``model_spec(name_or_dict)`` resolves one.
- ``Instance(acc, chips, model)``: ``chips`` chips of one catalog type serving the
  model tensor-parallel; ``instances_for(acc, model)`` lists the shapes that hold
  the weights plus ``min_kv_fraction`` of KV space, fewest chips first.
- ``Instance.step_time(decode_seqs, prefill_tokens, context_tokens)``: seconds of
  one continuous-batching engine step.
- ``Instance.fits(input_len, output_len)``: whether one request's KV fits at all.
- ``Instance.max_rate(input_len, output_len, slo)``: the highest request rate whose
  steady state meets the SLO (0.0 when the request does not fit or no rate does).

The model (documented here, used by modelled profiles and by the simulator):

- The efficiencies are per instance (``Instance.bw_eff``, ``flop_eff``,
  ``overhead_s``; defaults ``BW_EFF``, ``FLOP_EFF``, ``STEP_OVERHEAD_S``), so that
  `sluice.provision.calibrate` can fit them to measured profiles.
- Per chip, usable memory = ``MEMORY_FRACTION`` x memory; weights
  (params x bytes_per_param) are split evenly over the chips; the rest is KV pool.
- One engine step runs every running sequence's decode token plus up to
  ``token_budget`` - decodes prompt tokens (chunked prefill). Its time is
  ``overhead_s + decode + prefill + all-reduce``: decode =
  max(bytes / (bw_eff x bandwidth), decode flops / (flop_eff x peak)) with
  bytes = weights + KV of every sequence's context and decode flops = 2 x params
  x decodes + 4 x layers x hidden x context; prefill = (2 x params x prompt
  tokens + 2 x layers x hidden x sum of chunk^2) / (flop_eff x peak), added,
  not overlapped (a prompt chunk is compute-bound and stalls its step's decodes;
  folding it into the max() under-estimates mean TPOT); the all-reduce moves
  2 x layers x tokens x hidden x 2 bytes x 2(chips-1)/chips over the interconnect.
- Steady state at rate r for requests (I, O): with step time t, r x O x t
  sequences decode at once (Little's law) and r x I x t prompt tokens arrive per
  step. TPOT ~ t. The SLO holds at rate r when the step time evaluated at
  t = TPOT target is at most that target, the concurrent sequences fit the KV
  pool and the engine's sequence cap, and the prefill share of the token budget
  stays below 1. TTFT ~ the prefill steps of one prompt plus an M/M/1-like wait
  scaled to the percentile: s + s rho/(1-rho) ln(1/(1-p)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sluice.provision.catalog import Accelerator
from sluice.provision.workload import SLO

MEMORY_FRACTION = 0.9
BW_EFF = 0.8
FLOP_EFF = 0.5
STEP_OVERHEAD_S = 0.002


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    bytes_per_param: float = 2.0
    kv_bytes_per_elem: float = 2.0

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes_per_elem


MODELS = {m.name: m for m in (
    ModelSpec("llama-2-7b", 6.74e9, 32, 4096, 32, 128),
    ModelSpec("llama-3-8b", 8.03e9, 32, 4096, 8, 128),
    ModelSpec("llama-2-13b", 13.0e9, 40, 5120, 40, 128),
    ModelSpec("llama-3-70b", 70.6e9, 80, 8192, 8, 128),
)}


def model_spec(m: str | dict[str, Any] | ModelSpec) -> ModelSpec:
    if isinstance(m, ModelSpec):
        return m
    if isinstance(m, str):
        if m not in MODELS:
            raise ValueError(f"model: unknown preset {m!r} (presets: {', '.join(MODELS)}); "
                             "or give an object with the ModelSpec fields")
        return MODELS[m]
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = set(m) - fields
    if unknown:
        raise ValueError(f"model: unknown fields {sorted(unknown)}")
    try:
        return ModelSpec(**m)
    except TypeError as e:
        raise ValueError(f"model: {e}") from None


@dataclasses.dataclass(frozen=True)
class Instance:
    acc: Accelerator
    chips: int
    model: ModelSpec
    token_budget: int = 2048
    max_seqs: int = 256
    bw_eff: float = BW_EFF  # fraction of peak memory bandwidth a decode step reaches
    flop_eff: float = FLOP_EFF  # fraction of peak bf16 FLOP/s
    overhead_s: float = STEP_OVERHEAD_S  # fixed cost of every engine step

    @property
    def name(self) -> str:
        return self.acc.name if self.chips == 1 else f"{self.acc.name}x{self.chips}"

    def price(self, spot: bool = False) -> float:
        return self.chips * self.acc.price(spot)

    @property
    def kv_pool_bytes(self) -> float:
        usable = MEMORY_FRACTION * self.acc.memory_gb * 1e9 * self.chips
        return max(0.0, usable - self.model.weight_bytes)

    def kv_tokens(self) -> int:
        return int(self.kv_pool_bytes // self.model.kv_bytes_per_token)

    def fits(self, input_len: int, output_len: int) -> bool:
        return input_len + output_len <= self.kv_tokens()

    def step_time(self, decode_seqs: float, prefill_tokens: float, context_tokens: float,
                  prefill_sq: float | None = None) -> float:
        """``context_tokens``: KV tokens read by the decodes; ``prefill_sq``: the sum of
        squared prefill chunk lengths (default: one chunk of ``prefill_tokens``)."""
        m, a = self.model, self.acc
        tokens = decode_seqs + prefill_tokens  # through the all-reduces
        sq = prefill_tokens ** 2 if prefill_sq is None else prefill_sq
        bytes_ = m.weight_bytes + (context_tokens + prefill_tokens) * m.kv_bytes_per_token
        flop_rate = self.flop_eff * a.bf16_tflops * 1e12 * self.chips
        decode_t = max(bytes_ / (self.bw_eff * a.memory_bandwidth_gbs * 1e9 * self.chips),
                       (2 * m.params * decode_seqs + 4 * m.layers * m.hidden * context_tokens)
                       / flop_rate)
        prefill_t = (2 * m.params * prefill_tokens + 2 * m.layers * m.hidden * sq) / flop_rate
        comm_t = 0.0
        if self.chips > 1:
            moved = 2 * m.layers * tokens * m.hidden * 2 * 2 * (self.chips - 1) / self.chips
            comm_t = moved / (a.interconnect_gbs * 1e9)
        return self.overhead_s + decode_t + prefill_t + comm_t

    def _steady(self, rate: float, i: float, o: float, t: float) -> tuple[float, float, float]:
        """(step time, concurrent decodes, prefill share of the budget) at rate and step t."""
        seqs = rate * o * t
        prefill = rate * i * t
        ctx = seqs * (i + o / 2)
        share = prefill / max(self.token_budget - seqs, 1e-9)
        chunk = min(i, self.token_budget)
        return self.step_time(seqs, prefill, ctx, prefill_sq=prefill * chunk), seqs, share

    def meets(self, rate: float, input_len: float, output_len: float, slo: SLO) -> bool:
        i, o = float(input_len), float(output_len)
        t = slo.tpot if slo.tpot is not None else self._unloaded_tpot(i, o) * 4
        step, seqs, share = self._steady(rate, i, o, t)
        seq_cap = min(self.max_seqs, self.kv_tokens() / (i + o))
        if step > t or seqs > seq_cap or share >= 1:
            return False
        if slo.ttft is not None:
            return self.ttft(rate, i, o, step, share, slo.ttft_pct) <= slo.ttft
        return True

    def ttft(self, rate: float, i: float, o: float, step: float, share: float,
             pct: float | None) -> float:
        steps = math.ceil(i / max(self.token_budget - rate * o * step, 1.0))
        service = steps * step
        wait = service * share / (1 - share)
        return service + wait * (1.0 if pct is None else math.log(1 / (1 - pct / 100)))

    def _unloaded_tpot(self, i: float, o: float) -> float:
        return self.step_time(1, 0, i + o / 2)

    def max_rate(self, input_len: float, output_len: float, slo: SLO,
                 max_input_len: int | None = None, max_output_len: int | None = None) -> float:
        """Bisection on the rate; memory feasibility uses the ``max_*`` lengths if given."""
        if not self.fits(max_input_len or math.ceil(input_len),
                         max_output_len or math.ceil(output_len)):
            return 0.0
        if not self.meets(1e-6, input_len, output_len, slo):
            return 0.0
        lo, hi = 1e-6, 1.0
        while self.meets(hi, input_len, output_len, slo):
            lo, hi = hi, hi * 2
            if hi > 1e6:
                return lo
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.meets(mid, input_len, output_len, slo) else (lo, mid)
        return lo


def instances_for(acc: Accelerator, model: ModelSpec, min_kv_fraction: float = 0.1,
                  **fields: float) -> list[Instance]:
    """The shapes of ``acc`` (fewest chips first) whose KV pool is at least
    ``min_kv_fraction`` of usable memory once the weights are loaded. ``fields``:
    other `Instance` fields (engine limits, efficiencies)."""
    out = []
    for chips in acc.chips_per_instance:
        inst = Instance(acc, chips, model, **fields)
        usable = MEMORY_FRACTION * acc.memory_gb * 1e9 * chips
        if inst.kv_pool_bytes >= min_kv_fraction * usable:
            out.append(inst)
    return out
