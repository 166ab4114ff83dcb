"""The memory commands: ingest, ask, status, list, log, snapshot, diff, forget, verify, gc,
export, import. Each parses flags, makes one call into the service, renders the result."""

from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError, StoreError, Ungrounded, UsageError
from ..progress import Stop
from .app import Terminated, app, backend, exit_for, service, stopping_signals
from .render import disk_size, emit, err, interactive, progress_for, safe, show, size, table


@app.command()
def ingest(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="Files, folders (recursive), globs, or - for stdin.")],
    sync: Annotated[bool, typer.Option("--sync", help="Mirror the folders named: documents under them whose files "
                                       "are gone are forgotten (in the same version).")] = False,
    name: Annotated[str | None, typer.Option("--name", help="Name standard input (-): a later ingest under the "
                                             "same name replaces it.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write documents again even if unchanged.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress: neither the bar on a terminal nor "
                                        "the lines every 30 s in logs.")] = False,
    max_disk: Annotated[str | None, typer.Option("--max-disk", metavar="SIZE", help="Keep the memory within SIZE "
                                                 "(500MB, 1GB, 2GiB): beyond it the least recently read long-term "
                                                 "blocks keep only their text and are recomputed when a question "
                                                 "needs them [config: max_disk; default: no limit].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Write text into memory: chunks of at most 512 tokens, one update each. A file is one
    document by its resolved path: an edited file replaces its earlier text.

    Examples:
      memllm ingest notes.txt
      memllm ingest docs/ 'journal/*.md'
      memllm ingest --sync ~/notes          (in cron: a no-op when nothing changed)
      git log -5 | memllm -m work ingest --name git-log -
    """
    stdin = sys.stdin.buffer if sys.stdin is not None else None  # None: closed (<&-)
    chosen = backend(ctx, max_disk=disk_size(max_disk))  # a disk budget of its own: in-process
    if chosen.through_server and interactive() and not (quiet or as_json):
        err("memllm: writing through memllm serve (no progress bar); Ctrl-C stops at a chunk boundary")
    stop = Stop()
    with stop_at_chunk_boundary(stop):
        report = chosen.ingest(paths, stdin=stdin, name=name, force=force, sync=sync,
                               progress=progress_for(as_json, quiet), stop=stop)
    for skipped in report.skipped:
        err(f"memllm: skipped {safe(skipped['path'])}: {skipped['reason']}")
    for warning in report.warnings:
        err(f"memllm: warning: {warning}")

    def text() -> None:
        if report.unchanged:
            err(f"memllm: {len(report.unchanged)} unchanged, already in memory (use --force to write again)")
        for updated in report.updated:
            err(f"memllm: updated {safe(updated)}: its new text replaces the old")
        for removed in report.removed:
            err(f"memllm: forgot {safe(removed)}: its file is gone")
        for moved in report.renamed:
            err(f"memllm: {safe(moved['from'])} is now {safe(moved['to'])}: its chunks kept under the new name")
        for resumed in report.resumed:
            err(f"memllm: resumed {safe(resumed)} where the stopped ingest left it")
        if report.reused:
            err(f"memllm: {report.reused} chunk(s) already in memory kept, not written again")
        if report.disk and (report.disk["evicted_blocks"] or report.disk.get("trimmed_blocks")):
            trimmed = report.disk.get("trimmed_blocks", 0)
            err(f"memllm: {report.disk['evicted_blocks']} least recently read block(s) evicted"
                + (f" and {trimmed} pool block(s) trimmed to the rows the pool holds" if trimmed else "")
                + f" to keep within max_disk ({size(report.disk['max_disk'])}): their text stays, recomputed "
                "when read")
        if report.disk and report.disk.get("note"):
            err(f"memllm: warning: {report.disk['note']}")
        print(f"{report.files} file(s), {report.chunks} chunk(s), {report.tokens} tokens written "
              f"in {report.seconds:.1f} s; memory {report.memory!r} holds {report.tokens_held}/{report.pool_size} "
              f"{report.unit} ({report.fill:.0%})" + (f", {report.dropped} dropped" if report.dropped else ""))

    emit(report.to_dict(), as_json, text)
    if report.interrupted:
        err(f"memllm: stopped by {report.interrupted} at a chunk boundary; what was written is committed: "
            "run the same command again to resume")
        raise typer.Exit(exit_for(report.interrupted))


@contextmanager
def stop_at_chunk_boundary(stop):
    """While chunks are written, Ctrl-C, SIGTERM or SIGHUP asks the ingest to stop at the next chunk
    boundary and commit (a second one stops at once, keeping the last commit); before
    that, they stop at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        if stop.armed and not stop.requested:
            stop.request(signal.Signals(signum).name)
            err(f"memllm: {stop.requested}: stopping at the next chunk boundary (again to stop at once)")
            return
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)

    before = {s: signal.signal(s, handler) for s in stopping_signals()}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@app.command()
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
                                               "512].")] = None,
    sources: Annotated[bool, typer.Option("--sources", help="After the answer, list the documents it read "
                                          "(path, chunk, excerpt), most relevant first.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print {answer, grounded, model, memory, tokens, "
                                          "seconds, sources}.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 8 when the answer is not grounded in what was "
                                         "read from memory (the answer is still printed).")] = False,
) -> None:
    """Answer a question from memory, streaming the answer to stdout. When nothing read
    from memory supports the answer, a line on stderr says so ("grounded": false in --json).

    Examples:
      memllm ask "When is the budget review?"
      memllm ask --sources "Who has the shed key?"
      memllm -m work ask --json "Who owns the migration?" | jq -r .answer
    """
    if question == "-":
        if sys.stdin is None:
            raise InputError("- means standard input, but it is closed")
        question = sys.stdin.read()
    answer = backend(ctx).ask(question, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, seed=seed, budget=budget)
    if as_json:
        for _ in answer:
            pass
        emit(answer.to_dict(), True, print)
        _grounded(answer, strict)
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
                print(f"  {i}. {safe(c['source'])} (chunk {c['chunk']}, score {c['score']:.2f}): {c['excerpt']}")
    _grounded(answer, strict)


