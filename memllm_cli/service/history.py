"""History: versions, snapshots, rollback, diff, forgetting, integrity, space, archives.

Everything here reads and writes the store through the session's handle; what a stored
version means (its pool, its blocks, the unit it counts in) comes from the memory kind
that wrote it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from .. import memory
from ..clock import now
from ..errors import Busy, InputError, MemoryNotFound, StoreError, UsageError
from ..memory.base import forecast
from ..store import archive
from . import repair
from .session import Session


class History(Session):
    # -- versions ----------------------------------------------------------------------

    def log(self, limit: int | None = None) -> list[dict]:
        """Versions from HEAD back through their parents, newest first."""
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise UsageError(f"the number of versions to show must be >= 1, got {limit}")
        repo = self.repo
        self._open()
        problem = repair.head_problem(repo)
        if problem is not None:
            raise StoreError(f"memory {self.memory_name!r} is damaged: {problem}", hint="memllm repair restores it")
        tags: dict[str, list[str]] = {}
        for tag, version in repo.tags().items():
            tags.setdefault(version, []).append(tag)
        out, version = [], repo.head()
        present = set(repo.versions())
        past = repo.past_lost()  # versions repair wrote off: shown from the journal, history goes on
        unit = None
        while (version in present or version in past) and (limit is None or len(out) < limit):  # stops where gc pruned
            if version in past:
                entry = past[version]
                out.append({"version": version, "time": entry.get("time"), "op": entry.get("op"),
                            "message": entry.get("message", ""), "tags": tags.get(version, []),
                            **{k: entry.get(k, 0) for k in ("tokens", "added", "dropped")}, "unit": unit,
                            "lost": True})
                version = entry.get("parent")
                continue
            meta = repo.version_meta(version)
            unit = memory.for_version(meta).unit
            out.append({"version": version, "time": meta["time"], "op": meta["op"], "message": meta["message"],
                        "tags": tags.get(version, []), **meta["stats"], "unit": unit})
            version = meta.get("parent")
        return out

    def snapshot_create(self, tag: str | None = None, message: str = "") -> dict:
        repo = self.repo
        with repo.lock(self.settings.lock_timeout):
            self._open(locked=True)
            version = repo.resolve("HEAD")
            tag = tag or "snapshot-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            if tag in repo.tags():
                raise InputError(f"a snapshot named {tag!r} exists", hint="delete it first or choose another name")
            repo.set_tag(tag, version)
            repo.log_operation({"time": now(), "op": "snapshot", "tag": tag, "version": version, "message": message})
        return {"snapshot": tag, "version": version, "message": message}

    def snapshot_list(self) -> list[dict]:
        repo = self.repo
        self._open()
        messages = {e.get("tag"): e.get("message", "") for e in repo.journal() if e.get("op") == "snapshot"}
        out = []
        for tag, version in repo.tags().items():
            meta = repo.version_meta(version)
            out.append({"snapshot": tag, "version": version, "time": meta["time"], "tokens": meta["stats"]["tokens"],
                        "unit": memory.for_version(meta).unit, "message": messages.get(tag, "")})
        return out

    def snapshot_delete(self, tag: str) -> dict:
        repo = self.repo
        with repo.lock(self.settings.lock_timeout):
            self._open(locked=True)
            try:
                version = repo.resolve_tag(tag)
            except StoreError:  # a garbled snapshot ref names nothing: deleting it loses nothing
                version = None
            repo.delete_tag(tag)
            repo.log_operation({"time": now(), "op": "snapshot-delete", "tag": tag, "version": version})
        return {"deleted": tag, "version": version}

    def rollback(self, target: str, *, dry_run: bool = False, plan: dict | None = None) -> dict:
        """Make `target`'s pool the new HEAD, as a new version (so a rollback can be rolled back).

        A dry run returns the plan. Given a `plan` (from a dry run), the rollback happens only
        if HEAD and the target are still what the plan was made from."""
        repo = self.repo
        with repo.lock(self.settings.lock_timeout):
            self._open(locked=True)
            problem = self._head_problem()
            if problem is not None:  # HEAD itself is lost: point it at the target (a repair)
                repaired = self._repair(repo.resolve(target), problem, dry_run)
                return {"from": None, "to": repaired["head"], "target": target, "diff": None, "dry_run": dry_run,
                        "unit": None, "version": repaired["head"], "repaired": repaired}
            head, version = repo.resolve("HEAD"), repo.resolve(target)
            if plan is not None and (plan["from"], plan["to"]) != (head, version):
                raise Busy(f"memory {self.memory_name!r} changed since the rollback was planned "
                           f"(HEAD is now {head[:12]}); nothing was rolled back", hint="run the rollback again")
            diff = self._diff(head, version)
            planned = {"from": head, "to": version, "target": target, "diff": diff, "dry_run": dry_run,
                       "unit": diff["unit"]}
            if dry_run or head == version:
                return {**planned, "version": head}
            tensors, meta = repo.read_version(version)
            meta = {**meta, "parent": head, "op": "rollback", "time": now(), "message": f"rollback to {target}",
                    "updates": [], "target": version,
                    "stats": {"tokens": meta["stats"]["tokens"], "added": diff["totals"]["added"],
                              "dropped": diff["totals"]["dropped"]}}
            new = repo.write_version(tensors, meta)
            repo.set_head(new)
            repo.log_operation({"time": meta["time"], "op": "rollback", "version": new, "parent": head,
                                "target": version, "message": meta["message"]})
        return {**planned, "version": new}

    def diff(self, a: str = "HEAD~1", b: str = "HEAD") -> dict:
        """Per source document: units added, dropped and held between two versions."""
        self._open()
        return self._diff(self.repo.resolve(a), self.repo.resolve(b))

    def _diff(self, a: str, b: str) -> dict:
        """Rows per document: an edited document is one row (its identity is its name; unnamed
        stdin and purged documents are told apart by content)."""
        sides = []
        for version in (a, b):
            tensors, meta = self.repo.read_version(version)
            sides.append({key: _identity(*doc) for key, doc in
                          memory.for_version(meta).pool_keys(tensors, meta).items()})
        old, new = sides
        meta_b = self.repo.version_meta(b)
        kind = memory.for_version(meta_b)
        layers = kind.version_layers(meta_b)
        latest = {_identity(s["sha256"], s["name"]): s for s in meta_b["sources"]}  # each document's newest text
        rows: dict[tuple[str, str], dict] = {}
        for key, ident in {**old, **new}.items():
            src = latest.get(ident)
            row = rows.setdefault(ident, {"source": ident[1], "sha256": src["sha256"] if src else ident[0],
                                          "added": 0, "dropped": 0, "held": 0,
                                          "written": kind.version_written(src) if src else 0})
            row["added"] += key in new and key not in old
            row["dropped"] += key in old and key not in new
            row["held"] += key in new
        per_update, pool = kind.version_forecast(meta_b)
        for ident, row in rows.items():
            for k in ("added", "dropped", "held"):
                row[k] = round(row[k] / layers)
            row["retained"] = round(row["held"] / row["written"], 4) if row["written"] else 0.0
            readable = row["sha256"] and ident in latest and not latest[ident].get("forgotten")  # ask reads it
            row["long_term"] = max(0, row["written"] - row["held"]) if readable else 0
            for t in (10, 100):
                row[f"pool_after_{t}"] = round(forecast(row["held"], pool, meta_b["pool_size"], per_update, t))
        totals = {k: sum(r[k] for r in rows.values()) for k in ("added", "dropped", "held")}
        return {"from": a, "to": b, "sources": sorted(rows.values(), key=lambda r: r["source"]), "totals": totals,
                "unit": kind.unit}

    # -- repair ------------------------------------------------------------------------

    def repair(self, target: str | None = None, *, dry_run: bool = False, drop_damaged: bool = False) -> dict:
        """Mend what verify reports, losing nothing that can be kept (service/repair.py);
        `remaining` says what is left and the command that clears each."""
        return repair.repair(self, target, dry_run=dry_run, drop_damaged=drop_damaged).to_dict()

    def _repair(self, version: str, problem: str, dry_run: bool) -> dict:
        """Point a lost or damaged HEAD at `version` (rollback does this while HEAD is damaged)."""
        repair.point_head(self.repo, version, dry_run)
        if not dry_run:
            self.repo.log_operation({"time": now(), "op": "repair", "version": version, "problem": problem})
        return {"memory": self.memory_name, "problem": problem, "head": version, "repaired": not dry_run,
                "dry_run": dry_run}

    def _head_problem(self) -> str | None:
        return repair.head_problem(self.repo)

    # -- forgetting --------------------------------------------------------------------

    def forget(self, sources: list[str], *, purge: bool = False) -> dict:
        """A new version without these documents' tokens (by path as ingested, or content hash).

        With `purge`, also rewrite every version without them and delete their blocks, so
        that no byte they wrote stays on disk (their names stay in the journal)."""
        with self.repo.lock(self.settings.lock_timeout):
            self._open(locked=True)
            mem = self.load(model=False)
            if mem is None:
                raise MemoryNotFound(f"memory {self.memory_name!r} is empty")
            chosen = _match_sources(mem.sources, sources, include_forgotten=purge)
            shas = {mem.sources[i]["sha256"] for i in chosen}
            held = mem.forget(set(chosen))
            self.check_head(mem)  # forgetting the damaged documents is allowed: what remains must be intact
            names = [mem.sources[i]["name"] for i in chosen]
            version = self._commit(mem, "forget", "forget " + ", ".join(names), {"forgotten": names},
                                   forgotten=names)
            result = {"version": version, "forgotten": names, "tokens_removed": held, "tokens": len(mem),
                      "unit": mem.unit}
            if purge:  # every revision of these documents: a later one may keep chunks an earlier one wrote
                shas |= {s["sha256"] for s in mem.sources if s["name"] in set(names)}
                result.update(self._purge(shas))
                result["version"] = self.repo.head()
        return result

    def _purge(self, shas: set[str], blocks: set[str] = frozenset()) -> dict:
        """Rewrite every version without the blocks of these sources (and `blocks`), parents
        first, then move the refs and delete the old versions and the blocks."""
        repo = self.repo
        versions = repo.versions()
        metas = {v: repo.version_meta(v) for v in versions}
        order: list[str] = []
        done: set[str] = set()
        for start in versions:  # parents before children
            chain = []
            v = start
            while v and v not in done and v in metas:
                chain.append(v)
                v = metas[v].get("parent")
            for v in reversed(chain):
                done.add(v)
                order.append(v)
        owners = {b: _source_sha(repo, b) for b in repo.blocks() + repo.evicted()}
        purged_blocks = set(blocks) | {b for b, sha in owners.items() if sha in shas}
        if shas and (None in owners.values() or {b for b in repo.listed_blocks() if b[0] != "@"} - set(owners)):
            # a block whose metadata cannot be read, or that is gone: the versions say whose it was
            purged_blocks |= {b for b, o in repair.origins(repo).items() if o["source"].get("sha256") in shas}
        mapping: dict[str, str] = {}
        for v in order:
            tensors, meta = repo.read_version(v)
            blocks = meta.get("blocks", [])
            gone = [i for i, b in enumerate(blocks) if b in purged_blocks]
            kind = memory.for_version(meta)
            new_tensors, extra = kind.without_blocks(tensors, meta, gone)
            secret = [src["name"] for src in meta.get("sources", []) if src["sha256"] in shas]
            message = meta.get("message", "")
            for hidden in secret:
                message = message.replace(hidden, "<purged>")
            new_meta = {
                **meta, "blocks": [b for i, b in enumerate(blocks) if i not in set(gone)], "message": message,
                "parent": mapping.get(meta.get("parent"), meta.get("parent")),
                "sources": [{**src, "name": "<purged>", "forgotten": True, "purged": True}
                            if src["sha256"] in shas else src for src in meta.get("sources", [])],
                "updates": [u for u in meta.get("updates", []) if meta["sources"][u["source"]]["sha256"] not in shas],
                "forgotten": [n for n in meta.get("forgotten", []) if n not in secret],
                "stats": {**meta.get("stats", {}), "tokens": kind.held_in(new_tensors, meta)},
                **extra,
            }
            mapping[v] = repo.write_version(new_tensors, new_meta)
        head = repo.head()
        for tag, version in repo.tags().items():
            repo.set_tag(tag, mapping.get(version, version))
        if head:
            repo.set_head(mapping.get(head, head))
        repo.drop_cache()  # the recall index holds their text
        stale = [v for v in versions if mapping.get(v, v) != v]
        repo.delete_objects("versions", stale)
        freed = repo.delete_objects("blocks", sorted(purged_blocks))
        repo.log_operation({"time": now(), "op": "purge", "versions_rewritten": len(stale),
                            "blocks_deleted": len(purged_blocks), "bytes": freed})
        return {"purged_blocks": len(purged_blocks), "versions_rewritten": len(stale), "bytes_freed": freed}

    # -- integrity and space -----------------------------------------------------------

    def verify(self) -> dict:
        self.repo.info()
        report = self.repo.verify()
        return {"memory": self.memory_name, "ok": report.ok, "damaged": report.damaged, "checked": report.checked,
                "head": self.repo.head() if report.ok else None, "unreached": report.unreached}

    def gc(self, *, dry_run: bool = False, keep_versions: int | None = None,
           keep_long_term: int | None = None, fit: bool = True, drop_unreached: bool = False) -> dict:
        """Delete versions no ref reaches and blocks no kept version uses. With `keep_versions`
        (default: the config's gc_keep_versions, else all), keep only HEAD's and each
        snapshot's nearest that many versions of history. With `keep_long_term` (tokens;
        default: the config's gc_keep_long_term, else all), also delete the oldest blocks of
        the long-term tier (blocks none of whose tokens is in a kept version's pool) beyond
        that many tokens: this bounds the disk a memory takes, at the cost of what ask can
        still find. Then, with max_disk set (and `fit`), evict blocks until the memory fits it
        (service/space.py): what ask finds stays, recomputed when read.

        Blocks that no version names (a version lost to damage, an interrupted commit) are
        kept: repair takes them back into HEAD; `drop_unreached` deletes them."""
        repo = self.repo
        keep_versions = keep_versions or self.settings.gc_keep_versions
        keep_long_term = keep_long_term if keep_long_term is not None else self.settings.gc_keep_long_term
        with repo.lock(self.settings.lock_timeout):
            self._open(locked=True)
            report = repo.verify()
            if not report.ok:  # what gc would delete is decided from refs and versions that may be wrong
                raise StoreError(f"memory {self.memory_name!r} is damaged ({report.damaged[0]}); gc deletes nothing",
                                 hint="see memllm verify; memllm repair mends it")
            keep = repo.reachable(keep_versions)
            versions = [v for v in repo.versions() if v not in keep]
            named = {v: repo.version_meta(v).get("blocks", []) for v in repo.versions()}
            used = {b for v in keep for b in named[v]}
            listed = {b for blocks in named.values() for b in blocks}
            stored = list(dict.fromkeys(repo.blocks() + repo.evicted()))
            unreached = [b for b in stored if b not in listed]
            blocks = [b for b in stored if b not in used and (b in listed or drop_unreached)]
            long_term = self._long_term_beyond(keep, keep_long_term) if keep_long_term is not None else []
            freed = 0
            if not dry_run:
                freed += repo.delete_objects("versions", versions)
                freed += repo.delete_objects("blocks", blocks + long_term)
                freed += repo.remove_temporaries()
                repo.log_operation({"time": now(), "op": "gc", "versions": len(versions),
                                    "blocks": len(blocks) + len(long_term), "bytes": freed,
                                    "pruned": versions, "pruned_blocks": long_term})
            disk = self.fit_disk() if fit and not dry_run else None
            if disk is not None:
                freed += disk["bytes_freed"]
        return {"versions_deleted": len(versions), "blocks_deleted": len(blocks) + len(long_term),
                "long_term_blocks_deleted": len(long_term), "bytes_freed": freed, "dry_run": dry_run,
                "unreached_kept": 0 if drop_unreached else len(unreached),
                **({"disk": disk} if disk is not None else {})}

    def _long_term_beyond(self, keep: set[str], tokens: int) -> list[str]:
        """Blocks only the long-term tier holds, oldest first, past the newest `tokens` tokens."""
        repo = self.repo
        in_pool: set[str] = set()
        listed: list[str] = []
        for version in keep:
            tensors, meta = repo.read_version(version)
            in_pool |= memory.for_version(meta).held_blocks(tensors, meta)
            listed += [b for b in meta.get("blocks", []) if b not in listed]
        tier = [b for b in listed if b not in in_pool and not b.startswith("@") and
                (repo.has_block(b) or repo.is_evicted(b))]
        tier.sort(key=lambda b: -int(repo.block_meta(b).get("update", 0)))  # newest first
        kept, out = 0, []
        for block in tier:
            size = int(repo.block_meta(block).get("tokens", 0))
            if kept + size <= tokens:
                kept += size
            else:
                out.append(block)
        return out

    # -- archives and listings ---------------------------------------------------------

    def export(self, path: Path | BinaryIO, *, force: bool = False) -> dict:
        """Write the whole memory (model fingerprint, blocks, versions, refs, journal) to one tar
        file, or to a binary stream. A memory that fails verify is not exported (an archive
        import would refuse is no backup) unless `force`, which also replaces an existing file."""
        with self.repo.lock(self.settings.lock_timeout):
            self._open(locked=True)
            report = self.repo.verify()
            if not report.ok and not force:
                raise StoreError(f"memory {self.memory_name!r} is damaged: " + "; ".join(report.damaged[:3]),
                                 hint="see memllm verify; --force exports it as it is")
            if isinstance(path, (str, Path)):
                files = archive.export(self.repo, Path(path), force=force)
                written = {"file": str(path), "bytes": Path(path).stat().st_size}
            else:
                files = archive.write(self.repo, path)
                written = {"file": "-"}
        return {"memory": self.memory_name, **written, "files": files}

    def import_(self, path: Path) -> dict:
        """Install a memory from an export under --memory's name (which must not exist yet)."""
        repo = self.repo
        if repo.exists():
            raise InputError(f"memory {self.memory_name!r} exists", hint="import under another name with --memory NAME")
        try:
            with repo.lock(self.settings.lock_timeout, create=True):
                report = archive.import_(repo, Path(path))
        finally:
            repo.remove_if_empty()
        info = repo.info()
        repo.log_operation({"time": now(), "op": "import", "file": str(path)})
        return {"memory": self.memory_name, "model": info["model"]["name"],
                "versions": report.checked.get("versions", 0)}

    def memories(self) -> list[str]:
        return self.store.names()

    def list_memories(self) -> list[dict]:
        """Every memory under MEMLLM_HOME: model, what it holds, versions, snapshots, disk."""
        out = []
        for name in self.store.names():
            repo = self.store.open(name)
            try:
                info = repo.info()
                head = repo.head()
                if head is None and repo.versions():
                    raise StoreError("refs/HEAD is missing")
                meta = repo.version_meta(head) if head else info
                snapshots = len(repo.tags())
            except StoreError as err:  # one damaged memory does not hide the others
                out.append({"memory": name, "damaged": err.message, "disk_bytes": repo.disk_bytes()})
                continue
            out.append({"memory": name, "model": info["model"]["name"], "tokens": meta["stats"]["tokens"] if head
                        else 0, "unit": memory.for_version(meta).unit, "pool_size": info["pool_size"],
                        "versions": len(repo.versions()), "snapshots": snapshots,
                        "disk_bytes": repo.disk_bytes()})
        return out


def _source_sha(repo, block: str) -> str | None:
    try:
        return repo.block_meta(block).get("source_sha256")
    except StoreError:
        return None  # unreadable: repair.origins tells


def _identity(sha256: str, name: str) -> tuple[str, str]:
    """What makes rows the same document in a diff: the name, except where names do not tell
    documents apart (unnamed stdin, purged documents): there the content."""
    return (sha256, name) if name in ("<stdin>", "<purged>") else ("", name)


def _match_sources(sources: list[dict], wanted: list[str], *, include_forgotten: bool = False) -> list[int]:
    """Indices of the sources named by path (as ingested or resolved) or a hash prefix."""
    chosen = []
    for want in wanted:
        resolved = str(Path(want).expanduser().resolve()) if want != "<stdin>" else want
        hits = [
            i for i, s in enumerate(sources)
            if (include_forgotten or not s.get("forgotten")) and not s.get("purged") and (
                s["name"] == want
                or (s["name"] != "<stdin>" and str(Path(s["name"]).resolve()) == resolved)
                or (len(want) >= 8 and s["sha256"].startswith(want.lower()))
            )
        ]
        if not hits:
            raise InputError(f"{want}: no such document in memory", hint="see memllm status for what it holds")
        chosen += [i for i in hits if i not in chosen]
    return chosen
