"""The `memllm` command. Parses flags, makes one call into the service, renders the result.

stdout carries results only; progress, warnings and errors go to stderr. The engine (and
torch) is imported inside the commands, so `memllm --help` starts fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from .errors import MemllmError

app = typer.Typer(
    name="memllm",
    help="Give a language model a memory that keeps learning (MemoryLLM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

EXIT_INTERRUPTED = 130


def _version() -> str:
    try:
        return version("memllm")
    except PackageNotFoundError:
        return "unknown"


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def handle_errors(command):
    """Translate domain errors into one line on stderr and an exit code (docs/cli.md)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("MEMLLM_DEBUG") == "1"
        try:
            return command(*args, **kwargs)
        except MemllmError as err:
            if debug:
                raise
            _err(f"memllm: error: {err.message}")
            if err.hint:
                _err(f"memllm: hint: {err.hint}")
            raise typer.Exit(err.exit_code) from None
        except OSError as err:  # the disk, not memllm: full, read-only, no permission
            if debug:
                raise
            where = f": {err.filename}" if err.filename else ""
            _err(f"memllm: error: {err.strerror or err}{where}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if debug:
                raise
            _err("memllm: interrupted; the memory keeps its last committed state")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _service(ctx: typer.Context):
    from .service import Memllm

    return Memllm(memory=ctx.obj["memory"], model=ctx.obj["model"])


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _version_callback(value: bool) -> None:
    if value:
        print(f"memllm {_version()}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    memory: Annotated[
        str | None, typer.Option("--memory", "-m", help="Memory to use [env: MEMLLM_MEMORY; default: default].")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Model: smollm2-135m-instruct (embedded), a directory, a .gguf file or a hub id "
            "[env: MEMLLM_MODEL; default: the memory's own model].",
        ),
    ] = None,
    _: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """memllm writes text into a fixed-size latent memory inside every layer of a language
    model, and answers questions from it. Memories live under MEMLLM_HOME."""
    ctx.obj = {"memory": memory, "model": model}
    _log_to_stderr()


@app.command()
@handle_errors
def ingest(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="Files, folders (recursive), globs, or - for stdin.")],
    force: Annotated[bool, typer.Option("--force", help="Write content again even if already in memory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Write text into memory: chunks of at most 512 tokens, one update each.

    Examples:
      memllm ingest notes.txt
      memllm ingest docs/ 'journal/*.md'
      git log -5 | memllm -m work ingest -
    """
    service = _service(ctx)
    progress = _progress_bar() if sys.stderr.isatty() and not as_json else None
    report = service.ingest(paths, stdin=sys.stdin.buffer, force=force, progress=progress)
    for skipped in report.skipped:
        _err(f"memllm: skipped {skipped['path']}: {skipped['reason']}")
    if as_json:
        _print_json(report.to_dict())
        return
    if report.unchanged:
        _err(f"memllm: {len(report.unchanged)} unchanged, already in memory (use --force to write again)")
    print(
        f"{report.files} file(s), {report.chunks} chunk(s), {report.tokens} tokens written "
        f"in {report.seconds:.1f} s; memory {report.memory!r} holds {report.tokens_held}/{report.pool_size} "
        f"tokens ({report.fill:.0%})"
        + (f", {report.dropped} dropped" if report.dropped else "")
    )


@app.command()
@handle_errors
def ask(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(help="The question, or - to read it from stdin.")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, max=4096, help="Most tokens to generate.")] = 256,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 is greedy (reproducible).")
    ] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k likeliest tokens (0: all).")] = 0,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {answer, model, memory, tokens, seconds}.")] = False,
) -> None:
    """Answer a question from memory, streaming the answer to stdout.

    Examples:
      memllm ask "When is the budget review?"
      memllm -m work ask --json "Who owns the migration?" | jq -r .answer
    """
    if question == "-":
        question = sys.stdin.read()
    service = _service(ctx)
    answer = service.ask(
        question, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
    if as_json:
        for _ in answer:
            pass
        _print_json(answer.to_dict())
        return
    ended_with_newline = True
    for piece in answer:
        sys.stdout.write(piece)
        sys.stdout.flush()
        ended_with_newline = piece.endswith("\n")
    if not ended_with_newline:
        sys.stdout.write("\n")


@app.command()
@handle_errors
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show what a memory holds: model, pool size, fill, updates, disk size, tokens per source.

    Examples:
      memllm status
      memllm -m work status --json
    """
    service = _service(ctx)
    info = service.status()
    if as_json:
        _print_json(info)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"memory [bold]{info['memory']}[/] ({info['kind']}), model {info['model']}\n"
        f"pool {info['tokens']}/{info['pool_size']} tokens ({info['fill']:.0%} full), "
        f"{info['updates']} updates, {info['dropped']} tokens dropped, "
        f"{_size(info['disk_bytes'])} on disk",
        highlight=False,
    )
    if info["sources"]:
        table = Table(box=None)
        table.add_column("source", overflow="fold")
        for column in ("chunks", "written", "held", "held %"):
            table.add_column(column, justify="right")
        for s in info["sources"]:
            share = s["tokens_held"] / s["tokens_written"] if s["tokens_written"] else 0
            table.add_row(s["name"], str(s["chunks"]), str(s["tokens_written"]), str(s["tokens_held"]), f"{share:.0%}")
        console.print(table)


def _log_to_stderr() -> None:
    import logging

    logger = logging.getLogger("memllm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("memllm: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    class Bar:
        def __init__(self) -> None:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
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


def run() -> None:
    app(prog_name="memllm")