def _grounded(answer, strict: bool) -> None:
    """One line on stderr when the answer is not grounded; with --strict, exit 8."""
    if answer.grounded is not False:
        return
    message = ("not grounded: nothing read from memory supports this answer "
               f"(relevance {answer.info['relevance']:.2f}, support {answer.info['support']:.2f}); "
               "it may be made up")
    if strict:
        raise Ungrounded(message, hint="the memory may not hold this; see memllm ask --sources")
    err(f"memllm: {message}")


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show what a memory holds: model, pool size, fill, updates, disk size, tokens per source.

    Examples:
      memllm status
      memllm -m work status --json
    """
    info = backend(ctx).status()

    def text() -> None:
        show(f"memory [bold]{info['memory']}[/] ({info['kind']}), model {info['model']}\n"
             f"pool {info['tokens']}/{info['pool_size']} {info['unit']} ({info['fill']:.0%} full), "
             f"{info['updates']} updates, {info['dropped']} {info['unit'].split()[0]} dropped, "
             f"{size(info['disk_bytes'])} on disk"
             + (f" (max_disk {size(info['max_disk'])})" if info.get("max_disk") is not None else "")
             + (f", {info['block_format']} blocks" if info.get("block_format") else "")
             + (f", {info['evicted_blocks']} blocks evicted (recomputed when read)" if info.get("evicted_blocks")
                else ""))
        if info["sources"]:
            rows = table("source", "chunks", "tokens written", f"held ({info['unit']})", "held %", "long-term",
                         fold="source")
            for s in info["sources"]:
                share = s["held"] / s["written"] if s["written"] else 0
                name = safe(s["name"]) + (" (partial: ingest it again to finish)" if s.get("partial") else "")
                rows.add_row(name, str(s["chunks"]), str(s["tokens_written"]), str(s["held"]),
                             f"{share:.0%}", str(s["long_term"]))
            show(rows)

    emit(info, as_json, text)


@app.command("list")
def list_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the memories under MEMLLM_HOME: model, what each holds, versions, snapshots, disk size.

    Examples:
      memllm list
    """
    memories = service(ctx).list_memories()

    def text() -> None:
        if not memories:
            err("memllm: no memories yet: memllm ingest FILE creates one")
        for m in memories:
            if "damaged" in m:
                print(f"{m['memory']}  damaged: {m['damaged']}  {size(m['disk_bytes'])}  (see memllm -m "
                      f"{m['memory']} verify)")
                continue
            print(f"{m['memory']}  {m['tokens']}/{m['pool_size']} {m['unit']}  {m['versions']} versions  "
                  f"{m['snapshots']} snapshots  {size(m['disk_bytes'])}  {m['model']}")

    emit(memories, as_json, text)


