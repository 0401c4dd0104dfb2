"""The OpenAI-compatible HTTP server: a Starlette app over a `FrontEnd`
(`sluice.runtime.frontend`: one `AsyncEngine`, or a cluster of instances).

``OpenAIServer(engine, ServerConfig(...)).app`` is the ASGI app; ``run_server``
serves it with uvicorn until SIGTERM/SIGINT (``sluice serve`` calls it).

Endpoints: ``POST /v1/completions`` and ``/v1/chat/completions`` (JSON, or
server-sent events ending in ``data: [DONE]`` when ``stream`` is true),
``POST /v1/embeddings``, ``GET /v1/models[/{id}]``, ``POST /tokenize``,
``POST /detokenize``, ``GET /tokenizer_info`` (vLLM's, for lm-eval's remote
tokenizer), ``GET /health``, ``GET /version``, ``GET /metrics``
(Prometheus, see `sluice.runtime.metrics`), ``POST /admin/priority``
(``{"request_id": <a completion's id>, "priority": <int>}``: re-rank an
unfinished completion while it waits or runs; 404 if none has that id; a
stream's id is in its ``X-Request-Id`` header before the first token; under a
scheduling policy that ignores priorities (the front end's ``scheduling_policy``)
the response's ``warning`` says so). Schemas and the
request -> `SamplingParams` mapping live in `sluice.runtime.openai_protocol`. With
``tools``, chat responses carry the calls parsed from the text (`sluice.runtime.tool_calls`)
as ``message.tool_calls`` with ``finish_reason: "tool_calls"``, and streams send them as
``delta.tool_calls`` (each call's id and name as soon as the name is known, then its
arguments' text as it is decoded), so the client reassembles exactly the
non-streamed response's calls (one parser serves both).

Optional parts (the RAG routes: `sluice.rag.http.rag_part`) are mounted by
``OpenAIServer(engine, config, parts=[...])``, so the server imports none of them: a
`ServerPart` is called with a `ServerContext` (the front end, the served model name,
the server's endpoint wrapper and body reader), returns its routes, and may add hooks
to ``context.on_shutdown``, awaited before the engine stops.

Why these behaviours:

- Every error is an OpenAI error object (``{"error": {"message", "type",
  "param", "code"}}``) so clients raise their usual exceptions: 400 for bad
  input, 404 for an unknown model or route, 408 for a body not received within
  ``body_timeout_s``, 413 for a body over ``max_body_bytes`` (checked on the
  header and while reading), 401 when ``api_key`` is set and the bearer token
  is missing or wrong (the first ``Authorization`` header, scheme ``Bearer`` in
  any case, compared with `hmac.compare_digest`; ``/health``, ``/version`` and
  ``/metrics`` stay open, as in vLLM), 429 with ``Retry-After`` when admitting
  a request would put more than ``max_waiting`` sequences in the queue (each
  completion of each prompt, and each embedding input, is one; a completion
  waits from admission to its first token, an embedding input until it is
  computed; admitted requests are never dropped) and 400 for one that could
  never be admitted (more sequences than ``max_waiting``), 500 for engine
  failures and bugs.
- A client that disconnects, mid-stream or while a non-streamed request
  (completions, chat or embeddings) is still running, aborts its work, which
  frees its KV blocks; a disconnect while the body is uploading or before a
  non-streamed response is logged as status 499, without a traceback.
- A stream that fails mid-way (an engine error, or a reader cut off for
  leaving output unread longer than the engine's ``StreamLimits``) ends with
  an OpenAI error event ``data: {"error": {...}}``, then ``data: [DONE]``.
- Nothing heavy runs on the event loop: body parsing, tokenization, chat
  templating and the building of whole responses run on a small thread pool
  (so ``/health`` answers while a multi-megabyte prompt is tokenized), and a
  stream sends each step's delta, not the output so far.
- Connection limits (`connection_config`): keep-alive and header timeouts
  (a slow-loris connection is closed), a cap on concurrent connections and
  requests (503 past it, from uvicorn), and a cap on header size.
- Graceful shutdown: on SIGTERM uvicorn stops accepting connections and lets
  in-flight requests finish for ``shutdown_timeout`` seconds, then cancels them
  (which aborts them); the engine stops, and ``run_server`` returns normally so
  the process exits 0.
- One structured access-log line per request on the ``sluice.access`` logger:
  a JSON object (or ``key=value`` text, ``access_log_format="text"``) with id,
  method, path, status, prompt and completion tokens, time to first token and
  duration.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
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
from collections.abc import Sequence
from typing import Any, AsyncIterator, Awaitable, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from sluice.runtime import compiles
from sluice.runtime import openai_protocol as proto
from sluice.runtime.async_engine import OutputStream, StreamStalled
from sluice.runtime.frontend import FrontEnd
from sluice.runtime.metrics import CONTENT_TYPE, RequestTracker, ServerMetrics
from sluice.runtime.openai_protocol import APIError
from sluice.runtime.option_names import ACCESS_LOG_FORMATS
from sluice.runtime.outputs import CompletionOutput, RequestOutput, accumulate
from sluice.runtime.sampling_params import SamplingParams
from sluice.runtime.structured_output import compile_constraint
from sluice.scheduler.policies import PriorityPolicy
from sluice.runtime.tool_calls import ToolCalling, ToolCallStream

log = logging.getLogger(__name__)
access_log = logging.getLogger("sluice.access")

OPEN_PATHS = ("/health", "/version", "/metrics")
KEY_CLIENT_PREFIX = "key:"  # clients named by their API key: see _key_client


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on one request's inputs


@dataclasses.dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    max_waiting: int | None = None  # sequences; None: unbounded
    retry_after_s: int = 1
    body_timeout_s: float | None = 30.0  # the whole body must arrive within this (408)
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS
    access_log_format: str = "json"  # json | text
    # connections (uvicorn; see `connection_config`)
    timeout_keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    limit_concurrency: int | None = 1024  # connections + requests at once; 503 past it
    max_header_bytes: int = 16 << 10  # largest incomplete request head (h11), else 400
    metrics_compat: str | None = None  # "vllm": /metrics also under vLLM's names (metrics.py)

    def __post_init__(self) -> None:
        if self.access_log_format not in ACCESS_LOG_FORMATS:
            raise ValueError(f"access_log_format: must be one of {ACCESS_LOG_FORMATS}, "
                             f"got {self.access_log_format!r}")
        for name in ("body_timeout_s", "timeout_keep_alive_s", "header_timeout_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}: must be > 0, got {value}")
        for name in ("max_embedding_inputs", "limit_concurrency", "max_header_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")


@dataclasses.dataclass
class _Job:
    """One engine request (one prompt of an API request) and its bookkeeping."""

    request_id: str
    stream: OutputStream
    n: int
    response_id: str  # the API request's id (its response's ``id``)
    waiting: int  # completions admitted without a token yet (count against max_waiting)
    last: RequestOutput | None = None  # everything so far (the deltas accumulated)
    tracker: RequestTracker | None = None  # its metrics, observed as outputs arrive
    closed: bool = False


@dataclasses.dataclass
class _Sent:
    """What one streamed completion choice's chunks have carried so far."""

    started: bool = False  # its first chunk (the echoed prompt, prompt_logprobs) went out
    chars: int = 0  # characters of its generated text
    tokens: int = 0  # of its generated tokens
    offset: int = 0  # characters of text in all, echo included (the next text_offset)


