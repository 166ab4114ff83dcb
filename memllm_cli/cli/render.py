"""Everything memllm shows a person: results on stdout (text or --json), the rest on stderr.
The only module besides the commands that imports Rich."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from ..config import parse_size
from ..errors import UsageError


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(data, as_json: bool, text: Callable[[], None]) -> None:
    """The result: as JSON, or as `text()` renders it."""
    if as_json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        text()


def size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def disk_size(text: str | None) -> int | None:
    """--max-disk's bytes."""
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise UsageError(f"--max-disk: {e}") from None


def table(*columns: str, title: str | None = None, fold: str | None = None):
    """A borderless Rich table; the column named `fold` wraps, the others align right."""
    from rich.table import Table

    t = Table(box=None, title=title)
    for column in columns:
        if column == fold:
            t.add_column(column, overflow="fold")
        else:
            t.add_column(column, justify="right")
    return t


def safe(text: str) -> str:
    """A name as one line: control characters (a newline in a file name) are escaped, so
    line-per-entry output stays one entry per line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def show(renderable) -> None:
    """Print with Rich; piped output is not folded to a terminal's width."""
    from rich.console import Console

    tty = sys.stdout.isatty()
    Console(width=None if tty else 100_000, soft_wrap=not tty).print(renderable, highlight=False)


def progress_bar(unit: str = "tokens"):
    """A transient Rich progress bar on stderr that speaks the progress protocol."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    class Bar:
        def __init__(self) -> None:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                TimeRemainingColumn(), console=Console(stderr=True), transient=True,
            )
            self.task = None

        def start(self, total: int, description: str) -> None:
            self.bar.start()
            self.task = self.bar.add_task(description, total=total)

        def advance(self, amount: int, description: str | None = None) -> None:
            self.bar.update(self.task, advance=amount, **({"description": description} if description else {}))

        def finish(self) -> None:
            self.bar.stop()

    return Bar()


class LogProgress:
    """Progress for logs (cron, pipes): a line on stderr at most every `every` seconds, and
    none for work that ends sooner."""

    def __init__(self, unit: str = "tokens", every: float = 30.0) -> None:
        self.unit, self.every = unit, every
        self.total = self.done = 0
        self.description = ""
        self.last = self.started = 0.0
        self.said = False

    def start(self, total: int, description: str) -> None:
        import time

        self.total, self.description = total, description
        self.started = self.last = time.monotonic()

    def advance(self, amount: int, description: str | None = None) -> None:
        import time

        self.done += amount
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last, self.said = now, True
            share = f" ({self.done / self.total:.0%})" if self.total else ""
            err(f"memllm: {self.description}: {self.done}/{self.total} {self.unit}{share}, "
                f"{now - self.started:.0f} s" + (f", now {safe(description)}" if description else ""))

    def finish(self) -> None:
        if self.said:
            err(f"memllm: {self.description}: done, {self.done} {self.unit}")


def progress_for(as_json: bool, quiet: bool, unit: str = "tokens"):
    """A bar on a terminal, log lines otherwise, nothing with --quiet."""
    if quiet:
        return None
    if sys.stderr and sys.stderr.isatty() and not as_json:
        return progress_bar(unit)
    return LogProgress(unit) if sys.stderr else None


def interactive() -> bool:
    """Both ends are a terminal: a person can be asked."""
    return bool(sys.stdin and sys.stdin.isatty() and sys.stderr and sys.stderr.isatty())
