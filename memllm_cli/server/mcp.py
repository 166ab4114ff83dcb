"""memllm mcp: a memory for agents, over the Model Context Protocol (stdio), with the official
`mcp` SDK. Tools: remember (write text into memory), recall (answer from memory, with the
documents read), forget (a document) and status. With a `memllm serve` of the same home
running, the tools go through it (its models are warm); else they run in this process.
"""

from __future__ import annotations

import functools
from typing import Any

from ..errors import MemllmError
from .client import Remote, connect

INSTRUCTIONS = ("A memory that keeps learning: `remember` what should be known later (notes, decisions, "
                "facts), `recall` to answer a question from it (the answer cites the documents it read), "
                "`forget` a document by name, `status` to see what it holds.")


class Backend:
    """The memory the tools use: through a running server, or in this process."""

    def __init__(self, options: dict, no_server: bool = False) -> None:
        self.options = options
        self.remote: Remote | None = connect(options, no_server)
        self._local = None

    def local(self):
        if self._local is None:
            from ..service import Memllm

            self._local = Memllm(**{k: v for k, v in self.options.items() if v is not None})
        return self._local

    def remember(self, text: str, name: str) -> dict:
        if self.remote is not None:
            return self.remote.ingest_text(name, text)
        from ..text.sources import Document

        return self.local().ingest_documents([Document.of(name, text)]).to_dict()

    def recall(self, question: str, max_tokens: int) -> dict:
        answer = (self.remote.ask(question, max_tokens=max_tokens) if self.remote is not None
                  else self.local().ask(question, max_new_tokens=max_tokens))
        "".join(answer)
        return answer.to_dict()

    def forget(self, name: str) -> dict:
        if self.remote is not None:
            return self.remote.forget([name])
        return self.local().forget([name])

    def status(self) -> dict:
        return self.remote.status() if self.remote is not None else self.local().status()


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
    build(Backend(options, no_server)).run("stdio")
