"""The pipeline configuration: the knobs the SLA planner turns, as one frozen record.

``PipelineConfig(retriever, k, rerank, agents, max_tokens, arbitration)``:

- ``retriever``: ``"bm25"``, ``"dense"`` or ``"hybrid"`` (``RetrievalIndex.retriever``);
- ``k``: passages retrieved and handed to the answerers;
- ``rerank``: reorder the ``k`` passages by cross-scoring them against the question with the
  embedder (best sentence similarity) before answering;
- ``agents``: one model tier per answerer agent, e.g. ``("extractive",)`` or
  ``("extractive", "extractive", "tiny")``; a tier names a served model instance in the
  ``CostModel`` (``"extractive"`` is the embedder-only span extractor). Agents run in parallel;
- ``max_tokens``: most tokens a generative agent may produce;
- ``arbitration``: how one answer is chosen from several: ``"vote"`` (majority of normalised
  answers, ties to the higher summed score), ``"best"`` (highest self-score) or ``"judge"``
  (a judge agent re-scores every candidate against its evidence).

``name`` is a short stable label (``dense-k3-rr-3xextractive-vote``) used in profiles, plots
and logs; ``to_dict``/``from_dict`` are the JSON form used by the HTTP response and the
profile files. Bad values raise ``ValueError`` naming the field.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from sluice.rag.index import RETRIEVERS

ARBITRATIONS = ("vote", "best", "judge")
EXTRACTIVE = "extractive"


@dataclass(frozen=True)
class PipelineConfig:
    retriever: str = "dense"
    k: int = 3
    rerank: bool = False
    agents: tuple[str, ...] = (EXTRACTIVE,)
    max_tokens: int = 32
    arbitration: str = "best"

    def __post_init__(self) -> None:
        if self.retriever not in RETRIEVERS:
            raise ValueError(f"retriever: unknown {self.retriever!r} "
                             f"(expected one of {', '.join(RETRIEVERS)})")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k: must be a positive integer, got {self.k!r}")
        if not isinstance(self.rerank, bool):
            raise ValueError(f"rerank: must be a boolean, got {self.rerank!r}")
        if (not isinstance(self.agents, tuple) or not self.agents
                or not all(isinstance(a, str) and a for a in self.agents)):
            raise ValueError(f"agents: must be a non-empty tuple of tier names, "
                             f"got {self.agents!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be a positive integer, got {self.max_tokens!r}")
        if self.arbitration not in ARBITRATIONS:
            raise ValueError(f"arbitration: unknown {self.arbitration!r} "
                             f"(expected one of {', '.join(ARBITRATIONS)})")

    @property
    def generative(self) -> bool:
        return any(a != EXTRACTIVE for a in self.agents)

    @property
    def name(self) -> str:
        counts = Counter(self.agents)
        agents = "+".join(f"{n}x{tier}" for tier, n in counts.items())
        parts = [self.retriever, f"k{self.k}"] + (["rr"] if self.rerank else []) + [agents]
        if len(self.agents) > 1:
            parts.append(self.arbitration)
        if self.generative:
            parts.append(f"t{self.max_tokens}")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["agents"] = list(self.agents)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        fields = set(cls.__dataclass_fields__)
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"configuration: unknown fields {sorted(unknown)}")
        d = dict(d)
        if "agents" in d:
            d["agents"] = tuple(d["agents"]) if isinstance(d["agents"], list) else d["agents"]
        return cls(**d)
