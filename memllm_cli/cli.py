"""The `memllm` command. Parses flags, makes one call into the service, renders the result.

stdout carries results only; progress, warnings and errors go to stderr. The engine (and
torch) is imported inside the commands, so `memllm --help` starts fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
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
            # Every `finally` below (temp files, the lock) has run by now. Leave at once: under
            # load, a SIGINT-killed status (-2) instead of 130 was seen when unwinding further.
            sys.stdout.flush()
            os._exit(EXIT_INTERRUPTED)

    return wrapper


def _service(ctx: typer.Context):
    from .service import Memllm

    return Memllm(**ctx.obj)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _version_callback(value: bool) -> None:
    if value:
        print(f"memllm {__version__}")
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
    device: Annotated[
        str | None,
        typer.Option("--device", help="cpu, cuda, cuda:N, or auto (several GPUs: an accelerate device map) "
                     "[env: MEMLLM_DEVICE; default: cpu]."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="float32, bfloat16 or float16 [env: MEMLLM_DTYPE; default: float32 on the "
                     "CPU, bfloat16 for MemoryLLM checkpoints on a GPU]."),
    ] = None,
    _: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """memllm writes text into a fixed-size latent memory inside every layer of a language
    model, and answers questions from it. Memories live under MEMLLM_HOME."""
    ctx.obj = {"memory": memory, "model": model, "device": device, "dtype": dtype}
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
    for warning in report.warnings:
        _err(f"memllm: warning: {warning}")
    if as_json:
        _print_json(report.to_dict())
        return
    if report.unchanged:
        _err(f"memllm: {len(report.unchanged)} unchanged, already in memory (use --force to write again)")
    print(
        f"{report.files} file(s), {report.chunks} chunk(s), {report.tokens} tokens written "
        f"in {report.seconds:.1f} s; memory {report.memory!r} holds {report.tokens_held}/{report.pool_size} "
        f"{report.unit} ({report.fill:.0%})"
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
    budget: Annotated[int | None, typer.Option("--budget", min=0, help="Most memory tokens to read: the parts "
                                               "most relevant to the question, from the pool and the long-term "
                                               "tier; 0 reads the whole pool [config: read_budget; default: "
                                               "1024].")] = None,
    sources: Annotated[bool, typer.Option("--sources", help="After the answer, list the documents it read "
                                          "(path, chunk, excerpt), most relevant first.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print {answer, model, memory, tokens, seconds, "
                                          "sources}.")] = False,
) -> None:
    """Answer a question from memory, streaming the answer to stdout.

    Examples:
      memllm ask "When is the budget review?"
      memllm ask --sources "Who has the shed key?"
      memllm -m work ask --json "Who owns the migration?" | jq -r .answer
    """
    if question == "-":
        question = sys.stdin.read()
    service = _service(ctx)
    answer = service.ask(
        question, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        budget=budget,
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
    if sources:
        cited = answer.info.get("sources")
        if cited is None:
            print("sources: the whole pool was read (--budget 0, or a MemoryLLM checkpoint)")
        else:
            print("sources:" if cited else "sources: none (nothing in memory matched the question)")
            for i, c in enumerate(cited, 1):
                print(f"  {i}. {c['source']} (chunk {c['chunk']}, score {c['score']:.2f}): {c['excerpt']}")


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
        f"pool {info['tokens']}/{info['pool_size']} {info['unit']} ({info['fill']:.0%} full), "
        f"{info['updates']} updates, {info['dropped']} {info['unit'].split()[0]} dropped, "
        f"{_size(info['disk_bytes'])} on disk",
        highlight=False,
    )
    if info["sources"]:
        table = Table(box=None)
        table.add_column("source", overflow="fold")
        for column in ("chunks", "written", "held", "held %"):
            table.add_column(column, justify="right")
        trained = "rows_written" in (info["sources"] or [{}])[0]
        if trained:
            table.add_column("rows written", justify="right")
            table.add_column("long-term", justify="right")
        for s in info["sources"]:
            written = s["rows_written"] if trained else s["tokens_written"]
            share = s["tokens_held"] / written if written else 0
            extra = [str(s["rows_written"]), str(s["long_term_rows"])] if trained else []
            table.add_row(s["name"], str(s["chunks"]), str(s["tokens_written"]), str(s["tokens_held"]), f"{share:.0%}",
                          *extra)
        console.print(table)


@app.command("list")
@handle_errors
def list_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the memories under MEMLLM_HOME: model, tokens held, versions, snapshots, disk size.

    Examples:
      memllm list
    """
    memories = _service(ctx).list_memories()
    if as_json:
        _print_json(memories)
        return
    if not memories:
        _err("memllm: no memories yet: memllm ingest FILE creates one")
    for m in memories:
        print(f"{m['memory']}  {m['tokens']}/{m['pool_size']} tokens  {m['versions']} versions  "
              f"{m['snapshots']} snapshots  {_size(m['disk_bytes'])}  {m['model']}")


