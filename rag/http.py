"""``POST /v1/rag/query`` and ``GET /v1/rag/status`` for the Sluice server.

Body: ``{"question": str, "class"?: str, "slo"?: {"min_quality"?, "latency_p95_s"?,
"max_cost"?}}``. Response: ``RagAnswer.to_dict()``: the answer, cited passage ids, the class,
the configuration used (its name and knobs), measured latency and cost, and token usage per
tier. Bad input (invalid JSON, a missing or empty question, an unknown class, a malformed or
impossible SLO) is a 400 OpenAI error object whose ``param`` names the field and whose message
says what is achievable; the server's own wrapper turns anything else into a 500.
``GET /v1/rag/status``: ``{"classes": RagService.status()}`` (per class: configuration in
use, arrival rate, replicas wanted, SLO).

``rag_part(index_dir, on_demand=None)`` is the server part (`sluice.runtime.server.ServerPart`) that ``sluice
serve --rag-index`` mounts. ``rag_routes(service, wrap, read_body)`` returns the Starlette
routes; ``wrap`` is the server's endpoint wrapper (error objects, logging).
``load_rag_service(index_dir, engine, model_name)`` builds the ``RagService`` a server uses:
the extractive tier plus the served model as a generative tier, generating through the
server's own ``AsyncEngine``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sluice.rag.cost import ModelTier, spec_from_config
from sluice.rag.generation import EngineGenerator
from sluice.rag.service import RagService
from sluice.runtime.async_engine import AsyncEngine
from sluice.runtime.http_errors import APIError

if TYPE_CHECKING:
    from sluice.runtime.server import ServerContext

Handler = Callable[[Request], Awaitable[Response]]


def _bad(message: str) -> APIError:
    field = message.split(":", 1)[0] if ":" in message else None
    if field and field.startswith("slo."):
        field = "slo"
    return APIError(400, message, param=field if field and " " not in field else None)


def rag_routes(service: RagService, wrap: Callable[[Handler], Handler],
               read_body: Callable[[Request], Awaitable[bytes]]) -> list[Route]:
    """The route; ``read_body`` is the server's size-limited body reader (413)."""
    async def query(request: Request) -> Response:
        try:
            body = json.loads(await read_body(request) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"invalid JSON body ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "body: must be a JSON object with a 'question'", param="body")
        question, cls, slo = body.get("question"), body.get("class"), body.get("slo")
        if not isinstance(question, str):
            raise APIError(400, "question: must be a non-empty string", param="question")
        if cls is not None and not isinstance(cls, str):
            raise APIError(400, "class: must be a string", param="class")
        try:
            answer = await service.query(question, cls, slo)
        except ValueError as e:
            raise _bad(str(e)) from None
        return JSONResponse(answer.to_dict())

    async def status(request: Request) -> Response:
        return JSONResponse({"classes": service.status()})

    return [Route("/v1/rag/query", wrap(query), methods=["POST"]),
            Route("/v1/rag/status", wrap(status), methods=["GET"])]


def rag_part(index_dir: str | Path, on_demand: Callable[[Callable[[], int]], None] | None = None
             ) -> Callable[[ServerContext], list[Route]]:
    """The server part serving the index in ``index_dir``: the `RagService` is loaded
    over the server's own front end when the server is built. ``on_demand`` (the
    cluster autoscaler's ``add_demand``, under ``--autoscale``) is given the
    service's replica demand, ``service.capacity.replicas``."""
    def mount(server: ServerContext) -> list[Route]:
        service = load_rag_service(index_dir, server.engine, server.model_name)
        if on_demand is not None:
            on_demand(service.capacity.replicas)
        return rag_routes(service, server.wrap, server.read_body)
    return mount


def load_rag_service(index_dir: str | Path, engine: AsyncEngine, model_name: str) -> RagService:
    config = engine.model.config
    tier = ModelTier(model_name, spec_from_config(model_name, config))
    return RagService.load(index_dir, {model_name: EngineGenerator(engine)}, {model_name: tier})
