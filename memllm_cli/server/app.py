"""memllm's HTTP API (FastAPI): an OpenAI-compatible chat API over memories, and memllm's own
JSON API for what the commands do.

    GET  /v1/models                        every memory, as the model "memllm/<name>"
    POST /v1/chat/completions              the last user message is the question; stream: SSE
    GET  /api/memories                     memllm list
    GET  /api/memories/{name}/status       memllm status
    POST /api/memories/{name}/ingest       text documents (JSON, text/plain or multipart files)
    POST /api/memories/{name}/ask          memllm ask --json
    GET  /api/memories/{name}/log          memllm log
    POST /api/memories/{name}/snapshot     memllm snapshot
    POST /api/memories/{name}/rollback     memllm snapshot rollback
    GET  /api/memories/{name}/diff         memllm diff
    POST /api/memories/{name}/forget       memllm forget
    POST /api/memories/{name}/verify       memllm verify
    GET  /docs, /openapi.json              the framework's OpenAPI pages

Errors are OpenAI's shape everywhere, `{"error": {"message", "type", "param", "code"}}`, with
the CLI's exit code as `code` for memllm's own errors. Blocking work (a model, a forward pass,
the store) runs in worker threads; a streamed answer stops generating when its client goes.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MemllmError, MemoryNotFound
from ..service.hub import Hub
from ..service.session import Stop
from ..text.sources import Document

log = logging.getLogger("memllm.serve")

PREFIX = "memllm/"  # an OpenAI model id names a memory: "memllm/notes"
MAX_BODY = 16 * 1024 * 1024  # bytes a request body may have (ingest text, chat messages)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: Any = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def error_body(message: str, kind: str, code: Any = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request bodies ----------------------------------------------------------------------

class Message(BaseModel):
    role: str
    content: str | list[dict] | None = None


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None


class AskRequest(BaseModel):
    question: str
    max_tokens: int = Field(default=256, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    budget: int | None = Field(default=None, ge=0)
    stream: bool = Field(default=False, description='server-sent events: {"piece"} each, then {"done": answer}')


class TextDocument(BaseModel):
    name: str
    text: str


class IngestRequest(BaseModel):
    documents: list[TextDocument] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list, description="files, folders or globs on the server's disk, "
                             "absolute (local socket only); '-' is `stdin`")
    stdin_base64: str | None = Field(default=None, description="the bytes '-' in paths stands for, base64")
    name: str | None = Field(default=None, description="the name of stdin's document")
    force: bool = False
    sync: bool = False
    id: str | None = Field(default=None, description="names the ingest for POST /api/ingests/{id}/stop")


class StopRequest(BaseModel):
    signal: str = "SIGINT"


class SnapshotRequest(BaseModel):
    tag: str | None = None
    message: str = ""


class RollbackRequest(BaseModel):
    target: str
    dry_run: bool = False


class ForgetRequest(BaseModel):
    sources: list[str] = Field(min_length=1)
    purge: bool = False


# -- the app ---------------------------------------------------------------------------------

def create_app(hub: Hub, *, api_key: str | None = None, local: Callable[[Request], bool] | None = None) -> FastAPI:
    """The API over a hub's memories. `api_key`: required as `Authorization: Bearer` (but on
    the Unix socket); `local(request)`: whether a request came over the Unix socket."""
    app = FastAPI(title="memllm", summary="A language model's memory that keeps learning (MemoryLLM)")
    local = local or (lambda request: False)
    stops: dict[str, Stop] = {}  # ingests in flight: shutdown asks them to stop at a chunk boundary
    app.state.stops = stops

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        try:
            if api_key is not None and not local(request):
                scheme, _, sent = request.headers.get("authorization", "").strip().partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), api_key.encode()):
                    raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error",
                                   "invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
            response = await call_next(request)
            if response.status_code == 400 and request.scope.get("state", {}).get("too_large"):
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
        except Exception as raised:  # noqa: BLE001 - an ApiError (maybe in a task group), else a bug: a 500
            err = api_error_in(raised)
            if err is not None:
                response = JSONResponse(error_body(err.message, err.kind, err.code, err.param), status_code=err.status)
            else:  # one line here, the client gets a 500, the server goes on
                log.error("%s %s failed: %s: %s", request.method, request.url.path, type(raised).__name__, raised,
                          exc_info=bool(os.environ.get("MEMLLM_DEBUG")))
                response = JSONResponse(error_body(f"internal error: {type(raised).__name__}: {raised}",
                                                   "server_error"), status_code=500)
        log.info("%s %s %d %.3fs", request.method, request.url.path, response.status_code,
                 time.perf_counter() - started)
        return response

    app.add_middleware(BodyLimit, limit=MAX_BODY)  # outermost: counts what the handlers read

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse(error_body(err.message, err.kind, err.code, err.param), status_code=err.status)

    @app.exception_handler(MemllmError)
    async def memllm_error(request: Request, err: MemllmError):
        status = err.http_status
        kind = "not_found_error" if status == 404 else "server_error" if status >= 500 else "invalid_request_error"
        body = error_body(err.message, kind, err.exit_code)
        if err.hint:
            body["error"]["hint"] = err.hint  # what the CLI prints after the message
        return JSONResponse(body, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = {401: "authentication_error", 404: "not_found_error"}.get(err.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(err.detail), kind, err.status_code), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("the body is not valid JSON", "invalid_request_error", "invalid_json"),
                                status_code=400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request body")
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_body", where or None),
                            status_code=400)

    def session(name: str):
        return hub.session(name)

    def existing(name: str):
        found = session(name)
        if not found.repo.exists():
            known = hub.memories()
            hint = "known memories: " + ", ".join(known) if known else "nothing has been ingested yet"
            raise MemoryNotFound(f"no memory named {name!r}", hint=hint)
        return found

    # -- OpenAI-compatible ---------------------------------------------------------------

    @app.get("/v1/models")
    async def models():
        names = await run_in_threadpool(hub.memories)
        return {"object": "list", "data": [{"id": PREFIX + n, "object": "model", "created": 0, "owned_by": "memllm"}
                                           for n in names]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        name = body.model.removeprefix(PREFIX)
        question = last_user_message(body.messages)
        limit = body.max_completion_tokens or body.max_tokens or 256
        mem = await run_in_threadpool(existing, name)
        answer = await run_in_threadpool(lambda: mem.ask(question, max_new_tokens=limit,
                                                         temperature=body.temperature, top_p=body.top_p,
                                                         seed=body.seed))
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": body.model}
        if not body.stream:
            text = await run_in_threadpool(lambda: "".join(answer))
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                                 "finish_reason": finish(answer, limit)}],
                    "usage": usage(mem, question, answer), "memllm": extension(answer)}

        stream = await Pieces(answer, request).start()

        async def events() -> AsyncIterator[str]:
            chunk = {**head, "object": "chat.completion.chunk"}
            yield sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
            async for piece in stream:
                yield sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            yield sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish(answer, limit)}],
                       "usage": usage(mem, question, answer), "memllm": extension(answer)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- memllm's own ----------------------------------------------------------------------

    @app.get("/api/memories")
    async def list_memories():
        return await run_in_threadpool(lambda: session("default").list_memories())

    @app.get("/api/memories/{name}/status")
    async def status(name: str):
        return await run_in_threadpool(lambda: existing(name).status())

    @app.post("/api/memories/{name}/ask")
    async def ask(name: str, body: AskRequest, request: Request):
        def start():
            return existing(name).ask(body.question, max_new_tokens=body.max_tokens, temperature=body.temperature,
                                      top_p=body.top_p, top_k=body.top_k, seed=body.seed, budget=body.budget)

        answer = await run_in_threadpool(start)
        if not body.stream:
            await run_in_threadpool(lambda: "".join(answer))
            return answer.to_dict()

        stream = await Pieces(answer, request).start()

        async def events() -> AsyncIterator[str]:
            async for piece in stream:
                yield sse({"piece": piece})
            yield sse({"done": answer.to_dict()})

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/api/memories/{name}/ingest")
    async def ingest(name: str, request: Request):
        body = await ingest_body(request, local(request))
        stop = Stop()
        key = body.id or f"ingest-{id(stop)}"
        if key in stops:
            raise ApiError(409, f"an ingest named {key!r} is running", param="id")
        stops[key] = stop
        try:
            def run() -> dict:
                target = session(name)
                if body.paths:
                    stdin = io.BytesIO(base64.b64decode(body.stdin_base64)) if body.stdin_base64 is not None else None
                    return target.ingest(body.paths, stdin=stdin, name=body.name, force=body.force, sync=body.sync,
                                         stop=stop).to_dict()
                documents = [Document.of(d.name, d.text) for d in body.documents]
                return target.ingest_documents(documents, force=body.force, sync=body.sync, stop=stop).to_dict()

            return await run_in_threadpool(run)
        finally:
            stops.pop(key, None)

    @app.post("/api/ingests/{key}/stop")
    async def stop_ingest(key: str, body: StopRequest):
        """Ask a running ingest to stop at its next chunk boundary and commit (what Ctrl-C does)."""
        stop = stops.get(key)
        if stop is None:
            raise ApiError(404, f"no ingest named {key!r} is running", "not_found_error")
        stop.requested = stop.requested or body.signal
        return {"stopping": key}

    @app.get("/api/memories/{name}/log")
    async def history(name: str, limit: int | None = Query(default=None, ge=1)):
        return await run_in_threadpool(lambda: existing(name).log(limit))

    @app.post("/api/memories/{name}/snapshot")
    async def snapshot(name: str, body: SnapshotRequest):
        return await run_in_threadpool(lambda: existing(name).snapshot_create(body.tag, body.message))

    @app.post("/api/memories/{name}/rollback")
    async def rollback(name: str, body: RollbackRequest):
        return await run_in_threadpool(lambda: existing(name).rollback(body.target, dry_run=body.dry_run))

    @app.get("/api/memories/{name}/diff")
    async def diff(name: str, a: str = "HEAD~1", b: str = "HEAD"):
        return await run_in_threadpool(lambda: existing(name).diff(a, b))

    @app.post("/api/memories/{name}/forget")
    async def forget(name: str, body: ForgetRequest):
        return await run_in_threadpool(lambda: existing(name).forget(body.sources, purge=body.purge))

    @app.post("/api/memories/{name}/verify")
    async def verify(name: str):
        return await run_in_threadpool(lambda: existing(name).verify())

    return app


# -- helpers -----------------------------------------------------------------------------

def api_error_in(raised: BaseException) -> ApiError | None:
    """The ApiError raised, also from inside the exception groups of the middleware's tasks."""
    if isinstance(raised, ApiError):
        return raised
    if isinstance(raised, BaseExceptionGroup):
        for inner in raised.exceptions:
            if (found := api_error_in(inner)) is not None:
                return found
    return None


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes, declared or sent in chunks, is a 413 (an
    ApiError raised while the handler reads it, so the guard answers in OpenAI's shape)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # FastAPI turns what its body parser meets into a 400: the flag says why
                    scope.setdefault("state", {})["too_large"] = True
                    raise ApiError(413, f"the request body is over {self.limit} bytes", code="request_too_large")
            return message

        await self.app(scope, counted, send)


def last_user_message(messages: list[Message]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            content = message.content
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "\n".join(part.get("text", "") for part in content if part.get("type") == "text")
            if content and content.strip():
                return content
            break
    raise ApiError(400, "the last user message (the question) is missing or empty", param="messages")


def finish(answer, limit: int) -> str:
    return "length" if len(answer.ids) >= limit else "stop"


def usage(mem, question: str, answer) -> dict:
    asked = len(mem.model().tokenizer(question, add_special_tokens=False)["input_ids"])
    prompt = asked + int(answer.info.get("read_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": len(answer.ids), "total_tokens": prompt + len(answer.ids)}


def extension(answer) -> dict:
    """What memllm adds to an OpenAI answer: what it read and whether that supports the answer."""
    keep = ("memory", "read_tokens", "read_cap", "sources", "grounded", "damaged")
    return {k: answer.info[k] for k in keep if k in answer.info}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Pieces:
    """An answer's text pieces, generated in a worker thread; generation stops when the client
    disconnects (the thread stops at the next token). `start` waits for the first piece, so
    an answer that fails at once (a question too long for the window) is an error response,
    not a stream cut short."""

    _done = object()

    def __init__(self, answer, request: Request) -> None:
        self.answer, self.request = answer, request
        self.queue: asyncio.Queue = asyncio.Queue()
        self.gone = threading.Event()
        self.first = None

    async def start(self) -> Pieces:
        loop = asyncio.get_running_loop()

        def produce() -> None:
            try:
                for piece in self.answer:
                    if self.gone.is_set():
                        break
                    loop.call_soon_threadsafe(self.queue.put_nowait, piece)
            except Exception as err:  # noqa: BLE001 - handed to the request (first piece) or logged
                loop.call_soon_threadsafe(self.queue.put_nowait, err)
            finally:
                loop.call_soon_threadsafe(self.queue.put_nowait, self._done)

        threading.Thread(target=produce, name="memllm-generate", daemon=True).start()
        self.first = await self.queue.get()
        if isinstance(self.first, Exception):
            raise self.first
        return self

    async def __aiter__(self) -> AsyncIterator[str]:
        item = self.first
        try:
            while item is not self._done:
                if isinstance(item, Exception):
                    log.warning("generation failed: %s", item)
                    break
                if await self.request.is_disconnected():
                    break
                yield item
                item = await self.queue.get()
        finally:
            self.gone.set()  # a client that went: the worker stops at the next token


async def ingest_body(request: Request, local: bool) -> IngestRequest:
    """An ingest: a JSON body (IngestRequest), a text/plain body (?name=), or multipart files.
    Paths on the server's disk only over the local socket."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    query = request.query_params
    force = query.get("force", "").lower() in ("1", "true", "yes")
    if kind == "multipart/form-data":
        form = await request.form()
        documents = []
        for field, value in form.multi_items():
            if hasattr(value, "read"):
                documents.append(decoded(value.filename or field, await value.read()))
        if not documents:
            raise ApiError(400, "the multipart body has no files", param="files")
        return IngestRequest(documents=documents, force=force)
    if kind in ("text/plain", "text/markdown"):
        name = query.get("name")
        if not name:
            raise ApiError(400, "a text/plain ingest needs ?name=NAME (a later ingest under it replaces it)",
                           param="name")
        return IngestRequest(documents=[decoded(name, await request.body())], force=force)
    try:
        body = IngestRequest.model_validate_json(await request.body())
    except ValueError as err:
        raise ApiError(400, f"the ingest body is not {{documents: [{{name, text}}], ...}}: "
                            f"{str(err).splitlines()[0]}", code="invalid_body") from None
    if body.paths and not local:
        raise ApiError(403, "paths on the server's disk are accepted only over the local socket; send the text",
                       "permission_error", param="paths")
    if not body.documents and not body.paths:
        raise ApiError(400, "nothing to ingest: give documents or paths", param="documents")
    if body.paths and body.documents:
        raise ApiError(400, "give documents or paths, not both", param="paths")
    return body


def decoded(name: str, data: bytes) -> TextDocument:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"{name}: not UTF-8 text", param="body") from None
    if not text.strip():
        raise ApiError(400, f"{name}: empty", param="body")
    return TextDocument(name=name, text=text)
