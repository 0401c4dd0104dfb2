"""Dollar cost of a query from its token counts and the provisioner's $/hour per instance.

A ``ModelTier`` is one served model on one instance shape: a ``ModelSpec`` (the
provisioner's description of what a model costs to run), a catalog accelerator type and a
chip count. ``CostModel(tiers, catalog)`` prices the tokens each tier processed:

    usd = price_per_hour(instance) / 3600
          x (prompt_tokens x s_prefill + completion_tokens x s_decode)

    s_prefill = step_time(prefill_tokens=P) / P             (P = ``prefill_chunk``)
    s_decode  = step_time(decode_seqs=D, context=D x C) / D   (D = ``decode_batch``,
                                                             C = ``decode_context``)

``price_per_hour`` is chips x the catalog's on-demand (or spot) $/chip-hour and
``step_time`` is the provisioner's roofline step time (``sluice.provision.perfmodel``), so
``s_prefill`` and ``s_decode`` are the instance-seconds one token occupies when the instance
runs full batches. The cost is therefore the share of a busy instance's hourly price that
the query's tokens use; idle time is the provisioner's concern, not the per-query price. An
encoder-only tier (the embedder behind the extractive answerer, reranker and judge) only
has prompt tokens.

``spec_from_config(name, ModelConfig)`` derives a ``ModelSpec`` from a Sluice model config
(for the built-in ``tiny`` model or a loaded checkpoint); ``MINILM`` describes the
all-MiniLM-L6-v2 embedder (22.7 M parameters, 6 layers, hidden 384, 12 heads of 32).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sluice.provision.catalog import Accelerator, load_catalog
from sluice.provision.perfmodel import Instance, ModelSpec
from sluice.runtime.config import ModelConfig

MINILM = ModelSpec("all-MiniLM-L6-v2", 22.7e6, 6, 384, 12, 32)
DEFAULT_ACCELERATOR = "L4"


@dataclass(frozen=True)
class ModelTier:
    name: str
    model: ModelSpec
    accelerator: str = DEFAULT_ACCELERATOR
    chips: int = 1
    prefill_chunk: int = 2048
    decode_batch: int = 32
    decode_context: int = 1024


def spec_from_config(name: str, config: ModelConfig) -> ModelSpec:
    h, hd = config.hidden_size, config.head_dim
    attn = h * config.num_heads * hd * 2 + h * config.num_kv_heads * hd * 2
    mlp = 3 * h * config.intermediate_size
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    params = config.num_layers * (attn + mlp) + embeddings
    return ModelSpec(name, float(params), config.num_layers, h, config.num_kv_heads, hd)


@dataclass(frozen=True)
class TierRate:
    """$/token of one tier, for prompt and completion tokens."""

    usd_per_prompt_token: float
    usd_per_completion_token: float


class CostModel:
    def __init__(self, tiers: Mapping[str, ModelTier],
                 catalog: Mapping[str, Accelerator] | None = None, spot: bool = False):
        catalog = load_catalog() if catalog is None else catalog
        self.tiers = dict(tiers)
        self.rates: dict[str, TierRate] = {}
        for name, tier in self.tiers.items():
            if tier.accelerator not in catalog:
                raise ValueError(f"tiers[{name!r}].accelerator: {tier.accelerator!r} is not in "
                                 f"the catalog ({', '.join(sorted(catalog))})")
            inst = Instance(catalog[tier.accelerator], tier.chips, tier.model)
            usd_per_s = inst.price(spot) / 3600
            s_prefill = inst.step_time(0, tier.prefill_chunk, 0) / tier.prefill_chunk
            d = tier.decode_batch
            s_decode = inst.step_time(d, 0, d * tier.decode_context) / d
            self.rates[name] = TierRate(usd_per_s * s_prefill, usd_per_s * s_decode)

    def usd(self, tier: str, prompt_tokens: int, completion_tokens: int = 0) -> float:
        if tier not in self.rates:
            raise ValueError(f"tier: unknown {tier!r} (known: {', '.join(sorted(self.rates))})")
        rate = self.rates[tier]
        return (prompt_tokens * rate.usd_per_prompt_token
                + completion_tokens * rate.usd_per_completion_token)