@app.command("log")
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
    entries = service(ctx).log(limit)

    def text() -> None:
        for e in entries:
            tags = f" ({', '.join(e['tags'])})" if e["tags"] else ""
            lost = "  (lost: damaged, written off by memllm repair)" if e.get("lost") else ""
            print(f"{e['version'][:12]}  {e['time']}  {e['op']:<8}  +{e['added']} -{e['dropped']} "
                  f"= {e['tokens']} {e['unit'] or ''}  {safe(e['message'])}{tags}{lost}")

    emit(entries, as_json, text)


snapshot_app = typer.Typer(help="Name versions of the memory, list them, roll back to them.", no_args_is_help=True)
app.add_typer(snapshot_app, name="snapshot")


@snapshot_app.command("create")
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
    result = service(ctx).snapshot_create(name, message)
    emit(result, as_json, lambda: print(f"snapshot {result['snapshot']} = version {result['version'][:12]}"))


@snapshot_app.command("list")
def snapshot_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List snapshots.

    Examples:
      memllm snapshot list
    """
    snapshots = service(ctx).snapshot_list()

    def text() -> None:
        for snap in snapshots:
            print(f"{snap['snapshot']}  {snap['version'][:12]}  {snap['time']}  {snap['tokens']} {snap['unit']}  "
                  f"{snap['message']}")

    emit(snapshots, as_json, text)


@snapshot_app.command("delete")
def snapshot_delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Snapshot to delete (the version stays).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Delete a snapshot name. The version it named stays until gc finds nothing refers to it.

    Examples:
      memllm snapshot delete before-import
    """
    result = service(ctx).snapshot_delete(name)
    emit(result, as_json, lambda: print(f"deleted snapshot {result['deleted']}"))


