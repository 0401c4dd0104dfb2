"""RAG benchmark (issue 9): retrieval quality, answer quality, per-configuration latency and
cost, and SLO attainment of the dynamic re-orchestration policy vs static configurations.

Run from the repository root::

    .venv/bin/python bench/rag.py            # full run
    .venv/bin/python bench/rag.py --quick    # smaller sample, fewer configurations
    .venv/bin/python bench/rag.py --generator /path/to/checkpoint   # also generative answers

Parts:

1. Retrieval: recall@1/5/10 and MRR of the ``bm25``, ``dense`` and ``hybrid`` retrievers on
   every answerable question of ``bench/data/squad2-dev-subset.json``.
2. Answers: exact match / token F1 of the extractive answerer (and, with ``--generator M``,
   of answerer agents generating with model ``M`` served by Sluice: a checkpoint directory
   or a built-in name; one agent, and extractive + two generative agents with a judge) on a
   fixed sample of answerable questions (every n-th in id order) for a set of pipeline
   configurations, each measured
   with ``sluice.rag.profiling.measure`` after the embedder's JIT shapes are compiled
   (``warm_up``), giving each configuration's measured p95 latency and mean cost.
3. SLO attainment: a DISCRETE-EVENT SIMULATION driven by the measured service times. Queries
   arrive as Poisson streams, one per query class (``DEFAULT_CLASSES`` of the RAG service,
   class mix from the intent classifier on the sample); each class has its own FIFO queue over
   a pool of servers. The arrival rate doubles half way through. A query's service time and
   cost are drawn from the measured per-query samples of the configuration it runs.
   Policies: dynamic = the ``ReOrchestrator`` (configuration) plus ``sluice.rag.capacity``
   (servers per class follow the arrival rate; a new server serves ``STARTUP_S`` after it is
   asked for), and every measured configuration used statically for all classes on the
   fewest fixed servers per class (1 to ``MAX_STATIC_SERVERS``) that meet all SLOs. Cost:
   mean $ per query (the per-query price of ``sluice.rag.cost``) and server-seconds
   provisioned (idle time included). Same random numbers for every policy.

4. Plain documents (issue 23; ``--documents-run`` runs only this part): the subset's
   passages written as one ``.txt`` file each, labels hidden, through ``sluice rag
   build-index``'s defaults (``sluice.rag.build.build_index``): its wall time (goal: under
   3 minutes on the 2-core machine); the unlabelled quality estimate (questions generated
   from the passages, ``sluice.rag.synthetic``) of every default configuration against the
   labelled one (the SQuAD questions of the same passages): Spearman's rho of the two
   rankings (goal >= 0.8), for the build's own profiles and for a larger sample of
   ``--docs-questions``; and the extractive EM/F1 on the labelled sample of every
   configuration (with ``--quick``: of ``BEFORE_AFTER``) with today's answerer and with the
   one before issue 23 (sub-spans, no lexical term), measured in the same run. With it, the
   noise of the agreement (``rank_noise``: the labelled ranking's split-half rho, and a
   bootstrap of rho) and how much each question set echoes its answer's sentence
   (``content_overlap``).

Writes ``bench/results/rag.json``, ``bench/results/rag_pareto.png`` and
``bench/results/rag_slo.png``; the plain-documents part writes
``bench/results/rag_documents.json``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent

import jax  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scipy.stats import spearmanr  # noqa: E402

from sluice.rag.agents import ExtractiveAnswerer  # noqa: E402
from sluice.rag.build import build_index  # noqa: E402
from sluice.rag.capacity import Capacity  # noqa: E402
from sluice.rag.profiling import default_configs, measure_all, sample_questions  # noqa: E402
from sluice.rag.synthetic import generate_questions  # noqa: E402
from sluice.rag.text import content_terms, sentences  # noqa: E402
from sluice.rag.config import EXTRACTIVE, PipelineConfig  # noqa: E402
from sluice.rag.corpus import LabelledQuestion, load_squad  # noqa: E402
from sluice.rag.cost import MINILM, CostModel, ModelTier, spec_from_config  # noqa: E402
from sluice.rag.embedder import Embedder  # noqa: E402
from sluice.rag.generation import LLMGenerator  # noqa: E402
from sluice.rag.index import RETRIEVERS, RetrievalIndex  # noqa: E402
from sluice.rag.intent import IntentClassifier  # noqa: E402
from sluice.rag.pipeline import RagPipeline  # noqa: E402
from sluice.rag.profiling import Measurement, measure, warm_up  # noqa: E402
from sluice.rag.retrieval import evaluate  # noqa: E402
from sluice.rag.service import DEFAULT_CLASSES  # noqa: E402
from sluice.runtime.llm import LLM  # noqa: E402
from sluice.rag.sla import Planner, Profile, QueryClass, ReOrchestrator, pareto_front  # noqa: E402

DATA = ROOT / "data" / "squad2-dev-subset.json"
RESULTS = ROOT / "results"
UTILISATION = 0.6      # each class's planned configuration's server load before the swing
ATTAINMENT_TARGET = 0.99
RECALL5_TARGET = 0.9
BIN_S = 10.0           # width of the attainment-over-time bins
STARTUP_S = 5.0        # a server added by the capacity policy serves this long after asked
MAX_STATIC_SERVERS = 8  # static configurations try 1..8 fixed servers per class


def candidate_configs(quick: bool, generator: str | None = None) -> list[PipelineConfig]:
    """The configurations profiled: cheap one-passage lookups up to reranked multi-agent,
    plus generative answerers when a generator tier is served."""
    vote3 = (EXTRACTIVE,) * 3
    configs = [PipelineConfig("bm25", 1), PipelineConfig("dense", 1),
               PipelineConfig("hybrid", 1), PipelineConfig("bm25", 3),
               PipelineConfig("hybrid", 3, True), PipelineConfig("hybrid", 5, True, vote3, 32,
                                                                  "vote")]
    configs = configs[::2] + configs[-1:] if quick else configs
    if generator is not None:
        configs += [PipelineConfig("hybrid", 3, False, (generator,), 16),
                    PipelineConfig("hybrid", 3, False, (EXTRACTIVE, generator, generator), 16,
                                   "judge")]
    return configs


def generator_tier(model: str) -> tuple[str, LLMGenerator, ModelTier]:
    """A Sluice-served generative answerer tier for ``model`` (path or built-in name)."""
    llm = LLM(model, max_model_len=1024)
    name = Path(model).name or model
    return name, LLMGenerator(llm), ModelTier(name, spec_from_config(name, llm.engine.model.config))


# --- 1. retrieval ---------------------------------------------------------------------------

def retrieval_metrics(index: RetrievalIndex,
                      questions: list[LabelledQuestion]) -> dict[str, dict[str, float]]:
    """recall@1/5/10 and MRR per retriever over ``questions``."""
    return {name: evaluate(index.retriever(name), questions, (1, 5, 10)) for name in RETRIEVERS}


# --- 2. answers, latency, cost --------------------------------------------------------------

def profile_configs(pipeline: RagPipeline, configs: list[PipelineConfig],
                    sample: list[LabelledQuestion]) -> list[Measurement]:
    """Measure every configuration on ``sample`` (one unmeasured warm-up query each)."""
    out = []
    for config in configs:
        pipeline.run_sync(sample[0].question, config)
        start = time.perf_counter()
        m = measure(pipeline, config, sample)
        print(f"  {config.name:32s} EM {m.exact_match:.3f} F1 {m.f1:.3f} "
              f"p95 {m.profile.latency_p95_s * 1e3:7.1f} ms  cost {m.profile.cost_usd:.3e} $ "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
        out.append(m)
    return out


# --- 3. discrete-event simulation -----------------------------------------------------------

@dataclass
class SimQuery:
    cls: str
    arrival: float
    u: float               # uniform draw that picks the service-time/cost sample
    latency: float = 0.0
    cost: float = 0.0
    config: str = ""


def arrivals(rates: dict[str, float], seconds: float, seed: int) -> list[SimQuery]:
    """Poisson arrivals per class at ``rates`` for the first half, doubled for the second."""
    rng = np.random.default_rng(seed)
    queries = []
    for cls, rate in rates.items():
        t = 0.0
        while True:
            t += rng.exponential(1.0 / (rate if t < seconds / 2 else 2 * rate))
            if t >= seconds:
                break
            queries.append(SimQuery(cls, t, float(rng.random())))
    return sorted(queries, key=lambda q: q.arrival)


def draw(measurement: Measurement, u: float) -> tuple[float, float]:
    """A measured (service time, cost) pair of one query, picked by ``u`` in [0, 1)."""
    i = min(int(u * len(measurement.latencies_s)), len(measurement.latencies_s) - 1)
    return measurement.latencies_s[i], measurement.costs_usd[i]


def simulate_class(queries: list[SimQuery], policy: ReOrchestrator | Profile,
                   by_name: dict[str, Measurement], servers: int = 1,
                   capacity: Capacity | None = None) -> float:
    """One class's FIFO queue over a pool of servers (each query goes to the server free
    first); fills each query's latency, cost and config and returns the server-seconds
    provisioned. A dynamic policy is told of every completion and consulted on every
    arrival; with ``capacity`` the pool follows its replica count (a new server takes
    ``STARTUP_S`` to come up, and is paid for from the moment it is asked for; only idle
    servers are removed)."""
    dynamic = isinstance(policy, ReOrchestrator)
    pool = [0.0] * servers         # when each server is next free
    born = [0.0] * servers         # when each server was asked for
    server_s, in_system = 0.0, []  # heap of (finish time, latency) of unfinished queries
    for q in queries:
        while in_system and in_system[0][0] <= q.arrival:
            _, latency = heapq.heappop(in_system)
            if dynamic:
                policy.observe(q.cls, latency, len(in_system), _serving(born, q.arrival))
        if dynamic:
            policy.update(q.cls, len(in_system), _serving(born, q.arrival))
        profile = policy.profile_for(q.cls) if dynamic else policy
        if capacity is not None:
            capacity.arrival(q.cls, q.arrival)
            server_s += _resize(pool, born, capacity.wanted(q.cls, q.arrival, profile), q.arrival)
        service, q.cost = draw(by_name[profile.config.name], q.u)
        i = int(np.argmin(pool))
        pool[i] = max(q.arrival, pool[i]) + service
        q.latency, q.config = pool[i] - q.arrival, profile.config.name
        heapq.heappush(in_system, (pool[i], q.latency))
    end = max(pool + [q.arrival for q in queries[-1:]])
    return server_s + sum(end - b for b in born)


def _serving(born: list[float], now: float) -> int:
    """Servers up by ``now`` (the initial ones, born at 0, are up from the start;
    servers still starting do not count)."""
    return max(1, sum(b == 0.0 or b + STARTUP_S <= now for b in born))


def _resize(pool: list[float], born: list[float], wanted: int, now: float) -> float:
    """Grow the pool to ``wanted`` or shrink it by its idle servers; returns the
    server-seconds of the servers removed."""
    while len(pool) < wanted:
        pool.append(now + STARTUP_S)
        born.append(now)
    idle = [i for i in range(len(pool)) if pool[i] <= now]
    drop = set(idle[:max(0, len(pool) - wanted)])
    pool[:] = [t for i, t in enumerate(pool) if i not in drop]
    removed = sum(now - born[i] for i in drop)
    born[:] = [b for i, b in enumerate(born) if i not in drop]
    return removed


def run_policy(queries: list[SimQuery], policy_factory, classes: dict[str, QueryClass],
               by_name: dict[str, Measurement], servers: int = 1,
               capacity_factory=None) -> tuple[list[SimQuery], float]:
    """Simulate every class's queue under a fresh policy; returns copies of the queries
    and the server-seconds of all classes."""
    policy = policy_factory()
    capacity = capacity_factory() if capacity_factory else None
    done, server_s = [], 0.0
    for cls in classes:
        own = [SimQuery(q.cls, q.arrival, q.u) for q in queries if q.cls == cls]
        server_s += simulate_class(own, policy, by_name, servers, capacity)
        done.extend(own)
    return sorted(done, key=lambda q: q.arrival), server_s


def summarise(classes: dict[str, QueryClass], seconds: float, queries: list[SimQuery],
              server_s: float) -> dict:
    """Attainment overall / per class / per half / per time bin, mean cost, configs used,
    server-seconds provisioned."""
    def met(q: SimQuery) -> bool:
        return q.latency <= classes[q.cls].slo.latency_p95_s

    def frac(qs: list[SimQuery]) -> float | None:
        return sum(map(met, qs)) / len(qs) if qs else None

    bins = np.arange(0.0, seconds, BIN_S)
    per_class = {}
    for cls in classes:
        own = [q for q in queries if q.cls == cls]
        per_class[cls] = {"queries": len(own), "attainment": frac(own),
                          "latency_p95_s": float(np.percentile([q.latency for q in own], 95)),
                          "mean_cost_usd": float(np.mean([q.cost for q in own]))}
    used: dict[str, int] = {}
    for q in queries:
        used[q.config] = used.get(q.config, 0) + 1
    return {"queries": len(queries), "attainment": frac(queries),
            "attainment_first_half": frac([q for q in queries if q.arrival < seconds / 2]),
            "attainment_second_half": frac([q for q in queries if q.arrival >= seconds / 2]),
            "mean_cost_usd": float(np.mean([q.cost for q in queries])),
            "server_seconds": server_s, "mean_servers": server_s / seconds,
            "per_class": per_class, "configs_used": used,
            "attainment_over_time": [frac([q for q in queries if b <= q.arrival < b + BIN_S])
                                     for b in bins]}


def class_rates(planner: Planner, classes: dict[str, QueryClass], mix: dict[str, float],
                by_name: dict[str, Measurement]) -> dict[str, float]:
    """Per-class base arrival rate: the class's planned configuration at ``UTILISATION``
    (from its measured mean service time), then scaled so the class mix matches ``mix``."""
    service = {c: by_name[planner.choose(classes[c].slo).config.name].profile.latency_mean_s
               for c in classes}
    # The class whose queue saturates first sets the total rate.
    total = min(UTILISATION / (service[c] * mix[c]) for c in classes if mix[c] > 0)
    return {c: total * mix[c] for c in classes if mix[c] > 0}


def meets_quality_cost(profile: Profile, classes: dict[str, QueryClass]) -> bool:
    return all(profile.quality >= c.slo.min_quality and profile.cost_usd <= c.slo.max_cost
               for c in classes.values())


def slo_simulation(measurements: list[Measurement], classes: dict[str, QueryClass],
                   mix: dict[str, float], seconds: float, seed: int) -> dict:
    """Dynamic (configuration + capacity) vs every static configuration, each on the fewest
    fixed servers per class that meet all SLOs (up to ``MAX_STATIC_SERVERS``), under the
    doubling load (simulated)."""
    by_name = {m.profile.config.name: m for m in measurements}
    planner = Planner([m.profile for m in measurements])
    rates = class_rates(planner, classes, mix, by_name)
    classes = {c: classes[c] for c in rates}
    queries = arrivals(rates, seconds, seed)
    bounds = {c: classes[c].slo.latency_p95_s for c in classes}
    dynamic = summarise(classes, seconds, *run_policy(
        queries, lambda: ReOrchestrator(planner, classes), classes, by_name,
        capacity_factory=lambda: Capacity(bounds)))
    static = {}
    for m in measurements:
        for servers in range(1, MAX_STATIC_SERVERS + 1):
            s = summarise(classes, seconds, *run_policy(queries, lambda m=m: m.profile,
                                                        classes, by_name, servers))
            s["servers_per_class"] = servers
            s["meets_quality_and_cost"] = meets_quality_cost(m.profile, classes)
            s["meets_all_slos"] = s["meets_quality_and_cost"] and all(
                pc["attainment"] >= ATTAINMENT_TARGET for pc in s["per_class"].values())
            if s["meets_all_slos"] or not s["meets_quality_and_cost"]:
                break  # more servers cannot fix quality or cost
        static[m.profile.config.name] = s
    ok = [n for n, s in static.items() if s["meets_all_slos"]]
    cheapest = min(ok, key=lambda n: (static[n]["mean_cost_usd"], static[n]["server_seconds"])
                   ) if ok else None
    return {"kind": "discrete-event simulation driven by measured per-query service times "
                    "and costs (not live serving)",
            "seconds": seconds, "seed": seed, "base_rates_qps": rates,
            "load": "Poisson per class, rate doubles at t = seconds / 2",
            "utilisation_before_swing": UTILISATION, "server_startup_s": STARTUP_S,
            "planned": {c: planner.choose(classes[c].slo).config.name for c in classes},
            "classes": {c: {"slo": classes[c].slo.to_dict(), "mix": mix[c]} for c in classes},
            "dynamic": dynamic, "static": static, "cheapest_static_meeting_all_slos": cheapest}


# --- plots ----------------------------------------------------------------------------------

def plot_pareto(measurements: list[Measurement], path: Path) -> None:
    """Latency p95 vs cost per configuration, colour = F1; the Pareto front ringed."""
    profiles = [m.profile for m in measurements]
    front = {p.config.name for p in pareto_front(profiles)}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sc = ax.scatter([p.latency_p95_s * 1e3 for p in profiles], [p.cost_usd for p in profiles],
                    c=[p.quality for p in profiles], cmap="viridis", s=70, zorder=3)
    for p in profiles:
        if p.config.name in front:
            ax.scatter(p.latency_p95_s * 1e3, p.cost_usd, s=200, facecolors="none",
                       edgecolors="red", zorder=4)
        ax.annotate(f"{p.config.name}\nF1 {p.quality:.2f}", (p.latency_p95_s * 1e3, p.cost_usd),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    fig.colorbar(sc, label="F1 (quality)")
    ax.set_xlabel("p95 latency (ms, measured, unloaded)")
    ax.set_ylabel("mean cost per query ($)")
    ax.set_title("Quality-cost-latency of RAG configurations (red ring: Pareto front)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attainment(sim: dict, path: Path) -> None:
    """Fraction of queries meeting their latency SLO per time bin: dynamic vs static."""
    fig, ax = plt.subplots(figsize=(9, 5))
    bins = np.arange(len(sim["dynamic"]["attainment_over_time"])) * BIN_S
    shown = {sim["cheapest_static_meeting_all_slos"], *sim["planned"].values()} - {None}
    d = sim["dynamic"]
    ax.plot(bins, d["attainment_over_time"], lw=2.5, color="black",
            label=f"dynamic (ReOrchestrator + capacity), cost {d['mean_cost_usd']:.2e} $/q, "
                  f"{d['mean_servers']:.1f} servers")
    for name in sorted(shown):
        s = sim["static"][name]
        ax.plot(bins, s["attainment_over_time"], lw=1.2, alpha=0.8,
                label=f"static {name} x{s['servers_per_class']}/class, cost "
                      f"{s['mean_cost_usd']:.2e} $/q, {s['mean_servers']:.1f} servers")
    ax.axvline(sim["seconds"] / 2, ls="--", color="grey", label="arrival rate doubles")
    ax.axhline(ATTAINMENT_TARGET, ls=":", color="red", label="99% target")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel(f"fraction meeting class latency SLO ({BIN_S:g} s bins)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("SLO attainment under a load swing (simulation, measured service times)")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- 4. plain documents ---------------------------------------------------------------------

def write_documents(corpus, folder: Path) -> None:
    """One .txt file per passage (the text only: no questions, no answers)."""
    for p in corpus.passages:
        (folder / (re.sub(r"[^A-Za-z0-9_.-]", "_", p.id) + ".txt")).write_text(p.text)


def rho(a: dict[str, float], b: dict[str, float]) -> float:
    names = sorted(set(a) & set(b))
    return float(spearmanr([a[n] for n in names], [b[n] for n in names]).statistic)


NOISE_DRAWS = 200


def rank_noise(unlabelled: list[Measurement], labelled: list[Measurement],
               seed: int = 0) -> dict:
    """How much of the rank agreement the question samples allow: the labelled ranking
    against itself over random halves of its questions (split-half rho), and rho of the
    two rankings with both question sets resampled (bootstrap); 5/50/95th percentiles."""
    rng = np.random.default_rng(seed)
    u = {m.profile.config.name: m.f1s for m in unlabelled}
    lab = {m.profile.config.name: m.f1s for m in labelled}
    names = sorted(lab)
    U, L = np.array([u[n] for n in names]), np.array([lab[n] for n in names])
    halves, boot = [], []
    for _ in range(NOISE_DRAWS):
        perm = rng.permutation(L.shape[1])
        half = L.shape[1] // 2
        halves.append(spearmanr(L[:, perm[:half]].mean(1), L[:, perm[half:]].mean(1)).statistic)
        boot.append(spearmanr(U[:, rng.integers(0, U.shape[1], U.shape[1])].mean(1),
                              L[:, rng.integers(0, L.shape[1], L.shape[1])].mean(1)).statistic)
    return {"draws": NOISE_DRAWS,
            "labelled_split_half_rho_5_50_95": _percentiles(halves),
            "bootstrap_rho_5_50_95": _percentiles(boot)}


def _percentiles(values: list[float]) -> list[float]:
    return [round(float(x), 3) for x in np.percentile(values, [5, 50, 95])]


def content_overlap(questions: list[LabelledQuestion], corpus) -> dict[str, float]:
    """How much questions echo their source: the mean count of a question's content words
    (``content_terms``) and of those in the first sentence of its passage that holds its
    answer, and the share."""
    texts = {p.id: p.text for p in corpus.passages}
    terms, shared = [], []
    for q in questions:
        where = [s for s in sentences(texts[q.passage_id]) if q.answers[0] in s]
        if where:
            words = content_terms(q.question)
            terms.append(len(words))
            shared.append(len(words & content_terms(where[0])))
    return {"content_words": float(np.mean(terms)), "in_sentence": float(np.mean(shared)),
            "share": float(np.sum(shared) / np.sum(terms))}


def rho_retriever_matched(unlabelled: dict[str, float], labelled: dict[str, float],
                          configs: list[PipelineConfig]) -> float:
    """rho after moving each retriever's unlabelled mean onto its labelled mean: how much
    agreement is left once the retrievers' offset, the estimate's known bias (generated
    questions reuse their sentence's words, which favours BM25), is taken out. It reads
    the labels, so it locates the gap; it is not an estimate a build could make."""
    shifted = dict(unlabelled)
    for retriever in {c.retriever for c in configs}:
        names = [c.name for c in configs if c.retriever == retriever]
        offset = np.mean([labelled[n] for n in names]) - np.mean([unlabelled[n] for n in names])
        shifted.update({n: unlabelled[n] + offset for n in names})
    return rho(shifted, labelled)


BEFORE_AFTER = ("bm25-k1-1xextractive", "dense-k3-1xextractive", "hybrid-k5-rr-1xextractive")


def documents_run(n_questions: int, quick: bool = False) -> dict:
    """Part 4: plain documents in; build time, rank agreement, F1 before and after."""
    corpus = load_squad(DATA)
    configs = default_configs()
    with tempfile.TemporaryDirectory() as tmp:
        docs, out = Path(tmp) / "docs", Path(tmp) / "index"
        docs.mkdir()
        write_documents(corpus, docs)
        print(f"plain documents: {len(corpus.passages)} .txt files, labels hidden; "
              "sluice rag build-index with its defaults ...", flush=True)
        start, cpu = time.perf_counter(), time.process_time()
        report = build_index(docs, out, log=lambda m: print(m, flush=True))
        build_s = time.perf_counter() - start  # what the CLI takes, embedder load included
        build_cpu_s = time.process_time() - cpu  # all threads: the machine is shared
        embedder = Embedder.load()
        built = {p["name"]: p for p in json.loads((out / "profiles.json").read_text())}
        index = RetrievalIndex.load(out, embedder)
    pipeline = RagPipeline(index, CostModel({EXTRACTIVE: ModelTier(EXTRACTIVE, MINILM)}))
    generated = generate_questions(index.corpus, n_questions)
    print(f"unlabelled estimate: {len(generated)} generated questions x {len(configs)} "
          "configurations ...", flush=True)
    generated_m = measure_all(pipeline, configs, generated, method="generated",
                              progress=True, early_stop=False)
    unlabelled = {m.profile.config.name: m.profile.quality for m in generated_m}
    squad_index = RetrievalIndex.build(corpus, embedder, progress=True)
    labelled_q = sample_questions(corpus.answerable(), n_questions)
    squad = RagPipeline(squad_index, CostModel({EXTRACTIVE: ModelTier(EXTRACTIVE, MINILM)}))
    print(f"labelled: {len(labelled_q)} SQuAD questions x {len(configs)} configurations, "
          "today's extractive answerer ...", flush=True)
    after = {m.profile.config.name: m for m in measure_all(squad, configs, labelled_q,
                                                           progress=True, early_stop=False)}
    labelled = {n: m.f1 for n, m in after.items()}
    agreement = rho(unlabelled, labelled)
    noise = rank_noise(generated_m, list(after.values()))
    overlap = {"labelled": content_overlap(labelled_q, corpus),
               "generated": content_overlap(generated, index.corpus),
               "echo": content_overlap(generate_questions(index.corpus, n_questions, keep=1.0),
                                       index.corpus)}
    matched = rho_retriever_matched(unlabelled, labelled, configs)
    recall = {"labelled": retrieval_metrics(squad_index, labelled_q),
              "generated": retrieval_metrics(index, generated)}
    print(f"  Spearman unlabelled vs labelled: {agreement:.3f} ({matched:.3f} with the "
          f"retrievers' offsets matched); noise {noise}; content words in the answer's "
          f"sentence {overlap}; recall {recall}", flush=True)
    squad.extractive = ExtractiveAnswerer("subspans", lexical_weight=0.0)
    compared = [c for c in configs if c.name in BEFORE_AFTER] if quick else configs
    print(f"... and the answerer before issue 23 (sub-spans, no lexical term) on "
          f"{len(compared)} configurations", flush=True)
    before = {m.profile.config.name: m for m in measure_all(squad, compared, labelled_q,
                                                            progress=True, early_stop=False)}
    rows = [{"config": n, "labelled_f1": labelled[n], "labelled_em": after[n].exact_match,
             "before_f1": before[n].f1 if n in before else None,
             "before_em": before[n].exact_match if n in before else None,
             "unlabelled_f1": unlabelled[n], "build_profile_f1": built[n]["quality"],
             "build_profile_stopped_early": built[n]["stopped_early"]} for n in labelled]
    for r in rows:
        print(f"  {r['config']:32s} labelled F1 {r['labelled_f1']:.3f} (before "
              f"{r['before_f1']})  EM {r['labelled_em']:.3f} (before {r['before_em']})"
              f"  unlabelled {r['unlabelled_f1']:.3f}  build {r['build_profile_f1']:.3f}")
    result = {
        "passages": len(index.corpus.passages), "files": len(corpus.passages),
        "build": {**report.to_dict(), "wall_s": build_s, "cpu_s": build_cpu_s,
                  "load_avg_1m_after": os.getloadavg()[0], "goal_s": 180,
                  "goal_met": build_s < 180},
        "quality_method": "generated questions (template cloze from passage sentences; the "
                          "source passage and span are the labels)",
        "questions": {"generated": len(generated), "labelled": len(labelled_q)},
        "spearman_unlabelled_vs_labelled": agreement,
        "spearman_build_profiles_vs_labelled": rho(
            {n: r["quality"] for n, r in built.items()}, labelled),
        "spearman_goal": 0.8,
        "spearman_retriever_offsets_matched": matched,
        "rank_noise": noise,
        "retrieval_recall": recall,
        "content_overlap_with_answer_sentence": overlap,
        "before_after_configurations": sorted(before),
        "extractive_mean_f1": {"before": float(np.mean([m.f1 for m in before.values()])),
                               "after": float(np.mean([after[n].f1 for n in before]))},
        "extractive_mean_em": {"before": float(np.mean([m.exact_match
                                                        for m in before.values()])),
                               "after": float(np.mean([after[n].exact_match
                                                       for n in before]))},
        "configurations": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "configurations"}, indent=1))
    return result


# --- main -----------------------------------------------------------------------------------

def class_mix(classifier: IntentClassifier, sample: list[LabelledQuestion]) -> dict[str, float]:
    """Share of each class among the sample's questions, by the intent classifier."""
    labels = [classifier.classify(q.question) for q in sample]
    return {c: labels.count(c) / len(labels) for c in classifier.classes}


def targets(retrieval: dict, sim: dict) -> dict:
    cheapest = sim["cheapest_static_meeting_all_slos"]
    dyn = sim["dynamic"]
    cost_ok = cheapest is not None and (
        dyn["mean_cost_usd"] <= sim["static"][cheapest]["mean_cost_usd"])
    servers_ok = cheapest is not None and (
        dyn["server_seconds"] <= sim["static"][cheapest]["server_seconds"])
    return {"dense_recall@5": retrieval["dense"]["recall@5"],
            "dense_recall@5_met": retrieval["dense"]["recall@5"] >= RECALL5_TARGET,
            "dynamic_attainment": dyn["attainment"],
            "dynamic_attainment_met": dyn["attainment"] >= ATTAINMENT_TARGET,
            "dynamic_cost_not_above_cheapest_static_met": cost_ok,
            "dynamic_server_seconds_not_above_cheapest_static": servers_ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="30-question sample, 4 configurations, 200 simulated seconds")
    ap.add_argument("--sample", type=int, default=None, help="answer-quality sample size")
    ap.add_argument("--sim-seconds", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generator", default=None,
                    help="also profile generative answerers on this model (checkpoint directory "
                         "or built-in name), served by Sluice")
    ap.add_argument("--out", type=Path, default=RESULTS / "rag.json")
    ap.add_argument("--documents-run", action="store_true",
                    help="only part 4: plain documents (build time, rank agreement, F1)")
    ap.add_argument("--docs-questions", type=int, default=24,
                    help="questions per configuration in part 4's comparisons (default: 24)")
    args = ap.parse_args()
    if args.documents_run:
        t0 = time.perf_counter()
        result = documents_run(args.docs_questions, args.quick)
        result.update(command=" ".join(["bench/rag.py", *sys.argv[1:]]),
                      machine={"platform": platform.platform(), "cpus": os.cpu_count(),
                               "jax": jax.__version__, "load_avg_1m": os.getloadavg()[0]},
                      wall_s=time.perf_counter() - t0)
        path = args.out.parent / "rag_documents.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
        return
    n_sample = args.sample or (30 if args.quick else 100)
    seconds = args.sim_seconds or (200.0 if args.quick else 600.0)
    t0 = time.perf_counter()

    corpus = load_squad(DATA)
    answerable = sorted(corpus.answerable(), key=lambda q: q.id)
    sample = answerable[::max(1, len(answerable) // n_sample)][:n_sample]
    embedder = Embedder.load()
    print("warming up the embedder (compiling every padded shape) ...", flush=True)
    warm_up(embedder)
    index = RetrievalIndex.build(corpus, embedder)
    print(f"corpus: {len(corpus.passages)} passages, {len(answerable)} answerable questions "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    retrieval = retrieval_metrics(index, answerable)
    for name, m in retrieval.items():
        print(f"  {name:7s} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))

    tiers, generators, generator = {EXTRACTIVE: ModelTier(EXTRACTIVE, MINILM)}, {}, None
    if args.generator:
        generator, gen, tier = generator_tier(args.generator)
        tiers[generator], generators[generator] = tier, gen
    pipeline = RagPipeline(index, CostModel(tiers), generators)
    print(f"profiling configurations on {len(sample)} answerable questions ...", flush=True)
    measurements = profile_configs(pipeline, candidate_configs(args.quick, generator), sample)

    mix = class_mix(IntentClassifier(embedder), sample)
    print("SLO simulation (discrete-event, driven by measured service times) ...", flush=True)
    sim = slo_simulation(measurements, DEFAULT_CLASSES, mix, seconds, args.seed)
    report_sim(sim)

    result = {"command": " ".join(["bench/rag.py", *sys.argv[1:]]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "jax": jax.__version__,
                          "jax_backend": jax.default_backend()},
              "data": {"file": str(DATA.relative_to(ROOT.parent)),
                       "passages": len(corpus.passages), "answerable": len(answerable),
                       "answer_sample": len(sample)},
              "retrieval": retrieval,
              "configurations": [{**m.profile.to_dict(), "exact_match": m.exact_match,
                                  "f1": m.f1} for m in measurements],
              "pareto_front": [p.config.name for p in
                               pareto_front([m.profile for m in measurements])],
              "simulation": sim, "targets": targets(retrieval, sim),
              "wall_s": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot_pareto(measurements, args.out.parent / "rag_pareto.png")
    plot_attainment(sim, args.out.parent / "rag_slo.png")
    print(json.dumps(result["targets"], indent=1))
    print(f"wrote {args.out} and plots ({result['wall_s']:.0f} s)")


def report_sim(sim: dict) -> None:
    """Print the simulation's dynamic vs static table."""
    print(f"  [SIMULATION driven by measured service times] base rates "
          f"{ {c: round(r, 2) for c, r in sim['base_rates_qps'].items()} } q/s, doubled at "
          f"t={sim['seconds'] / 2:g} s; planned {sim['planned']}")
    rows = [("dynamic", sim["dynamic"])] + [(f"static {n}", s) for n, s in sim["static"].items()]
    for name, s in rows:
        flag = "" if name == "dynamic" else (
            f" x{s['servers_per_class']} servers" + (" meets all SLOs" if s["meets_all_slos"]
                                                     else ""))
        print(f"  {name:40s} attainment {s['attainment']:.4f} "
              f"(1st half {s['attainment_first_half']:.3f}, 2nd {s['attainment_second_half']:.3f})"
              f"  cost {s['mean_cost_usd']:.3e} $/q, {s['server_seconds']:.0f} server-s{flag}")
    print(f"  cheapest static meeting all SLOs: {sim['cheapest_static_meeting_all_slos']}")


if __name__ == "__main__":
    main()
