"""The small protocols through which long work reports progress (the CLI renders it) and is
asked to stop at its next chunk boundary (a signal handler, a server shutting down, a client
that went)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class Progress(Protocol):
    def start(self, total: int, description: str) -> None: ...

    def advance(self, amount: int, description: str | None = None) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    """Reports nowhere: the default for library calls and non-interactive runs."""

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, amount: int, description: str | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class Stop:
    """A request to stop an ingest at the next chunk boundary. `armed` says whether chunks
    are being written (a signal handler that finds it unarmed stops at once instead);
    `forward` passes a request on (to the server an ingest runs in)."""

    requested: str | None = None  # what asked: "SIGINT", "SIGTERM"
    armed: bool = False
    forward: Callable[[str], None] | None = None

    def request(self, why: str) -> None:
        self.requested = self.requested or why
        if self.forward is not None:
            self.forward(self.requested)
