"""The OpenAI-compatible HTTP server: a Starlette app over `AsyncEngine`.

``OpenAIServer(engine, ServerConfig(...)).app`` is the ASGI app; ``run_server``
serves it with uvicorn until SIGTERM/SIGINT (``sluice serve`` calls it).

Endpoints: ``POST /v1/completions`` and ``/v1/chat/completions`` (JSON, or
server-sent events ending in ``data: [DONE]`` when ``stream`` is true),
``POST /v1/embeddings``, ``GET /v1/models[/{id}]``, ``POST /tokenize``,
``POST /detokenize``, ``GET /health``, ``GET /version``, ``GET /metrics``
(Prometheus, see `sluice.runtime.metrics`), ``POST /admin/priority``
(``{"request_id": <a completion's id>, "priority": <int>}``: re-rank an
unfinished completion while it waits or runs; 404 if none has that id; a
stream's id is in its ``X-Request-Id`` header before the first token), and ``POST /v1/rag/query`` when
``ServerConfig.rag_index`` names a RAG index (`sluice.rag.http`). Schemas and the request ->
`SamplingParams` mapping live in `sluice.runtime.openai_protocol`.

Why these behaviours:

- Every error is an OpenAI error object (``{"error": {"message", "type",
  "param", "code"}}``) so clients raise their usual exceptions: 400 for bad
  input, 404 for an unknown model or route, 413 for a body over
  ``max_body_bytes`` (checked on the header and while reading), 401 when
  ``api_key`` is set and the bearer token is missing or wrong (compared with
  `hmac.compare_digest`; ``/health``, ``/version`` and ``/metrics`` stay open,
  as in vLLM), 429 with ``Retry-After`` when admitting a request would put more
  than ``max_waiting`` requests in the queue (a request waits from admission to
  its first output; admitted requests are never dropped), 500 only for bugs.
- A client that disconnects, mid-stream or while a non-streamed request is
  still running, aborts its engine requests, which frees their KV blocks.
- Graceful shutdown: on SIGTERM uvicorn stops accepting connections and lets
  in-flight requests finish for ``shutdown_timeout`` seconds, then cancels them
  (which aborts them); the engine stops, and ``run_server`` returns normally so
  the process exits 0.
- One structured access-log line per request on the ``sluice.access`` logger:
  a JSON object with id, method, path, status, prompt and completion tokens,
  time to first token and duration.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import importlib.metadata
import json
import logging
import signal
import socket
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from sluice.runtime import openai_protocol as proto
from sluice.runtime.async_engine import AsyncEngine
from sluice.runtime.embed import mean_pooled
from sluice.runtime.engine import LLMEngine
from sluice.runtime.metrics import CONTENT_TYPE, ServerMetrics
from sluice.runtime.openai_protocol import APIError
from sluice.runtime.outputs import RequestOutput
from sluice.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sluice.scheduler.async_cluster import AsyncCluster

log = logging.getLogger(__name__)
access_log = logging.getLogger("sluice.access")

OPEN_PATHS = ("/health", "/version", "/metrics")
KEY_CLIENT_PREFIX = "key:"  # clients named by their API key: see _key_client


@dataclasses.dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    max_waiting: int | None = None  # None: unbounded
    retry_after_s: int = 1
    rag_index: str | None = None  # a `sluice rag build-index` directory: POST /v1/rag/query


@dataclasses.dataclass
class _Job:
    """One engine request (one prompt of an API request) and its bookkeeping."""

    request_id: str
    stream: AsyncIterator[RequestOutput]
    n: int
    response_id: str  # the API request's id (its response's ``id``)
    waiting: bool = True  # admitted, no output yet (counts against max_waiting)
    last: RequestOutput | None = None
    closed: bool = False


class OpenAIServer:
    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.llm_engine: LLMEngine = engine.engine
        self.tokenizer = self.llm_engine.model.tokenizer
        self.max_model_len = self.llm_engine.max_model_len
        self.metrics = ServerMetrics(config.model_name)
        self.created = proto.now()
        self.num_waiting = 0
        self._live: dict[str, list[_Job]] = {}  # response id -> its unfinished jobs
        self._embed_lock = asyncio.Lock()
        routes = [
            Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._endpoint(self.chat), methods=["POST"]),
            Route("/v1/embeddings", self._endpoint(self.embeddings), methods=["POST"]),
            Route("/v1/models", self._endpoint(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._endpoint(self.model), methods=["GET"]),
            Route("/tokenize", self._endpoint(self.tokenize), methods=["POST"]),
            Route("/detokenize", self._endpoint(self.detokenize), methods=["POST"]),
            Route("/health", self._endpoint(self.health), methods=["GET"]),
            Route("/version", self._endpoint(self.version), methods=["GET"]),
            Route("/metrics", self._endpoint(self.prometheus), methods=["GET"]),
            Route("/admin/priority", self._endpoint(self.set_priority), methods=["POST"]),
        ]
        if config.rag_index is not None:
            from sluice.rag.http import load_rag_service, rag_routes
            routes += rag_routes(load_rag_service(config.rag_index, engine, config.model_name),
                                 self._endpoint, self._body)
        app = Starlette(routes=routes, lifespan=self._lifespan,
                        exception_handlers={HTTPException: _http_exception})
        self.app = _Guard(app, config)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        await self.engine.shutdown()

    # -- plumbing -------------------------------------------------------------

    def _endpoint(self, handler: Callable[[Request], Awaitable[Response]]):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as e:
                return JSONResponse(e.body(), e.status, headers=e.headers)
            except Exception:
                log.exception("internal error in %s", request.url.path)
                return JSONResponse(APIError(500, "internal server error", "server_error")
                                    .body(), 500)
        return endpoint

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        too_large = APIError(413, f"request body exceeds {limit} bytes",
                             code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")

    async def _start(self, request: Request, rid: str, prompts: list, params: SamplingParams,
                     req: proto.CompletionRequest | proto.ChatCompletionRequest,
                     prompt_param: str) -> list[_Job]:
        """Admit and queue one engine request per prompt (all or none)."""
        limit = self.config.max_waiting
        if limit is not None and self.num_waiting + len(prompts) > limit:
            raise APIError(429, f"server overloaded: {self.num_waiting} requests waiting "
                           f"(limit {limit}); retry later", "rate_limit_error",
                           code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        if req.conversation_id is not None and len(prompts) != 1:
            raise APIError(400, "conversation_id: needs a single prompt", param="conversation_id")
        if req.user is not None and req.user.startswith(KEY_CLIENT_PREFIX):
            raise APIError(400, f"user: must not start with {KEY_CLIENT_PREFIX!r} (reserved "
                           "for clients named by their API key)", param="user")
        client = req.user or _key_client(request)
        # A conversation is the client's own: ids of different clients never share KV.
        conversation = None if req.conversation_id is None else \
            json.dumps([client or "", req.conversation_id])
        jobs: list[_Job] = []
        try:
            for i, prompt in enumerate(prompts):
                job_id = rid if len(prompts) == 1 else f"{rid}-{i}"
                stream = await self.engine.generate(prompt, params, request_id=job_id,
                                                    priority=req.priority, client=client,
                                                    conversation=conversation)
                jobs.append(_Job(job_id, stream, params.n, rid))
                self.num_waiting += 1
        except ValueError as e:
            await self._close(jobs)
            err = proto.value_error(e)
            if err.param in ("prompt", "prompt_token_ids"):
                err.param = prompt_param
            elif err.param == "conversation":
                err.param = "conversation_id"
            raise err from None
        request.state.request_id = rid
        self._live[rid] = jobs
        return jobs

    async def _close(self, jobs: list[_Job]) -> None:
        """Release jobs: idempotent; aborts every job that did not finish."""
        if jobs:
            self._live.pop(jobs[0].response_id, None)
        for job in jobs:
            if job.closed:
                continue
            job.closed = True
            if job.waiting:
                self.num_waiting -= 1
            if job.last is None or not job.last.finished:
                await self.engine.abort(job.request_id)
                self.metrics.observe_aborted(job.n)

    async def _outputs(self, jobs: list[_Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(job index, output) from all jobs as they arrive."""
        if len(jobs) == 1:
            async for out in jobs[0].stream:
                yield 0, self._seen(jobs[0], out)
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: _Job) -> None:
            try:
                async for out in job.stream:
                    queue.put_nowait((i, out))
            except Exception as e:
                queue.put_nowait((i, e))
            queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
        try:
            remaining = len(jobs)
            while remaining:
                i, out = await queue.get()
                if out is None:
                    remaining -= 1
                elif isinstance(out, Exception):
                    raise out
                else:
                    yield i, self._seen(jobs[i], out)
        finally:
            for t in tasks:
                t.cancel()

    def _seen(self, job: _Job, out: RequestOutput) -> RequestOutput:
        if job.waiting:
            job.waiting = False
            self.num_waiting -= 1
        job.last = out
        if out.finished:
            self.metrics.observe_finished(out)
        return out

    async def _until_disconnect(self, request: Request, jobs: list[_Job],
                                work: Awaitable[Response]) -> Response:
        """Run a non-streamed request; if the client goes away first, abort it."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
            await self._close(jobs)
        if task.cancelled():
            return Response(status_code=499)  # nginx's "client closed request"
        return task.result()

    def _usage_state(self, request: Request, prompt_tokens: int, completion_tokens: int,
                     ttft: float | None) -> None:
        request.state.prompt_tokens = prompt_tokens
        request.state.completion_tokens = completion_tokens
        request.state.ttft = ttft

    # -- generation -----------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        req = proto.parse(proto.CompletionRequest, await self._body(request))
        self._check_model(req.model)
        params = req.sampling_params(self.max_model_len)
        prompts = req.prompts()
        rid = proto.new_id("cmpl")
        jobs = await self._start(request, rid, prompts, params, req, "prompt")
        created = proto.now()
        if req.stream:
            return _SSEResponse(self._completion_chunks(request, req, jobs, rid, created),
                                lambda: self._close(jobs), rid)
        return await self._until_disconnect(request, jobs, self._completion_full(
            request, req, jobs, rid, created))

    async def _completion_full(self, request: Request, req: proto.CompletionRequest,
                               jobs: list[_Job], rid: str, created: int) -> Response:
        start, ttft = time.monotonic(), None
        async for _ in self._outputs(jobs):
            ttft = ttft if ttft is not None else time.monotonic() - start
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for j, job in enumerate(jobs):
            out = job.last
            prompt_tokens += len(out.prompt_token_ids)
            for comp in out.outputs:
                completion_tokens += len(comp.token_ids)
                lps = None if comp.logprobs is None else proto.completion_logprobs(
                    self.tokenizer, comp.logprobs, 0)
                choices.append({"index": j * req.n + comp.index, "text": comp.text,
                                "logprobs": lps, "finish_reason": comp.finish_reason,
                                "stop_reason": comp.stop_reason})
        self._usage_state(request, prompt_tokens, completion_tokens, ttft)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                             "model": self.config.model_name, "choices": choices,
                             "usage": proto.usage(prompt_tokens, completion_tokens),
                             "system_fingerprint": None})

    async def _completion_chunks(self, request: Request, req: proto.CompletionRequest,
                                 jobs: list[_Job], rid: str, created: int
                                 ) -> AsyncIterator[bytes]:
        head = {"id": rid, "object": "text_completion", "created": created,
                "model": self.config.model_name}
        extra = {"usage": None} if req.include_usage else {}
        counts: dict[int, tuple[int, int]] = {}  # choice -> (tokens sent, text length sent)
        done: set[int] = set()
        start, ttft = time.monotonic(), None
        async for j, out in self._outputs(jobs):
            ttft = ttft if ttft is not None else time.monotonic() - start
            for comp in out.outputs:
                idx = j * req.n + comp.index
                if idx in done:
                    continue
                sent, offset = counts.get(idx, (0, 0))
                new = len(comp.token_ids) - sent
                if not new and not comp.delta and comp.finish_reason is None:
                    continue
                lps = None if comp.logprobs is None else proto.completion_logprobs(
                    self.tokenizer, comp.logprobs[sent:], offset)
                counts[idx] = (len(comp.token_ids), offset + len(comp.delta))
                if comp.finish_reason is not None:
                    done.add(idx)
                yield proto.sse({**head, "choices": [{
                    "index": idx, "text": comp.delta, "logprobs": lps,
                    "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason}],
                    **extra})
        prompt_tokens = sum(len(job.last.prompt_token_ids) for job in jobs)
        completion_tokens = sum(n for n, _ in counts.values())
        self._usage_state(request, prompt_tokens, completion_tokens, ttft)
        if req.include_usage:
            yield proto.sse({**head, "choices": [],
                             "usage": proto.usage(prompt_tokens, completion_tokens)})
        yield proto.SSE_DONE

    async def chat(self, request: Request) -> Response:
        req = proto.parse(proto.ChatCompletionRequest, await self._body(request))
        self._check_model(req.model)
        params = req.sampling_params(self.max_model_len)
        prompt = {"prompt_token_ids": req.render(self.tokenizer)}
        rid = proto.new_id("chatcmpl")
        jobs = await self._start(request, rid, [prompt], params, req, "messages")
        created = proto.now()
        if req.stream:
            return _SSEResponse(self._chat_chunks(request, req, jobs[0], rid, created),
                                lambda: self._close(jobs), rid)
        return await self._until_disconnect(request, jobs, self._chat_full(
            request, jobs[0], rid, created))

    async def _chat_full(self, request: Request, job: _Job, rid: str, created: int
                         ) -> Response:
        start, ttft = time.monotonic(), None
        async for _ in self._outputs([job]):
            ttft = ttft if ttft is not None else time.monotonic() - start
        out = job.last
        choices = [{"index": c.index,
                    "message": {"role": "assistant", "content": c.text, "refusal": None,
                                "tool_calls": []},
                    "logprobs": None if c.logprobs is None else proto.chat_logprobs(
                        self.tokenizer, c.logprobs),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                   for c in out.outputs]
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        self._usage_state(request, len(out.prompt_token_ids), completion_tokens, ttft)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                             "model": self.config.model_name, "choices": choices,
                             "usage": proto.usage(len(out.prompt_token_ids), completion_tokens),
                             "system_fingerprint": None})

    async def _chat_chunks(self, request: Request, req: proto.ChatCompletionRequest, job: _Job,
                           rid: str, created: int) -> AsyncIterator[bytes]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": self.config.model_name, "system_fingerprint": None}
        extra = {"usage": None} if req.include_usage else {}
        for i in range(req.n):
            yield proto.sse({**head, "choices": [{
                "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}], **extra})
        sent: dict[int, int] = {}
        done: set[int] = set()
        start, ttft = time.monotonic(), None
        async for _, out in self._outputs([job]):
            ttft = ttft if ttft is not None else time.monotonic() - start
            for comp in out.outputs:
                if comp.index in done:
                    continue
                prev = sent.get(comp.index, 0)
                if len(comp.token_ids) == prev and not comp.delta and comp.finish_reason is None:
                    continue
                sent[comp.index] = len(comp.token_ids)
                if comp.finish_reason is not None:
                    done.add(comp.index)
                lps = None if comp.logprobs is None else proto.chat_logprobs(
                    self.tokenizer, comp.logprobs[prev:])
                delta = {"content": comp.delta} if comp.delta or comp.finish_reason is None \
                    else {}
                yield proto.sse({**head, "choices": [{
                    "index": comp.index, "delta": delta, "logprobs": lps,
                    "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason}],
                    **extra})
        prompt_tokens = len(job.last.prompt_token_ids)
        completion_tokens = sum(sent.values())
        self._usage_state(request, prompt_tokens, completion_tokens, ttft)
        if req.include_usage:
            yield proto.sse({**head, "choices": [],
                             "usage": proto.usage(prompt_tokens, completion_tokens)})
        yield proto.SSE_DONE

    # -- other endpoints ------------------------------------------------------

    def _token_ids(self, value: Any, param: str) -> list[int]:
        """A string (tokenized with special tokens) or token ids, checked."""
        ids = self.tokenizer.encode(value) if isinstance(value, str) else list(value)
        if not ids:
            raise APIError(400, f"{param}: must not be empty", param=param)
        vocab = self.llm_engine.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary "
                           f"[0, {vocab})", param=param)
        return ids

    async def embeddings(self, request: Request) -> Response:
        req = proto.parse(proto.EmbeddingRequest, await self._body(request))
        self._check_model(req.model)
        hidden = self.llm_engine.model.config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise APIError(400, f"dimensions: this model's embeddings have {hidden} "
                           "dimensions", param="dimensions")
        inputs = req.input
        if isinstance(inputs, list) and inputs and all(isinstance(x, int) for x in inputs):
            inputs = [inputs]
        elif isinstance(inputs, str):
            inputs = [inputs]
        if not inputs:
            raise APIError(400, "input: must not be empty", param="input")
        seqs = [self._token_ids(x, "input") for x in inputs]
        for ids in seqs:
            if len(ids) > self.max_model_len:
                raise APIError(400, f"input: {len(ids)} tokens exceed max_model_len="
                               f"{self.max_model_len}", param="input")
        model = self.llm_engine.model
        async with self._embed_lock:  # one forward at a time beside the engine
            vectors = [await asyncio.to_thread(mean_pooled, model, ids) for ids in seqs]
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                 if req.encoding_format == "base64" else v.tolist()}
                for i, v in enumerate(vectors)]
        total = sum(len(s) for s in seqs)
        request.state.prompt_tokens = total
        return JSONResponse({"object": "list", "data": data, "model": self.config.model_name,
                             "usage": {"prompt_tokens": total, "total_tokens": total}})

    def _model_card(self) -> dict[str, Any]:
        name = self.config.model_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "sluice",
                "root": name, "parent": None, "max_model_len": self.max_model_len}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._check_model(request.path_params["model"])
        return JSONResponse(self._model_card())

    async def tokenize(self, request: Request) -> Response:
        req = proto.parse(proto.TokenizeRequest, await self._body(request))
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "exactly one of prompt and messages must be given",
                           param="prompt")
        if req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids = proto.ChatPrompt(messages=req.messages,
                              add_generation_prompt=req.add_generation_prompt
                              ).render(self.tokenizer)
        return JSONResponse({"count": len(ids), "max_model_len": self.max_model_len,
                             "tokens": ids, "token_strs": None})

    async def detokenize(self, request: Request) -> Response:
        req = proto.parse(proto.DetokenizeRequest, await self._body(request))
        self._check_model(req.model)
        ids = self._token_ids(req.tokens, "tokens") if req.tokens else []
        return JSONResponse({"prompt": self.tokenizer.decode(ids)})

    async def set_priority(self, request: Request) -> Response:
        """Re-rank every unfinished engine request of a completion (all its prompts)."""
        req = proto.parse(proto.PriorityRequest, await self._body(request))
        jobs = [j for j in self._live.get(req.request_id, []) if not j.closed]
        # (``priority`` is a strict int here, so the engine's own check cannot fail)
        changed = [j.request_id for j in jobs
                   if await self.engine.set_priority(j.request_id, req.priority)]
        if not changed:
            raise APIError(404, f"no unfinished request has id {req.request_id!r}",
                           param="request_id", code="request_not_found")
        return JSONResponse({"request_id": req.request_id, "priority": req.priority,
                             "engine_requests": changed})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": importlib.metadata.version("sluice-serve")})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(self.engine.stats()), media_type=CONTENT_TYPE)


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404/405 as OpenAI error objects."""
    return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), exc.status_code,
                        headers=exc.headers)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _SSEResponse(Response):
    """Server-sent events from ``body``; a client disconnect (noticed by a
    receive watcher, not only when a write fails) stops the stream, and
    ``on_close`` runs however the stream ends. The headers go out at once, with
    the response id in ``X-Request-Id``, so a client can re-rank
    (``/admin/priority``) a stream still queued for its first token."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 request_id: str):
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                            (b"x-request-id", request_id.encode())]
        self.body_iterator, self.on_close = body, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        stream = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({stream, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not stream.done():
                stream.cancel()
            try:
                await stream
            except (asyncio.CancelledError, OSError):
                pass  # the client went away
            finally:
                await self.body_iterator.aclose()
                await self.on_close()


class _Guard:
    """ASGI middleware: bearer-token check and the structured access log."""

    def __init__(self, app: Starlette, config: ServerConfig):
        self.app, self.config = app, config
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        state = scope.setdefault("state", {})
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self._key is not None and scope["path"] not in OPEN_PATHS \
                    and not self._authorized(scope):
                err = APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                               code="invalid_api_key")
                await JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            ttft = state.get("ttft")
            access_log.info(json.dumps({
                "request_id": state.get("request_id"), "method": scope["method"],
                "path": scope["path"], "status": status or 499,
                "prompt_tokens": state.get("prompt_tokens"),
                "completion_tokens": state.get("completion_tokens"),
                "ttft_ms": None if ttft is None else round(ttft * 1e3, 2),
                "duration_ms": round((time.monotonic() - start) * 1e3, 2)}))

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(header, b"Bearer " + self._key)


def _key_client(request: Request) -> str | None:
    """The client of a request without a ``user`` (for fair scheduling): its API
    key, as ``key:`` and the first 16 hex digits of the key's SHA-256 (the key
    itself is never kept); None without a bearer token."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return KEY_CLIENT_PREFIX + hashlib.sha256(token.encode()).hexdigest()[:16]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def run_server(engine: AsyncEngine | AsyncCluster, config: ServerConfig, sock: socket.socket,
                     shutdown_timeout: float = 30.0,
                     on_ready: Callable[[str, int], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully (see module docstring)."""
    server = OpenAIServer(engine, config)
    uv = uvicorn.Server(uvicorn.Config(server.app, log_config=None, access_log=False,
                                       timeout_graceful_shutdown=shutdown_timeout,
                                       lifespan="on"))
    # uvicorn re-raises the signal it caught once it has shut down; a no-op
    # handler turns that into a normal return (exit status 0).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    while not uv.started and not task.done():
        await asyncio.sleep(0.05)
    if uv.started and on_ready is not None:
        host, port = sock.getsockname()[:2]
        on_ready(host, port)
    await task
