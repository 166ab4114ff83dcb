"""memllm repair: from whatever `verify` reports back to a clean `verify`, losing nothing that
can be kept, and saying what is left and the command that clears it.

What it mends, in this order:
- memory.json damaged or missing: written again (from the journal, else from HEAD and the model);
- journal.jsonl missing: rebuilt from the versions; damaged lines: moved under damaged/;
- HEAD lost, garbled, or naming a damaged version: HEAD names the newest intact version the
  journal records as committed (or `--to`), and the commits made after it are made again from
  what they left behind: the blocks they wrote (intact, but named by no version any more) go
  back into the pool as the updates that wrote them, with the same drops, and forgets are
  applied again. Snapshots that named the lost version name the rebuilt one;
- damaged versions other than HEAD, and parents that are missing: moved under damaged/ and
  written off in the journal (log shows them from it; verify no longer counts the gap);
- a damaged, missing or unreadable block: rebuilt from its document when the document is still
  on disk as it was ingested (what eviction keeps of a block: its token ids, whose keys and values
  are recomputed when read); else it remains, and the report names the document and the ways
  to clear it: `forget --purge DOC`, the file put back and `repair` again, or `repair --drop-damaged`.

Nothing is deleted: damaged files move under the memory's damaged/ folder. The report's
`remaining` is what `verify` would still report; the CLI exits 6 while it is not empty.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__, memory
from ..clock import now
from ..errors import InputError, StoreError
from ..memory.base import CHUNK_TOKENS
from ..store.repo import COMMITS
from ..text.chunking import chunk_document

UNNAMED = ("<stdin>", "<purged>")  # documents no file on disk can stand for


class Problems:
    """What is wrong with each block (repo.block_problem), read once per repair: checking a
    block hashes it, and a large memory has gigabytes of blocks."""

    def __init__(self, repo) -> None:
        self.repo, self.seen = repo, {}

    def __call__(self, block: str) -> str | None:
        if block not in self.seen:
            self.seen[block] = self.repo.block_problem(block)
        return self.seen[block]


@dataclass
class RepairReport:
    memory: str
    dry_run: bool
    mended: list[str] = field(default_factory=list)
    remaining: list[dict] = field(default_factory=list)  # {problem, fix}
    set_aside: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)  # documents taken back into HEAD from their blocks
    outside_head: list[str] = field(default_factory=list)  # documents whose blocks no version names now
    head: str | None = None
    head_repaired: bool = False
    old_head: str | None = field(default=None, repr=False)  # what a damaged HEAD named
    rebuilt: bool = field(default=False, repr=False)  # whether the lost commits were made again
    lost_versions: list[str] = field(default_factory=list, repr=False)  # written off (log shows them)
    problems: Problems | None = field(default=None, repr=False)  # each block checked once


    def to_dict(self) -> dict:
        return {"memory": self.memory, "problem": self.mended[0] if self.mended else None, "problems": self.mended,
                "head": self.head, "head_repaired": self.head_repaired, "set_aside": self.set_aside,
                "restored": self.restored, "outside_head": self.outside_head, "remaining": self.remaining,
                "repaired": bool(self.mended) and not self.dry_run, "ok": not self.remaining,
                "dry_run": self.dry_run}


def repair(session, target: str | None = None, *, dry_run: bool = False, drop_damaged: bool = False) -> RepairReport:
    """Mend what verify reports (see the module's docstring). `target`: the version HEAD
    names when HEAD is lost (then nothing after it is rebuilt); `drop_damaged`: remove the
    blocks that cannot be rebuilt from every version (their documents lose those chunks)."""
    repo = session.repo
    report = RepairReport(session.memory_name, dry_run)
    report.problems = Problems(repo)
    with repo.lock(session.settings.lock_timeout):
        problem = info_problem(repo)
        if problem:
            if not dry_run:
                repo.rebuild_info(recovered_info(session))
            report.mended.append(f"memory.json: {problem}")
        _journal(session, report)
        session._open(locked=True)
        _head(session, report, target)
        _tags_and_versions(session, report)
        _blocks(session, report, drop_damaged)
        if report.mended and not dry_run:
            repo.drop_cache()  # derived from what was damaged (the recall index lists damaged blocks)
            repo.log_operation({"time": now(), "op": "repair", "version": report.head or repo.head(),
                                "problem": report.mended[0], "problems": report.mended,
                                "lost_versions": report.lost_versions})
        if not dry_run:
            _remaining(repo, report)
    report.head = report.head or repo.head()
    return report


# -- memory.json and the journal -------------------------------------------------------------

def info_problem(repo) -> str | None:
    try:
        repo.info()
    except StoreError as err:
        return err.message.split(": ", 2)[-1]
    return None


def recovered_info(session) -> dict:
    """memory.json as it was: from the journal's create entry, else rebuilt from the newest
    intact version and the model that wrote it (named by the journal, or --model)."""
    repo = session.repo
    created = next((e for e in repo.journal() if e.get("op") == "create"), {})
    if isinstance(created.get("info"), dict):
        return created["info"]
    version = repo.last_committed() or next(
        (v for v in sorted(repo.versions()) if not repo.damaged_versions({v})), None)
    if version is None or not (session.settings.model or created.get("model")):
        raise StoreError(f"memory {session.memory_name!r}: memory.json is damaged and nothing records it",
                         hint="memllm --model MODEL repair, with the model that wrote the memory")
    meta = repo.version_meta(version)
    lm = session.model({"model": {"name": created.get("model"), "fingerprint": None}})
    return {"kind": meta["kind"], "pool_size": meta["pool_size"], "write_context": meta["write_context"],
            "dtype": meta["dtype"], "model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "sink": lm.prompt.sink_text, "created": created.get("time", meta.get("time")), "memllm": __version__}


def _journal(session, report: RepairReport) -> None:
    repo = session.repo
    versions = repo.versions()
    if versions and not repo.has_journal():
        entries = [{"time": session.repo.info().get("created"), "op": "create", "info": repo.info(), "rebuilt": True}]
        for version in versions:
            if repo.damaged_versions({version}):
                continue
            meta = repo.version_meta(version)
            entries.append({"time": meta.get("time"), "op": meta.get("op"), "version": version,
                            "parent": meta.get("parent"), "message": meta.get("message", ""),
                            **meta.get("stats", {}), "rebuilt": True})
        entries[1:] = sorted(entries[1:], key=lambda e: str(e["time"]))
        report.mended.append(f"journal.jsonl was missing: rebuilt from {len(entries) - 1} version(s)")
        if not report.dry_run:
            repo.write_journal(entries)
        return
    torn = repo.damaged_journal_lines()
    if torn:
        report.mended.append(f"journal.jsonl: {len(torn)} damaged line(s)")
        if not report.dry_run:
            repo.mend_journal()


# -- HEAD -------------------------------------------------------------------------------------

def head_problem(repo) -> str | None:
    """What is wrong with refs/HEAD, or None when it names an intact version (or the memory
    has no version yet)."""
    try:
        head = repo.head()
    except StoreError as err:
        return err.message.split(": ", 1)[-1]
    versions = repo.versions()
    if head is None:
        return "refs/HEAD is missing" if versions else None
    if head not in versions:
        return f"refs/HEAD names version {head[:12]}, which is missing"
    if repo.damaged_versions({head}):
        return f"refs/HEAD names version {head[:12]}, which is damaged"
    return None


def point_head(repo, version: str, dry_run: bool) -> None:
    if repo.damaged_versions({version}):
        raise StoreError(f"version {version[:12]} is damaged too", hint="choose another: memllm repair --to VERSION")
    if not dry_run:
        repo.set_head(version)


def _head(session, report: RepairReport, target: str | None) -> None:
    repo = session.repo
    problem = head_problem(repo)
    if problem is None:
        if target is not None:
            raise InputError("HEAD is intact; nothing to repair", hint="memllm snapshot rollback moves it")
        if head := repo.head():  # an interrupted commit's blocks, named by no version: its updates again
            _rebuild_lost_commits(session, report, head)
        return
    try:
        report.old_head = repo.head()  # the version a damaged HEAD named (snapshots may name it too)
    except StoreError:
        report.old_head = None
    head = repo.resolve(target) if target else repo.last_committed()
    if head is None:
        raise StoreError(f"memory {session.memory_name!r}: the journal names no intact committed version",
                         hint="memllm repair --to VERSION (ids are the names in its versions/ folder)")
    point_head(repo, head, report.dry_run)
    report.mended.append(problem)
    report.head, report.head_repaired = head, not report.dry_run
    if target is None:
        _rebuild_lost_commits(session, report, head)


def _rebuild_lost_commits(session, report: RepairReport, head: str) -> None:
    """Make again, on top of `head`, the commits the journal records after it whose versions
    are lost: their blocks back into the pool as the updates that wrote them, forgets again."""
    repo = session.repo
    journal = repo.journal()
    at = max((i for i, e in enumerate(journal) if e.get("version") == head and e.get("op") in COMMITS), default=-1)
    present = set(repo.versions())
    lost = [e for e in journal[at + 1:] if e.get("op") in COMMITS and e.get("version") != head and (
        e.get("version") not in present or repo.damaged_versions({e.get("version")}))]
    orphans = _unreached(repo, report.problems)
    if not lost and not orphans:
        return
    mem = session.load(head, model=False)
    base_updates = mem.update_count
    steps: list[tuple[str, list[str] | None, dict]] = []
    for entry in lost:
        if entry["op"] == "ingest":
            steps.append(("blocks", [b for b in entry["blocks"] if b in orphans] if "blocks" in entry else None, entry))
        elif entry["op"] == "forget" and entry.get("forgotten"):
            steps.append(("forget", entry["forgotten"], entry))
        elif entry["op"] == "rollback" and entry.get("target"):
            target = str(entry["target"])[:12]
            report.remaining.append({"problem": f"a lost version was a rollback to {target}",
                                     "fix": f"memllm snapshot rollback {target} --yes"})
    if orphans and not any(kind == "blocks" for kind, _, _ in steps):
        steps.append(("blocks", None, {}))  # a journal from before commits listed their blocks
    done: dict[str, int] = {}  # block -> the source it went back into
    restored: list[str] = []
    for kind, what, entry in steps:
        if kind == "forget":
            live = {i for i, s in enumerate(mem.sources) if s["name"] in what and not s.get("forgotten")}
            if live:
                mem.forget(live)
                restored.append("forget " + ", ".join(what))
            continue
        blocks = what if what is not None else sorted(
            (b for b in orphans if b not in done and int(orphans[b].get("update", -1)) >= base_updates),
            key=lambda b: int(orphans[b]["update"]))
        for block in (b for b in blocks if b not in done):
            meta = orphans[block]
            source = _source_for(mem, meta)
            if mem.replay(block, meta, source) is None:  # the kind cannot: the blocks stay, outside HEAD
                report.outside_head = sorted({m.get("source", b[:12]) for b, m in orphans.items()})
                report.mended.append(f"{', '.join(report.outside_head)}: outside HEAD now; their blocks are kept "
                                     "(gc keeps them): ingest them again to bring them back")
                return
            done[block] = source
            if meta.get("source") not in restored:
                restored.append(meta.get("source"))
        if "(checkpoint)" in entry.get("message", "") or "(stopped by" in entry.get("message", ""):
            if done:  # the lost commit was a stopped ingest's: its last document may be unfinished
                mem.sources[list(done.values())[-1]]["partial"] = True
    for source in set(done.values()):  # chunks missing between those taken back: ingest it again to finish
        chunks = [int(orphans[b].get("chunk", 0)) for b, s in done.items() if s == source]
        if max(chunks) + 1 != mem.sources[source]["chunks"]:
            mem.sources[source]["partial"] = True
    report.restored = [r for r in restored if r]
    if not report.restored:
        return
    report.mended.append("rebuilt the lost commit(s) from what they left: " + ", ".join(report.restored))
    if not report.dry_run:
        report.head = session._commit(mem, "repair", "repair: " + ", ".join(report.restored)[:200],
                                      {"restored": report.restored})
        report.rebuilt = True


def _unreached(repo, problem: Problems) -> dict[str, dict]:
    """Intact blocks no readable version names, with their metadata."""
    out = {}
    for block in repo.unlisted():
        if problem(block):
            continue
        try:
            out[block] = repo.block_meta(block)
        except StoreError:
            continue
    return out


def _source_for(mem, meta: dict) -> int:
    """The source a replayed block belongs to: the live document of its name and content (a
    stopped ingest's, continued), else a new revision of it (the old text forgotten, as an
    ingest of the edited file does), else a new document."""
    name, sha = meta.get("source", "<stdin>"), meta.get("source_sha256", "")
    live = mem.live_source(None if name == "<stdin>" else name)
    if live is not None and mem.sources[live]["sha256"] == sha:
        return live
    for i, src in enumerate(mem.sources):
        if src["sha256"] == sha and src["name"] == name and not src.get("forgotten"):
            return i
    source = mem.add_source(name, sha)
    if live is not None:
        mem.sources[source]["revision"] = mem.sources[live].get("revision", 1) + 1
        mem.forget({live})
    return source


# -- snapshots and versions ------------------------------------------------------------------

def _tags_and_versions(session, report: RepairReport) -> None:
    repo = session.repo
    aside_tags: list[str] = []
    if tags := repo.damaged_tags():
        report.mended.append(f"snapshot refs that name no version: {', '.join(tags)}")
        aside_tags += tags
    versions = set(repo.versions())
    broken = set(repo.damaged_versions(versions))
    head = report.head or repo.head()
    for tag, version in _readable_tags(repo).items():
        if version in versions and version not in broken:
            continue
        if version == report.old_head and (report.rebuilt or report.dry_run and report.restored):
            report.mended.append(f"snapshot {tag} named the lost version {version[:12]}: it names the rebuilt one")
            if not report.dry_run:
                repo.set_tag(tag, head)
            continue
        report.mended.append(f"snapshot {tag} named version {version[:12]}, which is "
                             f"{'damaged' if version in broken else 'missing'}: set aside")
        aside_tags.append(tag)
    stray = sorted(broken - {head})
    missing_parents = set()
    pruned = repo.pruned()
    for version in versions - broken:
        parent = repo.version_meta(version).get("parent")
        if parent and parent not in versions and parent not in pruned:
            missing_parents.add(parent)
    for what, versions_ in (("damaged", stray), ("missing", sorted(missing_parents))):
        if versions_:
            report.mended.append(f"{what} versions, written off (log shows them from the journal): "
                                 + ", ".join(v[:12] for v in versions_))
    report.lost_versions = sorted(set(stray) | missing_parents)
    report.set_aside += repo.set_aside_objects(tags=aside_tags, versions=stray, dry_run=report.dry_run)


def _readable_tags(repo) -> dict[str, str]:
    out = {}
    for tag in repo.tag_names():
        try:
            version = repo.resolve_tag(tag)
        except StoreError:
            continue
        if version:
            out[tag] = version
    return out


# -- blocks -------------------------------------------------------------------------------

def origins(repo) -> dict[str, dict]:
    """What the readable versions tell of each block they name (memory kinds' `block_origins`),
    the most telling record kept (one with the update that wrote it)."""
    out: dict[str, dict] = {}
    for version in repo.versions():
        try:
            tensors, meta = repo.read_version(version)
        except StoreError:
            continue
        for block, origin in memory.for_version(meta).block_origins(tensors, meta).items():
            if block not in out or out[block].get("tokens") is None and origin.get("tokens") is not None:
                out[block] = origin
    return out


def _blocks(session, report: RepairReport, drop_damaged: bool) -> None:
    repo, check = session.repo, report.problems
    named: dict[str, str] = {}  # damaged block -> problem
    kinds, listed, pruned = set(), set(), repo.pruned_blocks()
    for version in repo.versions():
        try:
            meta = repo.version_meta(version)
        except StoreError:
            continue
        kinds.add(memory.for_version(meta))
        listed.update(meta.get("blocks", []))
        for block in meta.get("blocks", []):
            if block.startswith("@") or block in named or block in pruned:
                continue
            if problem := check(block):
                named[block] = problem
    unnamed = [b for b in repo.blocks() if b not in listed and check(b)]
    if unnamed:  # damaged files no version needs: nothing to rebuild them for
        report.mended.append(f"damaged blocks no version names: {', '.join(b[:12] for b in unnamed)}")
        report.set_aside += repo.set_aside_objects(blocks=unnamed, dry_run=report.dry_run)
    if not named:
        return
    where = origins(repo)
    rebuildable = bool(kinds) and all(kind.recomputes for kind in kinds)
    tokenizer = None
    gone: list[str] = []
    for block, problem in sorted(named.items()):
        origin = where.get(block)
        doc = origin["source"]["name"] if origin else None
        described = f"block {block[:12]}" + (f" ({doc}, chunk {origin['chunk']})" if doc else "") + f": {problem}"
        if problem.startswith("replaced by a symbolic link") and repo.mend_block_link(block, dry_run=report.dry_run):
            report.mended.append(f"{described}: the file it linked to holds the block: stored again as a file")
            continue
        rebuilt = None
        if rebuildable and origin:
            if tokenizer is None:
                tokenizer = session.model(repo.info()).tokenizer
            rebuilt = _rebuild_block(repo, block, origin, tokenizer, report.dry_run)
        if rebuilt:
            report.mended.append(f"{described}: rebuilt from {rebuilt} (recomputed when read)")
            continue
        if drop_damaged:
            gone.append(block)
            report.mended.append(f"{described}: removed from every version (--drop-damaged)")
            continue
        fix = []
        if doc and doc not in UNNAMED:
            fix.append(f"put {doc} back as it was ingested and run memllm repair again")
        if doc and doc != "<purged>":
            fix.append(f"memllm forget --purge --yes {doc if doc not in UNNAMED else origin['source']['sha256'][:12]} "
                       "(removes it from every version)")
        fix.append("memllm repair --drop-damaged --yes (removes the blocks that cannot be rebuilt from every version)")
        report.remaining.append({"problem": described, "fix": "; or ".join(fix)})
    if gone and not report.dry_run:
        session._purge(set(), blocks=set(gone))


def _rebuild_block(repo, block: str, origin: dict, tokenizer, dry_run: bool) -> str | None:
    """Rebuild a damaged block from its document's file, if that file is still the text that
    wrote it (by content hash) and re-chunking it gives the block's chunk; returns the file."""
    candidates = [origin] + ([origin["held"]] if origin.get("held") and origin["held"] is not origin else [])
    for place in candidates:
        source = place["source"]
        name = source.get("name", "")
        if name in UNNAMED or source.get("purged"):
            continue
        try:
            data = Path(name).read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() != source.get("sha256"):
            continue
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            continue
        chunks = chunk_document(text, tokenizer, CHUNK_TOKENS)
        index = int(place.get("chunk", 0))
        tokens = origin.get("tokens") if place is origin else None
        if index >= len(chunks) or tokens is not None and len(chunks[index].ids) != tokens:
            continue
        chunk = chunks[index]
        if not dry_run:
            repo.rebuild_block(block, chunk.ids, {
                "source": name, "source_sha256": source["sha256"], "chunk": index, "start": chunk.start,
                "end": chunk.end, "tokens": len(chunk.ids), "update": origin.get("update") or 0,
            }, why=f"from {name}")
        return name
    return None


def _remaining(repo, report: RepairReport) -> None:
    """What verify still reports after the repair, beyond the blocks already listed."""
    listed = [r["problem"].split(" ")[1] for r in report.remaining if r["problem"].startswith("block ")]
    for line in repo.verify().damaged:
        if not any(f"block {b}" in line for b in listed):
            report.remaining.append({"problem": line, "fix": "see docs/cli.md, 'Versions' (repair --to VERSION "
                                                             "chooses HEAD; forget --purge removes a document)"})