Handler = Callable[[Request], Awaitable[Response]]


@dataclasses.dataclass
class ServerContext:
    """What a `ServerPart` is given to mount itself."""

    engine: Any  # the front end the server runs over (`OpenAIServer.engine`)
    model_name: str
    wrap: Callable[[Handler], Handler]  # the server's wrapper: APIError -> error object, ...
    read_body: Callable[[Request], Awaitable[bytes]]  # the size- and time-limited body
    on_shutdown: list[Callable[[], Awaitable[None]]] = dataclasses.field(default_factory=list)


# An optional part of the server (e.g. `sluice.rag.http.rag_part`): its routes.
ServerPart = Callable[[ServerContext], Sequence[Route]]


class OpenAIServer:
    def __init__(self, engine: FrontEnd, config: ServerConfig,
                 parts: Sequence[ServerPart] = ()):
        self.engine = engine
        self.config = config
        self.model = engine.model
        self.tokenizer = self.model.tokenizer
        self.max_model_len = engine.max_model_len
        self.metrics = ServerMetrics(config.model_name, config.metrics_compat,
                                     self.max_model_len)
        self.created = proto.now()
        self.num_waiting = 0  # sequences admitted and waiting (see max_waiting)
        self._live: dict[str, list[_Job]] = {}  # response id -> its unfinished jobs
        # Tokenization, templating, parsing and response building, off the event loop.
        self._work = concurrent.futures.ThreadPoolExecutor(2, "sluice-http")
        self._embedder = concurrent.futures.ThreadPoolExecutor(1, "sluice-embed")
        routes = [
            Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._endpoint(self.chat), methods=["POST"]),
            Route("/v1/embeddings", self._endpoint(self.embeddings), methods=["POST"]),
            Route("/v1/models", self._endpoint(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._endpoint(self.retrieve_model),
                  methods=["GET"]),
            Route("/tokenize", self._endpoint(self.tokenize), methods=["POST"]),
            Route("/detokenize", self._endpoint(self.detokenize), methods=["POST"]),
            Route("/tokenizer_info", self._endpoint(self.tokenizer_info), methods=["GET"]),
            Route("/health", self._endpoint(self.health), methods=["GET"]),
            Route("/version", self._endpoint(self.version), methods=["GET"]),
            Route("/metrics", self._endpoint(self.prometheus), methods=["GET"]),
            Route("/admin/priority", self._endpoint(self.set_priority), methods=["POST"]),
        ]
        context = ServerContext(engine, config.model_name, self._endpoint, self._body)
        for part in parts:
            routes += part(context)
        self._on_shutdown = context.on_shutdown
        app = Starlette(routes=routes, lifespan=self._lifespan,
                        exception_handlers={HTTPException: _http_exception})
        self.app = _Guard(app, config)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        compiles.mark_ready()  # from here on a compile stalls a request: count it as serving
        yield
        for hook in self._on_shutdown:
            await hook()
        await self.engine.shutdown()
        self._work.shutdown(wait=False, cancel_futures=True)
        self._embedder.shutdown(wait=False, cancel_futures=True)

    # -- plumbing -------------------------------------------------------------

    def _endpoint(self, handler: Callable[[Request], Awaitable[Response]]):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as e:
                return JSONResponse(e.body(), e.status, headers=e.headers)
            except ClientDisconnect:
                log.info("client disconnected while sending %s", request.url.path)
                return Response(status_code=499)
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
        timeout = self.config.body_timeout_s
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, f"request body not received within {timeout:g} s",
                           code="request_timeout") from None
        return b"".join(chunks)

    async def _offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the server's worker threads (CPU work off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._work, fn, *args)

    async def _parse(self, cls: type, request: Request) -> Any:
        return await self._offload(proto.parse, cls, await self._body(request))

    def _admit(self, sequences: int, param: str) -> None:
        """Reserve ``sequences`` waiting places (all or none): 429 when the queue is
        full now, 400 when the request could never fit."""
        limit = self.config.max_waiting
        if limit is not None:
            if sequences > limit:
                raise APIError(400, f"{param}: this request needs {sequences} sequences, "
                               f"more than the server ever queues (max_waiting={limit})",
                               param=param)
            if self.num_waiting + sequences > limit:
                raise APIError(429, f"server overloaded: {self.num_waiting} sequences waiting "
                               f"(limit {limit}); retry later", "rate_limit_error",
                               code="rate_limit_exceeded",
                               headers={"Retry-After": str(self.config.retry_after_s)})
        self.num_waiting += sequences

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")

    async def _start(self, request: Request, rid: str, prompts: list, params: SamplingParams,
                     req: proto.CompletionRequest | proto.ChatCompletionRequest,
                     prompt_param: str) -> list[_Job]:
        """Admit and queue one engine request per prompt (all or none)."""
        if req.conversation_id is not None and len(prompts) != 1:
            raise APIError(400, "conversation_id: needs a single prompt", param="conversation_id")
        if req.user is not None and req.user.startswith(KEY_CLIENT_PREFIX):
            raise APIError(400, f"user: must not start with {KEY_CLIENT_PREFIX!r} (reserved "
                           "for clients named by their API key)", param="user")
        client = req.user or _key_client(request)
        # A conversation is the client's own: ids of different clients never share KV.
        conversation = None if req.conversation_id is None else \
            json.dumps([client or "", req.conversation_id])
        self._admit(len(prompts) * params.n, "n" if params.n > 1 else prompt_param)
        unowned = len(prompts) * params.n  # reserved places no job holds yet
        jobs: list[_Job] = []
        try:
            for i, prompt in enumerate(prompts):
                job_id = rid if len(prompts) == 1 else f"{rid}-{i}"
                stream = await self.engine.generate(prompt, params, request_id=job_id,
                                                    priority=req.priority, client=client,
                                                    conversation=conversation, delta=True)
                jobs.append(_Job(job_id, stream, params.n, rid, params.n))
                unowned -= params.n
        except BaseException as e:
            self.num_waiting -= unowned
            await self._close(jobs)
            if not isinstance(e, ValueError):
                raise
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
            self.num_waiting -= job.waiting
            job.waiting = 0
            if job.last is None or not job.last.finished:
                await self.engine.abort(job.request_id)
                self.metrics.observe_aborted(job.n)
            if job.stream.stalled:
                self.metrics.observe_stalled()

    async def _outputs(self, jobs: list[_Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(job index, delta output) from all jobs as they arrive; a failed stream
        is a 500 `APIError` naming the cause."""
        try:
            async for item in self._merged(jobs):
                yield item
        except APIError:
            raise
        except StreamStalled as e:
            raise APIError(408, str(e), "timeout_error", code="stream_stalled") from e
        except Exception as e:
            raise APIError(500, str(e), "server_error") from e

    async def _merged(self, jobs: list[_Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(jobs) == 1:
            async for out in jobs[0].stream:
                yield 0, self._seen(jobs[0], out)
            return
        # One slot: a pump waits while the reader is behind, so unread output stays
        # in the engine's bounded streams (where a stalled reader is noticed).
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)

        async def pump(i: int, job: _Job) -> None:
            try:
                async for out in job.stream:
                    await queue.put((i, out))
            except Exception as e:
                await queue.put((i, e))
            await queue.put((i, None))

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
        """Fold a delta into the job's whole output; returns the delta."""
        job.last = accumulate(job.last, out)
        waiting = sum(1 for c in job.last.outputs
                      if not c.token_ids and c.finish_reason is None)
        self.num_waiting -= job.waiting - waiting
        job.waiting = waiting
        job.tracker = job.tracker or self.metrics.track()
        job.tracker.update(job.last)
        return out

    async def _until_disconnect(self, request: Request, work: Awaitable[Response],
                                close: Callable[[], Awaitable[None]]) -> Response:
        """Run a non-streamed request, then ``close()``; if the client goes away
        first, the work is cancelled (``close`` aborts what it started)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})  # until the cancellation has run (no result)
            await close()
        if task.cancelled():
            log.info("client disconnected before the response to %s", request.url.path)
            return Response(status_code=499)  # nginx's "client closed request"
        return task.result()

    def _usage_state(self, request: Request, prompt_tokens: int, completion_tokens: int,
                     ttft: float | None) -> None:
        request.state.prompt_tokens = prompt_tokens
        request.state.completion_tokens = completion_tokens
        request.state.ttft = ttft

    # -- generation -----------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        req = await self._parse(proto.CompletionRequest, request)
        self._check_model(req.model)
        params = req.sampling_params(self.max_model_len)
        await self._offload(self._compile, req, params)
        prompts = req.prompts()
        rid = proto.new_id("cmpl")
        jobs = await self._start(request, rid, prompts, params, req, "prompt")
        created = proto.now()
        if req.stream:
            return _SSEResponse(self._completion_chunks(request, req, jobs, rid, created),
                                lambda: self._close(jobs), rid)
        return await self._until_disconnect(request, self._completion_full(
            request, req, jobs, rid, created), lambda: self._close(jobs))

    def _compile(self, req: proto.CompletionRequest | proto.ChatCompletionRequest,
                 params: SamplingParams) -> None:
        """Compile the request's constraint now, off the event loop and before the
        engine steps it (`compile_constraint`): a grammar llguidance cannot build is a
        400 naming the field the client sent."""
        if params.structured_outputs is None:
            return
        try:
            compile_constraint(self.tokenizer, self.model.config.vocab_size,
                               self.model.eos_token_ids, params.structured_outputs)
        except ValueError as e:
            field = req.constraint()[1] or "tools"
            raise APIError(400, f"{field}: {str(e).split(': ', 1)[-1]}", param=field) from None

    async def _completion_full(self, request: Request, req: proto.CompletionRequest,
                               jobs: list[_Job], rid: str, created: int) -> Response:
        start, ttft = time.monotonic(), None
        async for _ in self._outputs(jobs):
            ttft = ttft if ttft is not None else time.monotonic() - start
        outs = [job.last for job in jobs]
        prompt_tokens = sum(len(out.prompt_token_ids) for out in outs)
        completion_tokens = 0 if req.max_tokens == 0 else sum(  # max_tokens 0: dropped
            len(c.token_ids) for out in outs for c in out.outputs)
        self._usage_state(request, prompt_tokens, completion_tokens, ttft)
        return await self._offload(self._completion_response, req, outs, rid, created,
                                   prompt_tokens, completion_tokens)

    def _completion_response(self, req: proto.CompletionRequest, outs: list[RequestOutput],
                             rid: str, created: int, prompt_tokens: int,
                             completion_tokens: int) -> Response:
        """The whole completion response, rendered (on a worker thread: it can be large)."""
        choices = []
        for j, out in enumerate(outs):
            for comp in out.outputs:
                choice = {"index": j * req.n + comp.index,
                          **self._completion_choice(req, out, comp),
                          "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason}
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = proto.prompt_logprobs(
                        self.tokenizer, out.prompt_logprobs, req.prompt_logprobs)
                choices.append(choice)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                             "model": self.config.model_name, "choices": choices,
                             "usage": proto.usage(prompt_tokens, completion_tokens),
                             "system_fingerprint": None})

    def _completion_choice(self, req: proto.CompletionRequest, out: RequestOutput,
                           comp: CompletionOutput) -> dict[str, Any]:
        """A choice's text and logprobs: with ``echo``, the prompt's first (and with
        ``max_tokens`` 0 only the prompt: the one token generated is dropped)."""
        text, lps = (comp.text, comp.logprobs) if req.max_tokens != 0 else ("", [])
        if not req.echo:
            return {"text": text, "logprobs": None if lps is None else
                    proto.completion_logprobs(self.tokenizer, lps, 0)}
        prompt, prompt_lps = self._echo(req, out)
        return {"text": prompt + text, "logprobs": None if prompt_lps is None else
                proto.join_logprobs(prompt_lps, proto.completion_logprobs(
                    self.tokenizer, lps, len(prompt)))}

    def _echo(self, req: proto.CompletionRequest, out: RequestOutput
              ) -> tuple[str, dict[str, list] | None]:
        """The echoed prompt's text (as sent, or a token prompt decoded) and, with
        ``logprobs``, its part of the choice's ``logprobs`` object."""
        prompt = out.prompt if out.prompt is not None else self.tokenizer.decode(
            out.prompt_token_ids, skip_special_tokens=False)
        return prompt, None if req.logprobs is None else proto.echo_logprobs(
            self.tokenizer, out.prompt_token_ids, out.prompt_logprobs, req.logprobs, out.prompt)

    async def _completion_chunks(self, request: Request, req: proto.CompletionRequest,
                                 jobs: list[_Job], rid: str, created: int
                                 ) -> AsyncIterator[bytes]:
        """The streamed completion. Each choice's chunks are cut from its job's
        accumulated output (``_Job.last``): the first, once the choice has something
        to send and its prompt's log-probs (if asked for) are in, carries the echoed
        prompt and ``prompt_logprobs``; with ``max_tokens`` 0 that one chunk (the
        prompt alone) is sent when the choice ends."""
        head = {"id": rid, "object": "text_completion", "created": created,
                "model": self.config.model_name}
        extra = {"usage": None} if req.include_usage else {}
        sent: dict[int, _Sent] = {}  # choice -> what its chunks have carried so far
        done: set[int] = set()
        start, ttft = time.monotonic(), None
        async for j, _ in self._outputs(jobs):
            ttft = ttft if ttft is not None else time.monotonic() - start
            whole = jobs[j].last
            for comp in whole.outputs:
                idx = j * req.n + comp.index
                if idx in done:
                    continue
                state = sent.setdefault(idx, _Sent())
                if state.started or not (req.echo or req.prompt_logprobs is not None):
                    choice = self._stream_choice(req, whole, comp, state)
                else:  # the prompt's part (decoding every prompt token): off the event loop
                    choice = await self._offload(self._stream_choice, req, whole, comp, state)
                if choice is None:
                    continue
                if comp.finish_reason is not None:
                    done.add(idx)
                yield proto.sse({**head, "choices": [{"index": idx, **choice}], **extra})
        prompt_tokens = sum(len(job.last.prompt_token_ids) for job in jobs)
        completion_tokens = 0 if req.max_tokens == 0 else sum(  # max_tokens 0: dropped
            len(c.token_ids) for job in jobs for c in job.last.outputs)
        self._usage_state(request, prompt_tokens, completion_tokens, ttft)
        if req.include_usage:
            yield proto.sse({**head, "choices": [],
                             "usage": proto.usage(prompt_tokens, completion_tokens)})
        yield proto.SSE_DONE

    def _stream_choice(self, req: proto.CompletionRequest, whole: RequestOutput,
                       comp: CompletionOutput, sent: _Sent) -> dict[str, Any] | None:
        """The next chunk's choice body for ``comp``: everything since ``sent``
        (which it advances), or None while there is nothing to send yet."""
        first = not sent.started
        scoring = (req.echo and req.logprobs is not None) or req.prompt_logprobs is not None
        if first and scoring and whole.prompt_logprobs is None and not whole.finished:
            return None  # the prompt's log-probs come with a later output
        generated = req.max_tokens != 0
        text = comp.text[sent.chars:] if generated else ""
        new_tokens = len(comp.token_ids) > sent.tokens and generated
        if not text and not new_tokens and comp.finish_reason is None:
            return None
        lps = comp.logprobs[sent.tokens:] if generated and comp.logprobs is not None else []
        prompt, prompt_lps = self._echo(req, whole) if first and req.echo else ("", None)
        logprobs = None
        if req.logprobs is not None:
            logprobs = proto.completion_logprobs(self.tokenizer, lps, sent.offset + len(prompt))
            if prompt_lps is not None:
                logprobs = proto.join_logprobs(prompt_lps, logprobs)
        body = {"text": prompt + text, "logprobs": logprobs,
                "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason}
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = None if not first else proto.prompt_logprobs(
                self.tokenizer, whole.prompt_logprobs or [], req.prompt_logprobs)
        sent.started, sent.chars, sent.tokens = True, len(comp.text), len(comp.token_ids)
        sent.offset += len(body["text"])
        return body

    async def chat(self, request: Request) -> Response:
        req = await self._parse(proto.ChatCompletionRequest, request)
        self._check_model(req.model)
        params = req.sampling_params(self.max_model_len)
        await self._offload(self._compile, req, params)
        tools = req.tool_calling(self.tokenizer.chat_template_for(req.template_tools()))
        prompt = {"prompt_token_ids": await self._offload(req.render, self.tokenizer)}
        rid = proto.new_id("chatcmpl")
        jobs = await self._start(request, rid, [prompt], params, req, "messages")
        created = proto.now()
        if req.stream:
            return _SSEResponse(self._chat_chunks(request, req, jobs[0], rid, created, tools),
                                lambda: self._close(jobs), rid)
        return await self._until_disconnect(request, self._chat_full(
            request, req, jobs[0], rid, created, tools), lambda: self._close(jobs))

    async def _chat_full(self, request: Request, req: proto.ChatCompletionRequest, job: _Job,
                         rid: str, created: int, tools: ToolCalling | None = None
                         ) -> Response:
        start, ttft = time.monotonic(), None
        async for _ in self._outputs([job]):
            ttft = ttft if ttft is not None else time.monotonic() - start
        out = job.last
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        self._usage_state(request, len(out.prompt_token_ids), completion_tokens, ttft)
        return await self._offload(self._chat_response, req, out, rid, created,
                                   completion_tokens, tools)

    def _chat_response(self, req: proto.ChatCompletionRequest, out: RequestOutput, rid: str,
                       created: int, completion_tokens: int,
                       tools: ToolCalling | None = None) -> Response:
        """The whole chat response, rendered (on a worker thread: it can be large);
        with ``tools``, calls found in the text become ``message.tool_calls``; with
        ``prompt_logprobs``, vLLM's top-level ``prompt_logprobs`` (of the rendered
        conversation's tokens)."""
        choices = []
        for c in out.outputs:
            content, calls = tools.parse(c.text) if tools is not None else (c.text, [])
            choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": content, "refusal": None,
                            "tool_calls": [call.to_openai() for call in calls]},
                "logprobs": None if c.logprobs is None else proto.chat_logprobs(
                    self.tokenizer, c.logprobs),
                "finish_reason": "tool_calls" if calls and c.finish_reason == "stop"
                else c.finish_reason, "stop_reason": c.stop_reason})
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                             "model": self.config.model_name, "choices": choices,
                             "usage": proto.usage(len(out.prompt_token_ids), completion_tokens),
                             "system_fingerprint": None,
                             "prompt_logprobs": None if req.prompt_logprobs is None else
                             proto.prompt_logprobs(self.tokenizer, out.prompt_logprobs,
                                                   req.prompt_logprobs)})

    async def _chat_chunks(self, request: Request, req: proto.ChatCompletionRequest, job: _Job,
                           rid: str, created: int, tools: ToolCalling | None = None
                           ) -> AsyncIterator[bytes]:
        """The streamed chat response; with ``tools``, each choice's text goes through
        a `ToolCallStream`, so calls arrive as ``delta.tool_calls``."""
        head = {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": self.config.model_name, "system_fingerprint": None}
        extra = {"usage": None} if req.include_usage else {}
        for i in range(req.n):
            yield proto.sse({**head, "choices": [{
                "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}], **extra})
        done: set[int] = set()
        streams = {i: ToolCallStream(tools) for i in range(req.n)} if tools else {}
        texts = dict.fromkeys(range(req.n), "")
        start, ttft = time.monotonic(), None
        async for _, out in self._outputs([job]):
            ttft = ttft if ttft is not None else time.monotonic() - start
            for comp in out.outputs:
                if comp.index in done or not (comp.token_ids or comp.delta
                                              or comp.finish_reason):
                    continue
                if comp.finish_reason is not None:
                    done.add(comp.index)
                lps = None if comp.logprobs is None else proto.chat_logprobs(
                    self.tokenizer, comp.logprobs)
                finish = comp.finish_reason
                if tools is not None:
                    texts[comp.index] += comp.delta
                    stream = streams[comp.index]
                    delta = stream.update(texts[comp.index], finish is not None)
                    if stream.called and finish == "stop":
                        finish = "tool_calls"
                    if not delta and finish is None and lps is None:
                        continue  # held back: it may begin a call
                else:
                    delta = {"content": comp.delta} if comp.delta or finish is None else {}
                yield proto.sse({**head, "choices": [{
                    "index": comp.index, "delta": delta, "logprobs": lps,
                    "finish_reason": finish, "stop_reason": comp.stop_reason}],
                    **extra})
        prompt_tokens = len(job.last.prompt_token_ids)
        completion_tokens = sum(len(c.token_ids) for c in job.last.outputs)
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
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary "
                           f"[0, {vocab})", param=param)
        return ids

    async def embeddings(self, request: Request) -> Response:
        """Embeddings, admitted like generation (each input is one waiting sequence
        until computed), at most ``max_embedding_inputs`` inputs, one forward at a
        time beside the engine; a client that goes away stops the remaining inputs."""
        req = await self._parse(proto.EmbeddingRequest, request)
        self._check_model(req.model)
        hidden = self.model.config.hidden_size
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
        cap = self.config.max_embedding_inputs
        if len(inputs) > cap:
            raise APIError(400, f"input: at most {cap} inputs per request, got {len(inputs)}",
                           param="input")
        seqs = await self._offload(self._embedding_inputs, inputs)
        self._admit(len(seqs), "input")
        left = [len(seqs)]  # waiting places still held

        async def release() -> None:
            self.num_waiting -= left[0]
            left[0] = 0

        return await self._until_disconnect(request, self._embed(request, req, seqs, left),
                                            release)

    def _embedding_inputs(self, inputs: list) -> list[list[int]]:
        seqs = [self._token_ids(x, "input") for x in inputs]
        for ids in seqs:
            if len(ids) > self.max_model_len:
                raise APIError(400, f"input: {len(ids)} tokens exceed max_model_len="
                               f"{self.max_model_len}", param="input")
        return seqs

    async def _embed(self, request: Request, req: proto.EmbeddingRequest,
                     seqs: list[list[int]], left: list[int]) -> Response:
        loop = asyncio.get_running_loop()
        vectors = []
        for ids in seqs:  # one at a time: a cancelled request stops between inputs
            vectors.append(await loop.run_in_executor(self._embedder, self.engine.embed, ids))
            left[0] -= 1
            self.num_waiting -= 1
        total = sum(len(s) for s in seqs)
        request.state.prompt_tokens = total
        return await self._offload(self._embedding_response, req, vectors, total)

    def _embedding_response(self, req: proto.EmbeddingRequest, vectors: list,
                            total: int) -> Response:
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                 if req.encoding_format == "base64" else v.tolist()}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": self.config.model_name,
                             "usage": {"prompt_tokens": total, "total_tokens": total}})

    def _model_card(self) -> dict[str, Any]:
        name = self.config.model_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "sluice",
                "root": name, "parent": None, "max_model_len": self.max_model_len}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request: Request) -> Response:
        self._check_model(request.path_params["model"])
        return JSONResponse(self._model_card())

    async def tokenize(self, request: Request) -> Response:
        req = await self._parse(proto.TokenizeRequest, request)
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "exactly one of prompt and messages must be given",
                           param="prompt")
        return await self._offload(self._tokenize_response, req)

    def _tokenize_response(self, req: proto.TokenizeRequest) -> Response:
        if req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids = proto.ChatPrompt(messages=req.messages,
                                   add_generation_prompt=req.add_generation_prompt
                                   ).render(self.tokenizer)
        return JSONResponse({"count": len(ids), "max_model_len": self.max_model_len,
                             "tokens": ids, "token_strs": None})

    async def detokenize(self, request: Request) -> Response:
        req = await self._parse(proto.DetokenizeRequest, request)
        self._check_model(req.model)
        return await self._offload(self._detokenize_response, req)

    def _detokenize_response(self, req: proto.DetokenizeRequest) -> Response:
        ids = self._token_ids(req.tokens, "tokens") if req.tokens else []
        return JSONResponse({"prompt": self.tokenizer.decode(ids)})

    async def tokenizer_info(self, request: Request) -> Response:
        """vLLM's ``GET /tokenizer_info``: the special tokens, context length and chat
        template, which lm-eval's ``tokenizer_backend=remote`` reads before it
        tokenizes through ``/tokenize`` and ``/detokenize``."""
        tok = self.tokenizer
        return JSONResponse({"tokenizer_class": type(tok.hf).__name__,
                             "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                             "pad_token": None, "model_max_length": self.max_model_len,
                             "chat_template": tok.chat_template})

    async def set_priority(self, request: Request) -> Response:
        """Re-rank every unfinished engine request of a completion (all its prompts)."""
        req = await self._parse(proto.PriorityRequest, request)
        jobs = [j for j in self._live.get(req.request_id, []) if not j.closed]
        # (``priority`` is a strict int here, so the engine's own check cannot fail)
        changed = [j.request_id for j in jobs
                   if await self.engine.set_priority(j.request_id, req.priority)]
        if not changed:
            raise APIError(404, f"no unfinished request has id {req.request_id!r}",
                           param="request_id", code="request_not_found")
        body = {"request_id": req.request_id, "priority": req.priority,
                "engine_requests": changed}
        policy = self.engine.scheduling_policy
        if policy not in (None, PriorityPolicy.name):
            body["warning"] = (f"scheduling policy {policy!r} ignores priorities: the order "
                               f"does not change (serve with --scheduling-policy "
                               f"{PriorityPolicy.name})")
        return JSONResponse(body)

    async def health(self, request: Request) -> Response:
        """200 while some engine (instance) takes requests, else 503 saying why."""
        health = self.engine.health()
        if health.ok:
            return Response(status_code=200)
        return JSONResponse({"status": "unavailable", **dataclasses.asdict(health)}, 503)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": importlib.metadata.version("sluice-serve")})

    async def prometheus(self, request: Request) -> Response:
        # under --instances the global scheduler's per-instance and migration figures too
        return Response(await self._offload(self.metrics.render, self.engine.stats(),
                                            self.engine.health(),
                                            getattr(self.engine, "cluster", None)),
                        media_type=CONTENT_TYPE)


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
        self.body_iterator, self.on_close, self.request_id = body, on_close, request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            try:
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
            except Exception as e:  # mid-stream: an error event, then the end
                err = e if isinstance(e, APIError) else APIError(
                    500, "internal server error", "server_error")
                if not isinstance(e, APIError):
                    log.exception("stream failed")
                else:
                    log.warning("stream %s failed: %s", self.request_id, err.message)
                await send({"type": "http.response.body", "more_body": True,
                            "body": proto.sse(err.body()) + proto.SSE_DONE})
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
        self._format = _access_json if config.access_log_format == "json" else _access_text

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
            if access_log.isEnabledFor(logging.INFO):
                ttft = state.get("ttft")
                access_log.info(self._format({
                    "request_id": state.get("request_id"), "method": scope["method"],
                    "path": scope["path"], "status": status or 499,
                    "prompt_tokens": state.get("prompt_tokens"),
                    "completion_tokens": state.get("completion_tokens"),
                    "ttft_ms": None if ttft is None else round(ttft * 1e3, 2),
                    "duration_ms": round((time.monotonic() - start) * 1e3, 2)}))

    def _authorized(self, scope: Scope) -> bool:
        token = bearer_token(scope["headers"])
        return token is not None and hmac.compare_digest(token, self._key)