@app.command("log")
@handle_errors
def log_(
    ctx: typer.Context,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Show at most N versions.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the memory's versions, newest first: id, time, operation, tokens added and dropped.

    Examples:
      memllm log -n 5
      memllm -m work log --json
    """
    entries = _service(ctx).log(limit)
    if as_json:
        _print_json(entries)
        return
    for e in entries:
        tags = f" ({', '.join(e['tags'])})" if e["tags"] else ""
        print(f"{e['version'][:12]}  {e['time']}  {e['op']:<8}  +{e['added']} -{e['dropped']} "
              f"= {e['tokens']} {e['unit']}  {e['message']}{tags}")


snapshot_app = typer.Typer(help="Name versions of the memory, list them, roll back to them.", no_args_is_help=True)
app.add_typer(snapshot_app, name="snapshot")


@snapshot_app.command("create")
@handle_errors
def snapshot_create(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Snapshot name (default: snapshot-<time>).")] = None,
    message: Annotated[str, typer.Option("--message", "-m", help="A note kept with the snapshot.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Name the current version.

    Examples:
      memllm snapshot create before-import -m "before importing the wiki"
    """
    result = _service(ctx).snapshot_create(name, message)
    if as_json:
        _print_json(result)
    else:
        print(f"snapshot {result['snapshot']} = version {result['version'][:12]}")


@snapshot_app.command("list")
@handle_errors
def snapshot_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List snapshots.

    Examples:
      memllm snapshot list
    """
    snapshots = _service(ctx).snapshot_list()
    if as_json:
        _print_json(snapshots)
        return
    for snap in snapshots:
        print(f"{snap['snapshot']}  {snap['version'][:12]}  {snap['time']}  {snap['tokens']} tokens  {snap['message']}")


@snapshot_app.command("delete")
@handle_errors
def snapshot_delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Snapshot to delete (the version stays).")],
) -> None:
    """Delete a snapshot name. The version it named stays until gc finds nothing refers to it.

    Examples:
      memllm snapshot delete before-import
    """
    result = _service(ctx).snapshot_delete(name)
    print(f"deleted snapshot {result['deleted']}")


@snapshot_app.command("rollback")
@handle_errors
def snapshot_rollback(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="A snapshot, a version id (prefix), or HEAD~N.")] = "HEAD~1",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask (required without a terminal).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would change.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Make an earlier version current again. The rollback is itself a version: undo it
    with `memllm snapshot rollback HEAD~1`.

    Examples:
      memllm snapshot rollback before-import --dry-run
      memllm snapshot rollback HEAD~3 --yes
    """
    service = _service(ctx)
    plan = service.rollback(target, dry_run=True)
    if not as_json:
        _err(f"memllm: rollback {plan['from'][:12]} -> {plan['to'][:12]} ({target}): "
             f"+{plan['diff']['totals']['added']} -{plan['diff']['totals']['dropped']} tokens")
    if dry_run or plan["from"] == plan["to"]:
        if as_json:
            _print_json(plan)
        elif plan["from"] == plan["to"]:
            _err("memllm: already there; nothing to do")
        return
    if not yes:
        if not (sys.stdin.isatty() and sys.stderr.isatty()) or as_json:
            _err("memllm: error: rollback changes the memory; pass --yes to confirm (or --dry-run)")
            raise typer.Exit(2)
        if not typer.confirm("Roll back?", err=True):
            raise typer.Exit(1)
    result = service.rollback(target)
    if as_json:
        _print_json(result)
    else:
        print(f"HEAD is now {result['version'][:12]} (the pool of {result['to'][:12]})")


@app.command()
@handle_errors
def diff(
    ctx: typer.Context,
    a: Annotated[str, typer.Argument(help="Older version (snapshot, id prefix, HEAD~N).")] = "HEAD~1",
    b: Annotated[str, typer.Argument(help="Newer version.")] = "HEAD",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Compare two versions per source document: tokens added, dropped, held, share retained.

    Examples:
      memllm diff
      memllm diff before-import HEAD --json
    """
    result = _service(ctx).diff(a, b)
    if as_json:
        _print_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, title=f"{result['from'][:12]} -> {result['to'][:12]}")
    table.add_column("source", overflow="fold")
    for column in ("added", "dropped", "held", "retained"):
        table.add_column(column, justify="right")
    for row in result["sources"]:
        table.add_row(row["source"], str(row["added"]), str(row["dropped"]), str(row["held"]),
                      f"{row['retained']:.0%}")
    t = result["totals"]
    table.add_row("total", str(t["added"]), str(t["dropped"]), str(t["held"]), "", style="bold")
    Console().print(table)


@app.command()
@handle_errors
def forget(
    ctx: typer.Context,
    sources: Annotated[list[str], typer.Argument(help="Documents, by path as ingested or content hash (8+ hex).")],
    purge: Annotated[
        bool, typer.Option("--purge", help="Also remove them from every version and delete their bytes from disk.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before --purge (needed without a TTY).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Remove documents' tokens from memory, as a new version (undo with a rollback).
    With --purge, rewrite history without them and delete their bytes: this cannot be undone.

    Examples:
      memllm forget notes/old-plan.md
      memllm forget 3fa2c1d9
      memllm forget --purge --yes passwords.txt
    """
    if purge and not yes:
        if not (sys.stdin.isatty() and sys.stderr.isatty()) or as_json:
            _err("memllm: error: --purge deletes data for good; pass --yes to confirm")
            raise typer.Exit(2)
        if not typer.confirm(f"Purge {', '.join(sources)} from every version, for good?", err=True):
            raise typer.Exit(1)
    result = _service(ctx).forget(sources, purge=purge)
    if as_json:
        _print_json(result)
    else:
        print(f"forgot {', '.join(result['forgotten'])}: {result['tokens_removed']} {result['unit']} removed, "
              f"{result['tokens']} held; version {result['version'][:12]}")
        if purge:
            print(f"purged: {result['purged_blocks']} blocks deleted ({_size(result['bytes_freed'])}), "
                  f"{result['versions_rewritten']} versions rewritten")


@app.command()
@handle_errors
def verify(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check every block's and version's checksum, every reference, and the refs.
    Exits 6 and lists what is damaged if anything is.

    Examples:
      memllm verify && echo intact
    """
    result = _service(ctx).verify()
    if as_json:
        _print_json(result)
    else:
        c = result["checked"]
        print(f"checked {c['blocks']} blocks, {c['versions']} versions, {c['refs']} refs: "
              + ("intact" if result["ok"] else f"{len(result['damaged'])} problem(s)"))
        for line in result["damaged"]:
            _err(f"memllm: damaged: {line}")
    if not result["ok"]:
        raise typer.Exit(6)


@app.command()
@handle_errors
def gc(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be deleted.")] = False,
    keep_versions: Annotated[
        int | None,
        typer.Option("--keep-versions", min=1, help="Keep only the N newest versions behind HEAD and each snapshot "
                     "[config: gc_keep_versions; default: all]."),
    ] = None,
    keep_long_term: Annotated[
        int | None,
        typer.Option("--keep-long-term", min=0, help="Keep only the newest N tokens of the long-term tier (what "
                     "the pool dropped, which ask can still read) [config: gc_keep_long_term; default: all]."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Delete versions no snapshot or HEAD reaches, and blocks no remaining version uses.

    Examples:
      memllm gc --dry-run
      memllm gc --keep-versions 20
      memllm gc --keep-long-term 200000
    """
    result = _service(ctx).gc(dry_run=dry_run, keep_versions=keep_versions, keep_long_term=keep_long_term)
    if as_json:
        _print_json(result)
    else:
        verb = "would delete" if dry_run else "deleted"
        print(f"{verb} {result['versions_deleted']} versions and {result['blocks_deleted']} blocks"
              + ("" if dry_run else f", {_size(result['bytes_freed'])} freed"))


@app.command("export")
@handle_errors
def export_(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The archive to write (a tar file).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Write a memory, with its whole history and its model's fingerprint, to one archive.

    Examples:
      memllm -m work export work-memory.tar
    """
    result = _service(ctx).export(file)
    if as_json:
        _print_json(result)
    else:
        print(f"exported memory {result['memory']!r} to {result['file']} ({_size(result['bytes'])})")


@app.command("import")
@handle_errors
def import_(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="An archive written by memllm export.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Install a memory from an archive, under --memory's name (which must be new).
    The archive is verified before the memory appears.

    Examples:
      memllm -m work import work-memory.tar
    """
    result = _service(ctx).import_(file)
    if as_json:
        _print_json(result)
    else:
        print(f"imported memory {result['memory']!r} ({result['versions']} versions, model {result['model']})")


bench_app = typer.Typer(
    help="The MemoryLLM paper's measurements on local data, with baselines: retention, speed, integrity.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")

DataOption = Annotated[
    Path | None,
    typer.Option("--data", envvar="MEMLLM_BENCH_DATA", help="NQ-open with gold passages (.jsonl or .jsonl.gz), "
                 "as ../shared/data/nq-open-oracle.jsonl.gz [env: MEMLLM_BENCH_DATA]; never downloaded."),
]
RowsOption = Annotated[str, typer.Option("--rows", help="Rows of the data to draw from (0-based, inclusive); "
                                         "rows 2000 and up of nq-open-oracle are reserved for acceptance.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for drawing questions and distractors.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the full result as JSON.")]
OutOption = Annotated[Path | None, typer.Option("--out", help="Also write NAME.json (and NAME.png) in this folder.")]
TokensOption = Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens generated per answer.")]


def _bench(ctx: typer.Context, name: str, run, *, data: Path | None, rows: str, as_json: bool, out: Path | None,
           max_tokens: int, base_memory: str | None = None) -> dict:
    from . import bench

    dataset = bench.load_data(data, bench.parse_rows(rows))
    service = _service(ctx)
    subject = bench.ServiceSubject(service, max_new_tokens=max_tokens, base_memory=base_memory)
    progress = _progress_bar("steps") if sys.stderr.isatty() else None
    result = run(bench, subject, dataset, progress)
    result["environment"] = bench.environment(subject)
    result["settings"]["max_new_tokens"] = max_tokens
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
        if name == "retention" and not bench.plot(result, out / f"{name}.png"):
            _err("memllm: no plot: matplotlib is not installed (pip install matplotlib)")
    if as_json:
        _print_json(result)
    return result


@bench_app.command("retention")
@handle_errors
def bench_retention(
    ctx: typer.Context,
    data: DataOption = None,
    rows: RowsOption = "0-1999",
    questions: Annotated[int, typer.Option("--questions", min=1, help="Questions (one memory each).")] = 10,
    k: Annotated[list[int] | None, typer.Option("--k", help="Unrelated passages after the gold one; repeat "
                                                "(default 0 1 2 5 10 20 50).")] = None,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: memllm (reading within the budget), "
                                         "pool (the whole pool), prompt, bm25, closed-book.")]
    = "memllm,pool,prompt,bm25,closed-book",
    bm25_budget: Annotated[int, typer.Option("--bm25-budget", min=1, help="Prompt tokens of BM25's top chunks.")]
    = 1024,
    from_memory: Annotated[str | None, typer.Option("--from-memory", help="Start each question from this stored "
                                                    "memory (a copy; it is not changed) instead of an empty one.")]
    = None,
    seed: SeedOption = 0,
    max_tokens: TokensOption = 32,
    as_json: JsonOption = False,
    out: OutOption = None,
) -> None:
    """Knowledge retention (the paper's protocol): write a question's gold passage, then k
    unrelated passages in updates of up to 512 tokens, then ask; beside the prompt, BM25 and
    closed-book baselines. Accuracy with its standard error per k.

    Examples:
      memllm bench retention --data nq-open-oracle.jsonl.gz
      memllm bench retention --data nq.jsonl.gz --questions 50 --k 0 --k 10 --out results/
    """
    from . import bench as b

    ks = k or list(b.DEFAULT_KS)
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    result = _bench(ctx, "retention", lambda bench, subject, dataset, progress: bench.retention(
        subject, dataset, questions=questions, seed=seed, ks=ks, methods=chosen, bm25_budget=bm25_budget,
        progress=progress), data=data, rows=rows, as_json=as_json, out=out, max_tokens=max_tokens,
        base_memory=from_memory)
    if not as_json:
        _retention_table(result)


@bench_app.command("speed")
@handle_errors
def bench_speed(
    ctx: typer.Context,
    data: DataOption = None,
    rows: RowsOption = "0-1999",
    questions: Annotated[int, typer.Option("--questions", min=1, help="Asks per fill (after one warm-up).")] = 3,
    seed: SeedOption = 0,
    max_tokens: TokensOption = 32,
    as_json: JsonOption = False,
    out: OutOption = None,
) -> None:
    """Speed: ingest tokens/s against a plain forward pass, and time to first token and
    decode tokens/s at 25, 50 and 100% of the pool beside the prompt holding the same text;
    peak RSS; disk bytes per memory token. Medians and spreads.

    Examples:
      memllm bench speed --data nq-open-oracle.jsonl.gz
    """
    result = _bench(ctx, "speed", lambda bench, subject, dataset, progress: bench.speed(
        subject, dataset, questions=questions, seed=seed, progress=progress),
        data=data, rows=rows, as_json=as_json, out=out, max_tokens=max_tokens)
    if not as_json:
        _speed_table(result)


@bench_app.command("integrity")
@handle_errors
def bench_integrity(
    ctx: typer.Context,
    data: DataOption = None,
    rows: RowsOption = "0-1999",
    questions: Annotated[int, typer.Option("--questions", min=1, help="Fresh facts written and asked.")] = 20,
    updates: Annotated[int, typer.Option("--updates", min=1, help="Updates of unrelated text (one passage each).")]
    = 1000,
    seed: SeedOption = 0,
    max_tokens: TokensOption = 32,
    as_json: JsonOption = False,
    out: OutOption = None,
) -> None:
    """Integrity after many updates (the paper's "no degradation"): fresh-fact retention,
    held-out perplexity and per-layer pool statistics at U = 0, 10, 100, ... updates.

    Examples:
      memllm bench integrity --data nq-open-oracle.jsonl.gz
      memllm --model ./tiny-random bench integrity --data nq.jsonl.gz --updates 1000000
    """
    result = _bench(ctx, "integrity", lambda bench, subject, dataset, progress: bench.integrity(
        subject, dataset, questions=questions, seed=seed, updates=updates, progress=progress),
        data=data, rows=rows, as_json=as_json, out=out, max_tokens=max_tokens)
    if not as_json:
        _integrity_table(result)


def _retention_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    settings = result["settings"]
    table = Table(title=f"knowledge retention: {settings['questions']} questions, model "
                        f"{result['environment']['model']['name']}, pool {result['environment']['model']['pool_size']}",
                  box=None)
    table.add_column("k", justify="right")
    for method in result["results"]:
        table.add_column(method, justify="right")
    table.add_column("(1-K/N)^t", justify="right")
    table.add_column("gold held", justify="right")
    for k in settings["ks"]:
        cells = [f"{r[str(k)]['accuracy']:.0%} ± {r[str(k)]['stderr']:.0%}" for r in result["results"].values()]
        survival = result["survival"][str(k)]
        table.add_row(str(k), *cells, *(f"{survival[n]:.0%}" if survival[n] is not None else "-"
                                         for n in ("paper", "measured")))
    Console().print(table)
    if settings.get("methods_not_supported"):
        _err(f"memllm: not measured for this model: {', '.join(settings['methods_not_supported'])}")
    print(f"{result['seconds']:.0f} s; data {result['data']['path']} rows {result['data']['rows']}; "
          f"scorer {result['scorer']}")


def _speed_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    print(f"plain forward {result['plain_forward_tokens_per_s']:.0f} tokens/s; ingest "
          f"{result['ingest_tokens_per_s']:.0f} tokens/s ({result['ingest_over_plain']:.2f}x); peak RSS "
          f"{_size(result['peak_rss_bytes'])}; disk {result['disk_bytes_per_token'] or '-'} B per memory token")
    table = Table(box=None)
    for column in ("fill", "held", "ingest tok/s", "memllm first token", "memllm decode tok/s",
                   "prompt first token", "prompt decode tok/s"):
        table.add_column(column, justify="right")

    def cell(side, key, fmt):
        value = (side or {}).get(key)
        return fmt.format(value["median"]) + f" ({fmt.format(value['min'])}-{fmt.format(value['max'])})" \
            if value else "-"

    for r in result["runs"]:
        table.add_row(f"{r['fill']:.0%}", str(r["held"]), f"{r['ingest_tokens_per_s'] or 0:.0f}",
                      cell(r["memllm"], "first_token_s", "{:.2f}"), cell(r["memllm"], "decode_tokens_per_s", "{:.1f}"),
                      cell(r["prompt"], "first_token_s", "{:.2f}"), cell(r["prompt"], "decode_tokens_per_s", "{:.1f}"))
    Console().print(table)


def _integrity_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None)
    for column in ("updates", "held", "fresh facts", "within noise", "perplexity", "ratio", "max norm", "ratio"):
        table.add_column(column, justify="right")
    for r in result["results"]:
        acc = r["retention"]
        table.add_row(str(r["updates"]), str(r["held"]), f"{acc['accuracy']:.0%} ± {acc['stderr']:.0%}",
                      "yes" if r["retention_within_noise"] else "no", f"{r['perplexity']:.2f}",
                      f"{r['perplexity_ratio']:.3f}", f"{r['pool']['max_norm']:.1f}", f"{r['max_norm_ratio']:.3f}")
    Console().print(table)
    print(f"{result['seconds']:.0f} s; data {result['data']['path']} rows {result['data']['rows']}")


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


def _progress_bar(unit: str = "tokens"):
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


def run() -> None:
    app(prog_name="memllm")