@snapshot_app.command("rollback")
def snapshot_rollback(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="A snapshot, a version id (prefix), or HEAD~N.")] = "HEAD~1",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask (required without a terminal).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would change.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Make an earlier version current again. The rollback is itself a version: undo it
    with `memllm snapshot rollback HEAD~1`. What is confirmed is what happens: if the
    memory changes between the plan and the rollback, nothing is rolled back (exit 7).

    Examples:
      memllm snapshot rollback before-import --dry-run
      memllm snapshot rollback HEAD~3 --yes
    """
    memllm = service(ctx)
    plan = memllm.rollback(target, dry_run=True)
    if plan["from"] is None:  # HEAD was lost: a rollback repairs it (nothing to diff against)
        if not dry_run:
            plan = memllm.rollback(target)
        emit(plan, as_json, lambda: print(f"HEAD was damaged ({plan['repaired']['problem']}); "
                                          f"{'it would now name' if dry_run else 'it now names'} {plan['to'][:12]}"))
        return
    if not as_json:
        err(f"memllm: rollback {plan['from'][:12]} -> {plan['to'][:12]} ({target}): "
            f"+{plan['diff']['totals']['added']} -{plan['diff']['totals']['dropped']} {plan['unit']}")
    if dry_run or plan["from"] == plan["to"]:
        emit(plan, as_json, lambda: err("memllm: already there; nothing to do") if plan["from"] == plan["to"] else None)
        return
    if not yes:
        if as_json or not interactive():
            raise UsageError("rollback changes the memory; pass --yes to confirm (or --dry-run)")
        if not typer.confirm("Roll back?", err=True):
            raise typer.Exit(1)
    result = memllm.rollback(target, plan=plan)
    emit(result, as_json, lambda: print(f"HEAD is now {result['version'][:12]} (the pool of {result['to'][:12]})"))


@app.command()
def repair(
    ctx: typer.Context,
    to: Annotated[str | None, typer.Option("--to", help="A snapshot or version id for HEAD (default: the newest "
                                           "intact version the journal records as committed, with the commits "
                                           "after it made again from their blocks).")] = None,
    drop_damaged: Annotated[bool, typer.Option("--drop-damaged", help="Remove the damaged blocks that cannot be "
                                               "rebuilt from every version (their documents lose those chunks; "
                                               "needs --yes).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before --drop-damaged (needed without a "
                                      "TTY).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be mended.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Mend what verify reports, losing nothing: a lost or garbled HEAD (the commits after the
    last intact one made again from their blocks), a damaged memory.json or journal, damaged
    versions and snapshot refs (moved under the memory's damaged/ folder), damaged blocks
    whose documents are still on disk unchanged (rebuilt from them). Exits 6 while damage
    remains, with the command that clears each part.

    Examples:
      memllm verify || memllm repair
      memllm repair --to before-import
      memllm repair --drop-damaged --yes
    """
    if drop_damaged and not yes and not dry_run:
        if as_json or not interactive():
            raise UsageError("--drop-damaged removes blocks from every version for good; pass --yes to confirm")
        if not typer.confirm("Remove the blocks that cannot be rebuilt from every version, for good?", err=True):
            raise typer.Exit(1)
    result = service(ctx).repair(to, dry_run=dry_run, drop_damaged=drop_damaged)

    def text() -> None:
        if not result["problems"] and not result["remaining"]:
            print(f"nothing to repair (HEAD {result['head'][:12]})" if result["head"]
                  else "nothing to repair (no versions yet)")
            return
        verb = "would mend" if dry_run else "mended"
        for problem in result["problems"]:
            print(f"{verb}: {safe(problem)}")
        if result["set_aside"]:
            print(f"{'would move' if dry_run else 'moved'} under damaged/: {', '.join(result['set_aside'])}")
        if result["head"] and result["head_repaired"]:
            print(f"HEAD {'would name' if dry_run else 'names'} {result['head'][:12]}")
        for left in result["remaining"]:
            err(f"memllm: still damaged: {safe(left['problem'])}")
            err(f"memllm:   to clear it: {left['fix']}")

    emit(result, as_json, text)
    if result["remaining"] or (dry_run and result["problems"]):
        raise typer.Exit(StoreError.exit_code)


@app.command()
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
    result = service(ctx).diff(a, b)

    def text() -> None:
        rows = table("source", "added", "dropped", "held", "retained", fold="source",
                     title=f"{result['from'][:12]} -> {result['to'][:12]} ({result['unit']})")
        for row in result["sources"]:
            rows.add_row(safe(row["source"]), str(row["added"]), str(row["dropped"]), str(row["held"]),
                         f"{row['retained']:.0%}")
        t = result["totals"]
        rows.add_row("total", str(t["added"]), str(t["dropped"]), str(t["held"]), "", style="bold")
        show(rows)

    emit(result, as_json, text)


@app.command()
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
        if as_json or not interactive():
            raise UsageError("--purge deletes data for good; pass --yes to confirm")
        if not typer.confirm(f"Purge {', '.join(sources)} from every version, for good?", err=True):
            raise typer.Exit(1)
    result = service(ctx).forget(sources, purge=purge)

    def text() -> None:
        print(f"forgot {', '.join(map(safe, result['forgotten']))}: {result['tokens_removed']} {result['unit']} "
              f"removed, {result['tokens']} held; version {result['version'][:12]}")
        if purge:
            print(f"purged: {result['purged_blocks']} blocks deleted ({size(result['bytes_freed'])}), "
                  f"{result['versions_rewritten']} versions rewritten")

    emit(result, as_json, text)


