"""memllm mcp: a memory for agents, over the Model Context Protocol (stdio), with the official
`mcp` SDK. Tools: remember (write text into memory), recall (answer from memory, with the
documents read), forget (a document) and status. With a `memllm serve` of the same home
running, the tools go through it (its models are warm); else they run in this process.

The SDK's stdio transport is given a guarded standard input: every line is checked before the
SDK sees it, and a line that is not JSON (-32700), not a JSON-RPC message (-32600) or over
MAX_REQUEST bytes (-32600, read no further than that) is answered with JSON-RPC's error, where
the SDK would answer nothing and leave the client waiting. When standard input closes (the
client went), an ingest in flight stops at its next chunk boundary, commits, and memllm mcp
exits.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable
from typing import Any

from ..errors import MemllmError
from ..progress import Stop
from .backends import Chosen

MAX_REQUEST = 1 << 20  # bytes one JSON-RPC line may have: a note, not a library (memllm ingest takes those)
PARSE_ERROR, INVALID_REQUEST = -32700, -32600

INSTRUCTIONS = ("A memory that keeps learning: `remember` what should be known later (notes, decisions, "
                "facts), `recall` to answer a question from it (the answer cites the documents it read), "
                "`forget` a document by name, `status` to see what it holds.")


class Backend:
    """The memory the tools use (server/backends.py: through a running server, else in this
    process), and the stop of the ingest in flight, for when the client goes."""

    def __init__(self, options: dict, no_server: bool = False) -> None:
        self.chosen = Chosen(options, no_server)
        self._stop: Stop | None = None

    def stop(self) -> None:
        """The client went: an ingest in flight stops at its next chunk boundary and commits."""
        if self._stop is not None:
            self._stop.request("SIGTERM")

    def remember(self, text: str, name: str) -> dict:
        self._stop = Stop(armed=True)
        try:
            return self.chosen.ingest_text(name, text, stop=self._stop).to_dict()
        finally:
            self._stop = None

    def recall(self, question: str, max_tokens: int) -> dict:
        answer = self.chosen.ask(question, max_new_tokens=max_tokens)
        "".join(answer)
        return answer.to_dict()

    def forget(self, name: str) -> dict:
        return self.chosen.forget([name])

    def status(self) -> dict:
        return self.chosen.status()


def build(backend: Backend):
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server = MCPServer("memllm", instructions=INSTRUCTIONS)

    def told(tool):
        """memllm's errors reach the agent as the CLI prints them (the SDK would hide their text)."""
        @functools.wraps(tool)
        def wrapper(*args, **kwargs):
            try:
                return tool(*args, **kwargs)
            except MemllmError as err:
                raise ToolError(err.message + (f" (hint: {err.hint})" if err.hint else "")) from None
        return wrapper

    @server.tool()
    @told
    def remember(text: str, name: str = "note") -> dict[str, Any]:
        """Write text into memory as the document `name` (a later text under the same name
        replaces it). Returns what was written: chunks, tokens, what the pool holds."""
        report = backend.remember(text, name)
        keep = ("memory", "files", "chunks", "tokens", "tokens_held", "pool_size", "updated", "unchanged", "warnings")
        return {k: report[k] for k in keep if k in report}

    @server.tool()
    @told
    def recall(question: str, max_tokens: int = 128) -> dict[str, Any]:
        """Answer a question from memory. Returns the answer, whether what was read supports it
        (grounded), and the documents read (source, chunk, excerpt)."""
        found = backend.recall(question, max_tokens)
        sources = [{k: s.get(k) for k in ("source", "chunk", "excerpt")} for s in found.get("sources") or []]
        return {"answer": found.get("answer", ""), "grounded": found.get("grounded"), "sources": sources}

    @server.tool()
    @told
    def forget(name: str) -> dict[str, Any]:
        """Forget the document `name`: ask no longer reads it (history keeps it until gc)."""
        return backend.forget(name)

    @server.tool()
    @told
    def status() -> dict[str, Any]:
        """What the memory holds: model, pool fill, documents with their tokens."""
        info = backend.status()
        docs = [{"name": s["name"], "tokens": s.get("tokens_written"), "held": s.get("held")}
                for s in info.get("sources", [])]
        keep = ("memory", "model", "tokens", "pool_size", "fill", "updates", "disk_bytes")
        return {**{k: info[k] for k in keep if k in info}, "documents": docs}

    return server


