"""The one back-end protocol the CLI and `memllm mcp` call, and the choice between its two
implementations: a running `memllm serve` of the same home (server/client.py's `Remote`: no
torch in this process) or this process (`service.Memllm`). Both take the same parameters, by
the same names (tests/test_serve.py compares their signatures). The choice is made once; a
server that stops answering before the work began falls back to this process, once, with a
line on stderr.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, BinaryIO, Protocol

from ..progress import Progress, Stop
from .client import Remote, ServerGone, connect

log = logging.getLogger("memllm")

# what both back-ends do: Memllm's methods of these names, and Remote's
PROTOCOL = ("ingest", "ingest_text", "ask", "status", "forget")


class Backend(Protocol):
    def ingest(self, paths: list[str], *, stdin: BinaryIO | None = None, name: str | None = None,
               force: bool = False, sync: bool = False, progress: Progress | None = None,
               stop: Stop | None = None) -> Any: ...
    def ingest_text(self, name: str, text: str, *, force: bool = False, stop: Stop | None = None) -> Any: ...
    def ask(self, question: str, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
            top_k: int = 0, seed: int | None = None, budget: int | None = None) -> Any: ...
    def status(self) -> dict: ...
    def forget(self, sources: list[str], *, purge: bool = False) -> dict: ...


class Chosen:
    """The back-end for this invocation's options (`--memory`, `--model`, ...): the server when
    one runs and the options leave it the work, else this process; the Backend protocol, with
    the fallback built in."""

    def __init__(self, options: dict, no_server: bool = False) -> None:
        self.options = {k: v for k, v in options.items() if v is not None}
        self.remote: Remote | None = connect(self.options, no_server)
        self._local = None

    @property
    def through_server(self) -> bool:
        return self.remote is not None

    def local(self):
        if self._local is None:
            from ..service import Memllm  # torch: only when this process does the work

            self._local = Memllm(**self.options)
        return self._local

    def _call(self, method: str, *args, **kwargs):
        if self.remote is not None:
            try:
                return getattr(self.remote, method)(*args, **kwargs)
            except ServerGone as gone:
                self._fall_back(gone)
        return getattr(self.local(), method)(*args, **kwargs)

    def _fall_back(self, gone: ServerGone) -> None:
        log.info("%s; running in-process", gone.message)
        self.remote = None

    def ingest(self, paths: list[str], *, stdin: BinaryIO | None = None, **options) -> Any:
        if "-" in paths and stdin is not None and self.remote is not None:
            stdin = _Replayable(stdin.read())  # read once: a fallback reads it again
        return self._call("ingest", paths, stdin=stdin, **options)

    def ingest_text(self, name: str, text: str, **options) -> Any:
        return self._call("ingest_text", name, text, **options)

    def status(self) -> dict:
        return self._call("status")

    def forget(self, sources: list[str], **options) -> dict:
        return self._call("forget", sources, **options)

    def ask(self, question: str, **options) -> Answered:
        """The answer, its first piece already generated: a server that fails before it
        answers anything falls back here, and the answer is the one this process gives."""
        if self.remote is not None:
            answer = self.remote.ask(question, **options)
            pieces = iter(answer)
            try:
                return Answered(answer, next(pieces, None), pieces)
            except ServerGone as gone:
                self._fall_back(gone)
        answer = self.local().ask(question, **options)
        pieces = iter(answer)
        return Answered(answer, next(pieces, None), pieces)


class _Replayable:
    """Bytes read from standard input, readable again from the start by each back-end tried."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, *_) -> bytes:
        return self.data


class Answered:
    """An answer (service.session.Answer or client.RemoteAnswer) whose first piece was taken
    to see that it started: iterate for every piece, then read it like the answer."""

    def __init__(self, answer, first: str | None, rest: Iterator[str]) -> None:
        self.answer, self._first, self._rest = answer, first, rest

    def __iter__(self) -> Iterator[str]:
        if self._first is not None:
            yield self._first
        yield from self._rest

    def __getattr__(self, name: str):
        return getattr(self.answer, name)
