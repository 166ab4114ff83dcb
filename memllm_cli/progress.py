"""The small protocol through which long work reports progress. The CLI renders it."""

from __future__ import annotations

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
