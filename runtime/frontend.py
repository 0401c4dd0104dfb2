"""`FrontEnd`: what the HTTP server (and the RAG layer) needs from whatever serves
requests, whether that is one engine (`sluice.runtime.async_engine.AsyncEngine`)
or many under the global scheduler (`sluice.scheduler.async_cluster.AsyncCluster`).

- ``model`` (its tokenizer and config: a Ray cluster's driver holds no weights,
  `sluice.runtime.loader.LazyModel`, so nothing above reads its parameters),
  ``max_model_len`` and ``scheduling_policy`` (the policy's name, None if
  unknown; ``/admin/priority`` warns when it ignores priorities): what every
  instance serves;
- ``embed(token_ids) -> np.ndarray``: the embedding of one validated token
  sequence (`sluice.runtime.embed.mean_pooled`), computed where the weights are
  (one engine: beside it; a cluster: on an instance, `Instance.embed`); it
  blocks, so the server calls it off the event loop (``/v1/embeddings``);
- ``generate(prompt, params, request_id=, priority=, client=, conversation=,
  delta=)``: validates at once (``ValueError``) and returns an async iterator of
  `RequestOutput`s; closing it early aborts the request;
- ``abort(request_id)`` (unknown ids: no-op), ``set_priority(request_id,
  priority) -> bool`` (False if no live request has that id);
- ``stats() -> EngineStats`` (summed over instances), ``health() -> Health``;
- ``shutdown()``.

The server is written against this protocol only, so it never reaches into an
engine (or a cluster) behind it.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

import numpy as np

from sluice.runtime.engine import EngineStats
from sluice.runtime.intake import Prompt
from sluice.runtime.loader import Model
from sluice.runtime.health import Health
from sluice.runtime.outputs import RequestOutput
from sluice.runtime.sampling_params import SamplingParams


class FrontEnd(Protocol):
    @property
    def model(self) -> Model: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def scheduling_policy(self) -> str | None: ...

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       client: str | None = None, conversation: str | None = None,
                       delta: bool = False) -> AsyncIterator[RequestOutput]: ...

    def embed(self, token_ids: list[int]) -> np.ndarray: ...

    async def abort(self, request_id: str) -> None: ...

    async def set_priority(self, request_id: str, priority: int) -> bool: ...

    def stats(self) -> EngineStats: ...

    def health(self) -> Health: ...

    async def shutdown(self) -> None: ...