def run(options: dict, no_server: bool = False) -> None:
    """Serve MCP over stdin/stdout until the client closes it."""
    import anyio

    backend = Backend(options, no_server)
    anyio.run(_serve, build(backend), backend)


async def _serve(server, backend: Backend) -> None:
    from mcp.server.stdio import stdio_server

    wire_in, wire_out = _claim_stdio()
    out = Wire(wire_out)
    lowlevel = server._lowlevel_server  # MCPServer.run_stdio_async, with our streams
    try:
        async with stdio_server(stdin=Guarded(wire_in, out, backend.stop), stdout=out) as (read, write):
            await lowlevel.run(read, write, lowlevel.create_initialization_options())
    finally:
        backend.stop()


def _claim_stdio():
    """The wire (stdin and stdout, duplicated), with fd 0 pointed at /dev/null and fd 1 at
    stderr, so that nothing a library prints lands among the JSON-RPC messages."""
    wire_in = os.fdopen(os.dup(0), "rb", buffering=0)
    wire_out = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return wire_in, wire_out


class Wire:
    """Standard output for the SDK (async write and flush of text) and for the guard's error
    answers, one message at a time."""

    def __init__(self, raw) -> None:
        self.raw, self.lock = raw, threading.Lock()

    def send(self, text: str) -> None:
        with self.lock:
            self.raw.write(text.encode())

    async def write(self, text: str) -> None:
        import anyio

        await anyio.to_thread.run_sync(self.send, text)

    async def flush(self) -> None:
        return None  # unbuffered


class Guarded:
    """Standard input for the SDK: the lines that are JSON-RPC messages of at most MAX_REQUEST
    bytes; every other line gets its JSON-RPC error answer here."""

    def __init__(self, raw, out: Wire, gone: Callable[[], None]) -> None:
        self.raw, self.out, self.gone = raw, out, gone
        self._pending = b""  # what was read past the last line

    def __aiter__(self):
        return self._lines()

    async def _lines(self):
        import anyio

        while True:
            line, too_long = await anyio.to_thread.run_sync(self._read_line)
            if line is None:
                self.gone()  # end of input: the client went; what it started stops at a chunk boundary
                return
            if too_long:
                self._error(None, INVALID_REQUEST, f"Invalid Request: a message is at most {MAX_REQUEST} bytes "
                                                   "(write long documents with memllm ingest)")
                continue
            if not line.strip():
                continue
            checked = self._check(line)
            if checked is not None:
                yield checked

    def _read_line(self) -> tuple[str | None, bool]:
        """One line, or (None, False) at the end; a line longer than MAX_REQUEST is read to its
        end and dropped (only MAX_REQUEST bytes of it are ever held)."""
        held, too_long = bytearray(), False
        while True:
            byte_chunk = self._chunk()
            if not byte_chunk:
                return (None, False) if not held and not too_long else (held.decode("utf-8", "replace"), too_long)
            end = byte_chunk.find(b"\n")
            part = byte_chunk if end < 0 else byte_chunk[:end]
            if not too_long:
                held += part
                if len(held) > MAX_REQUEST:
                    too_long, held = True, bytearray()
            if end >= 0:
                self._pending = byte_chunk[end + 1:]
                return held.decode("utf-8", "replace"), too_long

    def _chunk(self) -> bytes:
        if self._pending:
            chunk, self._pending = self._pending, b""
            return chunk
        return self.raw.read(1 << 16)

    def _check(self, line: str) -> str | None:
        try:
            message = json.loads(line)
        except ValueError as err:
            self._error(None, PARSE_ERROR, f"Parse error: {err}")
            return None
        if not isinstance(message, dict):
            self._error(None, INVALID_REQUEST, "Invalid Request: a message is a JSON object (batches are not "
                                               "supported)")
            return None
        ident = message.get("id")
        if not isinstance(ident, (str, int)) or isinstance(ident, bool):
            ident = None
        answer = "result" in message or "error" in message
        if message.get("jsonrpc") != "2.0" or not (isinstance(message.get("method"), str) or answer):
            self._error(ident, INVALID_REQUEST, 'Invalid Request: not a JSON-RPC 2.0 message ("jsonrpc": "2.0" '
                                                'and a "method")')
            return None
        return line

    def _error(self, ident, code: int, message: str) -> None:
        self.out.send(json.dumps({"jsonrpc": "2.0", "id": ident, "error": {"code": code, "message": message}}) + "\n")
