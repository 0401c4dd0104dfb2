"""Capacity that follows load: the M/M/c sizing against a simulated queue, and the
replica policy's scale-up / held scale-down."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from sluice.rag.capacity import Capacity, erlang_c, replicas_needed, wait_p95
from sluice.rag.config import PipelineConfig
from sluice.rag.sla import Profile


def test_erlang_c_known_values() -> None:
    assert erlang_c(1, 0.6) == pytest.approx(0.6)  # M/M/1: P(wait) = utilisation
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(3, 3.0) == 1.0  # unstable
    # M/M/1: P(W > t) = rho exp(-(mu - lambda) t)
    assert wait_p95(1, 0.6, 1.0) == pytest.approx(math.log(0.6 / 0.05) / 0.4)
    assert wait_p95(2, 5.0, 1.0) == math.inf
    # Allen-Cunneen: less variable service waits proportionally less
    assert wait_p95(3, 2.4, 1.0, service_cv2=0.25) == pytest.approx(
        wait_p95(3, 2.4, 1.0) * 0.625)


def simulated_waits(servers: int, rate: float, mean_s: float, n: int = 40000,
                    seed: int = 0) -> np.ndarray:
    """FIFO M/M/c: each arrival takes the server free first."""
    rng = random.Random(seed)
    free, t, waits = [0.0] * servers, 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        i = min(range(servers), key=free.__getitem__)
        start = max(t, free[i])
        waits.append(start - t)
        free[i] = start + rng.expovariate(1 / mean_s)
    return np.asarray(waits[n // 10:])


@pytest.mark.parametrize("servers,rate", [(1, 0.7), (3, 2.4), (6, 5.0)])
def test_wait_p95_matches_a_simulated_queue(servers: int, rate: float) -> None:
    sim = np.percentile(simulated_waits(servers, rate, 1.0), 95)
    assert wait_p95(servers, rate, 1.0) == pytest.approx(sim, rel=0.12)


def test_replicas_needed_is_the_fewest_that_fit() -> None:
    rate, mean, p95, bound = 8.0, 0.3, 0.6, 1.0
    c = replicas_needed(rate, mean, p95, bound, margin=0.8)
    assert wait_p95(c, rate, mean) + p95 <= 0.8 * bound
    assert wait_p95(c - 1, rate, mean) + p95 > 0.8 * bound
    assert replicas_needed(2 * rate, mean, p95, bound) > c  # grows with the load
    assert replicas_needed(0.0, mean, p95, bound) == 1
    assert replicas_needed(rate, mean, 2.0, bound, max_replicas=5) == 5  # service alone too slow
    # no latency bound still needs a stable queue: 8/s x 0.3 s = 2.4 servers busy
    assert replicas_needed(rate, mean, p95, math.inf) == 3
    with pytest.raises(ValueError, match="service_mean_s"):
        replicas_needed(rate, 0.0, p95, bound)


def test_capacity_scales_up_at_once_and_down_after_hold() -> None:
    prof = Profile(PipelineConfig("bm25", 1), 0.5, 0.5, 1e-7, 0.25)
    cap = Capacity({"c": 1.0}, window_s=10.0, hold_s=30.0)
    t = 0.0
    for _ in range(200):  # 2 queries/s
        t += 0.5
        cap.arrival("c", t)
    low = cap.wanted("c", t, prof)
    assert cap.rate("c", t) == pytest.approx(2.0, rel=0.06)
    for _ in range(300):  # 10 queries/s: more servers at once
        t += 0.1
        cap.arrival("c", t)
    high = cap.wanted("c", t, prof)
    assert high > low and cap.current("c") == high
    for _ in range(20):  # back to 2/s: no scale-down before hold_s of calm
        t += 0.5
        cap.arrival("c", t)
        assert cap.wanted("c", t, prof) == high
    seen = [high]
    for _ in range(160):  # steps down (to the most needed in each calm period), never up
        t += 0.5
        cap.arrival("c", t)
        seen.append(cap.wanted("c", t, prof))
    assert seen[-1] == low and all(a >= b for a, b in zip(seen, seen[1:]))
    with pytest.raises(ValueError, match="class: unknown 'x'"):
        cap.arrival("x", t)
    with pytest.raises(ValueError, match="capacity"):
        Capacity({"c": 1.0}, margin=0)