def _access_json(fields: dict[str, Any]) -> str:
    return json.dumps(fields)


def _access_text(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the request's first ``Authorization`` header if its scheme is
    Bearer (in any case); None otherwise. The one reading of the header: the key
    check and the client name (`_key_client`) never disagree on duplicates."""
    value = next((v for k, v in headers if k == b"authorization"), None)
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


def _key_client(request: Request) -> str | None:
    """The client of a request without a ``user`` (for fair scheduling): its API
    key, as ``key:`` and the first 16 hex digits of the key's SHA-256 (the key
    itself is never kept); None without a bearer token."""
    token = bearer_token(request.scope["headers"])
    if token is None:
        return None
    return KEY_CLIENT_PREFIX + hashlib.sha256(token).hexdigest()[:16]


def connection_config(app: Any, config: ServerConfig, **kw: Any) -> uvicorn.Config:
    """uvicorn settings with the server's connection limits: keep-alive and
    header timeouts, the concurrency cap and the largest request head."""
    class Protocol(_HeaderTimeoutH11):
        header_timeout_s = config.header_timeout_s

    return uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                          http=Protocol, timeout_keep_alive=config.timeout_keep_alive_s,
                          limit_concurrency=config.limit_concurrency,
                          h11_max_incomplete_event_size=config.max_header_bytes, **kw)


class _HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose next request's headers
    have not all arrived ``header_timeout_s`` after it opened or after its last
    response (uvicorn's keep-alive timer stops at the first byte, so a client
    trickling a header would hold the connection forever)."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._arm_header_timer()
        super().on_response_complete()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers arrived
            self._disarm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def run_server(engine: FrontEnd, config: ServerConfig, sock: socket.socket,
                     shutdown_timeout: float = 30.0,
                     on_ready: Callable[[str, int], None] | None = None,
                     parts: Sequence[ServerPart] = ()) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully (see module docstring)."""
    server = OpenAIServer(engine, config, parts)
    uv = uvicorn.Server(connection_config(server.app, config,
                                          timeout_graceful_shutdown=shutdown_timeout))
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