@app.command()
def verify(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check every block's and version's checksum, every reference, and the refs.
    Exits 6 and lists what is damaged if anything is.

    Examples:
      memllm verify && echo intact
    """
    result = service(ctx).verify()

    def text() -> None:
        c = result["checked"]
        print(f"checked {c['blocks']} blocks, {c['versions']} versions, {c['refs']} refs: "
              + ("intact" if result["ok"] else f"{len(result['damaged'])} problem(s)"))
        for line in result["damaged"]:
            err(f"memllm: damaged: {line}")
        if result["unreached"]:
            err(f"memllm: note: {len(result['unreached'])} intact block(s) no version names (a version lost to "
                "damage, or an interrupted commit): memllm repair takes them back into HEAD")

    emit(result, as_json, text)
    if not result["ok"]:
        raise typer.Exit(StoreError.exit_code)


@app.command()
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
    max_disk: Annotated[str | None, typer.Option("--max-disk", metavar="SIZE", help="Then evict the least "
                                                 "recently read long-term blocks until the memory fits SIZE "
                                                 "[config: max_disk; default: no limit].")] = None,
    drop_unreached: Annotated[bool, typer.Option("--drop-unreached", help="Also delete blocks no version names "
                                                 "(kept by default: a version lost to damage or an interrupted "
                                                 "commit wrote them; memllm repair takes them back). Needs "
                                                 "--yes.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before --drop-unreached.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Delete versions no snapshot or HEAD reaches, and blocks no remaining version uses.
    With --max-disk, then evict blocks to fit it (ask recomputes them when it needs them).
    Blocks that no version names at all are kept unless --drop-unreached.

    Examples:
      memllm gc --dry-run
      memllm gc --keep-versions 20
      memllm gc --keep-long-term 200000
    """
    if drop_unreached and not yes and not dry_run:
        if as_json or not interactive():
            raise UsageError("--drop-unreached deletes blocks no version names, for good; pass --yes to confirm")
        if not typer.confirm("Delete the blocks no version names, for good?", err=True):
            raise typer.Exit(1)
    result = service(ctx, max_disk=disk_size(max_disk)).gc(dry_run=dry_run, keep_versions=keep_versions,
                                                           keep_long_term=keep_long_term,
                                                           drop_unreached=drop_unreached)
    verb = "would delete" if dry_run else "deleted"
    disk = result.get("disk") or {}

    def text() -> None:
        print(f"{verb} {result['versions_deleted']} versions and {result['blocks_deleted']} blocks"
              + (f", evicted {disk['evicted_blocks']}" if disk.get("evicted_blocks") else "")
              + (f", trimmed {disk['trimmed_blocks']}" if disk.get("trimmed_blocks") else "")
              + ("" if dry_run else f", {size(result['bytes_freed'])} freed"))
        if disk.get("note"):
            err(f"memllm: warning: {disk['note']}")
        if result["unreached_kept"]:
            err(f"memllm: kept {result['unreached_kept']} block(s) no version names (a version lost to damage, "
                "or an interrupted commit): memllm repair takes them back into HEAD; memllm gc --drop-unreached "
                "--yes deletes them")

    emit(result, as_json, text)


@app.command("export")
def export_(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="The archive to write (a tar file), or - for stdout.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file; export a damaged memory "
                                        "as it is.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (on stderr with -).")] = False,
) -> None:
    """Write a memory, with its whole history and its model's fingerprint, to one archive.
    Refuses an existing file without --force, and never replaces a link, FIFO or device.

    Examples:
      memllm -m work export work-memory.tar
      memllm -m work export - | ssh backup 'cat > work.tar'
    """
    if file == "-":
        result = service(ctx).export(sys.stdout.buffer, force=force)
        sys.stdout.flush()
        if as_json:
            err(json.dumps(result))
        return
    result = service(ctx).export(Path(file), force=force)
    emit(result, as_json,
         lambda: print(f"exported memory {result['memory']!r} to {result['file']} ({size(result['bytes'])})"))


@app.command("import")
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
    result = service(ctx).import_(file)
    emit(result, as_json, lambda: print(f"imported memory {result['memory']!r} ({result['versions']} versions, "
                                        f"model {result['model']})"))


