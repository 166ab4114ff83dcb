"""On-disk memories, stored the way git stores files: one directory per memory.

    <name>/memory.json                 format version, model, settings (written at creation)
    <name>/blocks/<sha256>.safetensors immutable: the tokens one update wrote, token-major
                                       (T, ...), plus where they came from (metadata)
    <name>/versions/<sha256>.safetensors
                                       immutable: which block rows make up the pool, in order,
                                       with parent, operation, time, seeds (metadata)
    <name>/evicted/<sha256>.safetensors
                                       a block evicted by the disk budget (max_disk): its token
                                       ids and metadata only, named by the block's id; its keys
                                       and values are recomputed when a question needs them
    <name>/recomputed/<sha256>.safetensors
                                       derived: an evicted block's recomputed keys and values,
                                       kept within the disk budget; never exported
    <name>/reads.jsonl                 when blocks were last read (for the disk budget's LRU)
    <name>/refs/HEAD, refs/tags/<tag>  a version id each, replaced atomically
    <name>/journal.jsonl               append-only log of every operation
    <name>/lock                        writers hold it while they read-modify-write
    <name>/cache/<key>/                derived data (the recall index of a version), rebuilt
                                       when missing; never exported

Blocks and versions are named by the SHA-256 of their bytes, so `verify` can check every
file, identical content is stored once, and no file is ever rewritten. Every file is written
to a temporary name, fsynced and renamed, then the directory is fsynced; HEAD moves last, so
a crash at any instant leaves HEAD at the last committed version (and, at worst, unreferenced
files that `gc` removes). Everything is user-only: 0700 directories, 0600 files.

The store knows tensors and JSON, not models: the service decides what they mean.
`Store(home).open(name)` gives the handle of one memory (`Repo`): it owns that memory's
paths, its lock, its cache folder and its atomic writes, so no other module builds a path
inside a memory's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save

from ..clock import now
from ..config import NAME, private_folder
from ..errors import Busy, InputError, MemoryNotFound, StoreError

# What an evicted block keeps of its tensors: (tensors, codec, rows) -> (kept tensors, their codec)
Keep = Callable[[dict[str, torch.Tensor], dict | None, torch.Tensor], tuple[dict[str, torch.Tensor], dict | None]]


class DamagedBlock(StoreError):
    """A block read for an answer or a write is missing, or not what was stored."""

    def __init__(self, memory: str, block: str, why: str) -> None:
        super().__init__(f"memory {memory!r} is damaged: block {block[:12]} cannot be used: {why}",
                         hint="see memllm verify")
        self.block = block

log = logging.getLogger("memllm")

FORMAT = 3  # 3: blocks may be quantized (a codec in their metadata); see migrations.py
COMMITS = ("ingest", "forget", "rollback", "repair")  # the journal's operations that commit a version
_SHA = re.compile(r"^[0-9a-f]{64}$")
INFO = "memory.json"


@dataclass
class Verification:
    damaged: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    # intact blocks no readable version names: a lost version's, or an interrupted commit's (not
    # damage; gc keeps them until told otherwise, repair puts them back where it can)
    unreached: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged


class Store:
    """The memories under one home directory."""

    def __init__(self, home: Path) -> None:
        self.root = Path(home) / "memories"

    def names(self) -> list[str]:
        """Memories by name: folders with a memory.json, and folders that lost theirs but keep
        a history (damaged memories: `memllm list` shows them, `memllm repair` mends them)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if NAME.match(p.name) and p.is_dir() and (
            (p / INFO).exists() or any((p / "versions").glob("*.safetensors"))))

    def open(self, name: str) -> Repo:
        """The handle of memory `name` (which need not exist yet)."""
        if not NAME.match(name):
            raise MemoryNotFound(
                f"invalid memory name {name!r}",
                hint="use letters, digits, '.', '_' and '-' (at most 64, not starting with '.')",
            )
        return Repo(self, name, self.root / name)


class Repo:
    """One memory's folder: its objects, refs, journal, lock and caches."""

    def __init__(self, store: Store, name: str, folder: Path) -> None:
        self.store = store
        self.name = name
        self.folder = folder

    # -- the memory --------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.folder / INFO).is_file()

    def create(self, info: dict) -> None:
        folder = self.folder
        self._check_no_history()
        _private_dir(self.store.root)
        for sub in ("", "blocks", "versions", "refs", "refs/tags"):
            _private_dir(folder / sub)
        _atomic_write(folder / INFO, json.dumps({**info, "format": FORMAT}, indent=2).encode())

    def info(self) -> dict:
        path = self.folder / INFO
        if not path.is_file():
            self._check_no_history()
            raise MemoryNotFound(f"no memory named {self.name!r}", hint=_known(self.store.names()))
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"memory {self.name!r} is damaged: cannot read {path}: {err}") from None
        _check_format(self.name, info.get("format"))
        return info

    def _check_no_history(self) -> None:
        """A folder with versions but no memory.json is a damaged memory, never a new one."""
        versions = self.folder / "versions"
        if versions.is_dir() and any(versions.glob("*.safetensors")):
            raise StoreError(f"memory {self.name!r} is damaged: memory.json is missing, though it has versions",
                             hint="memllm repair restores it")

    def set_format(self, info: dict, number: int) -> None:
        """memory.json with the format a migration has brought the memory to (not always FORMAT:
        each migration moves one step, and the next one runs only if it says so)."""
        if not isinstance(number, int) or not 1 <= number <= FORMAT:
            raise ValueError(f"a memory's format is 1..{FORMAT}, not {number!r}")
        _atomic_write(self.folder / INFO, json.dumps({**info, "format": number}, indent=2).encode())

    @contextlib.contextmanager
    def lock(self, timeout: float, *, create: bool = False) -> Iterator[None]:
        """Hold the memory's write lock. A writer that has to wait says so at once (through
        the "memllm" logger), naming the holder from `lock.owner` (pid, command, since when).
        Only a writer that may `create` the memory (ingest, import) makes its folder: a
        mistyped name elsewhere is MemoryNotFound and leaves nothing behind."""
        folder = self.folder
        if not create and not folder.is_dir():
            raise MemoryNotFound(f"no memory named {self.name!r}", hint=_known(self.store.names()))
        _private_dir(self.store.root)
        _private_dir(folder)
        lock = FileLock(str(folder / "lock"), timeout=timeout, mode=0o600)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for memory %r: %s (lock_timeout %.0f s)", self.name, self.lock_owner(), timeout)
            try:
                lock.acquire()
            except Timeout:
                raise Busy(
                    f"memory {self.name!r} is busy: {self.lock_owner()} has been writing to it for over "
                    f"{timeout:.0f} s", hint="wait for it to finish, or raise lock_timeout in the config file",
                ) from None
        try:
            owner = {"pid": os.getpid(), "since": datetime.now(UTC).isoformat(timespec="seconds"),
                     "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]}
            with contextlib.suppress(OSError):
                _atomic_write(folder / "lock.owner", json.dumps(owner).encode())
            yield
        finally:
            with contextlib.suppress(OSError):
                (folder / "lock.owner").unlink()
            lock.release()

    def lock_owner(self) -> str:
        """Who holds the write lock, as far as `lock.owner` tells."""
        try:
            owner = json.loads((self.folder / "lock.owner").read_text())
            return f"another memllm process (pid {owner['pid']}, {owner['command']!r}, since {owner['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another memllm process"

    def disk_bytes(self) -> int:
        folder = self.folder
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0

    # -- immutable objects: blocks and versions ----------------------------------------

    def write_block(self, tensors: dict[str, torch.Tensor], meta: dict) -> str:
        """Store the tokens of one update; tensors are token-major (T, ...). Returns its id."""
        return self._put("blocks", tensors, meta)

    def read_block_rows(self, block: str, rows: list[int] | None, keys: tuple[str, ...]) -> dict:
        """Rows of a block's tensors (None: all), read through a memory map: only those rows are read."""
        path = self._object("blocks", block)
        try:
            with safe_open(path, framework="pt") as f:
                out = {}
                for key in keys:
                    if rows is None:
                        out[key] = f.get_tensor(key)
                        continue
                    view = f.get_slice(key)
                    parts = [view[start:stop] for start, stop in _runs(rows)]
                    out[key] = torch.cat(parts) if parts else None
                return out
        except (OSError, SafetensorError) as err:
            raise StoreError(f"memory {self.name!r} is damaged: block {block[:12]} cannot be read: {err}") from None

    def read_block_checked(self, block: str, keys: tuple[str, ...]) -> dict:
        """A whole block's tensors, checked as they are read: its bytes must hash to its id
        and every value must be finite; DamagedBlock otherwise."""
        path = self._object("blocks", block)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DamagedBlock(self.name, block, err.strerror or str(err)) from None
        if hashlib.sha256(data).hexdigest() != block:
            raise DamagedBlock(self.name, block, "its bytes no longer match its id")
        tensors = load(data)
        for key in keys:
            if key not in tensors:
                raise DamagedBlock(self.name, block, f"it has no {key!r}")
            if tensors[key].is_floating_point() and not bool(torch.isfinite(tensors[key]).all()):
                raise DamagedBlock(self.name, block, "it holds NaN or infinite values")
        return {key: tensors[key] for key in keys}

    def has_block(self, block: str) -> bool:
        """Whether the block is stored with its keys and values (not evicted, not missing)."""
        return (self.folder / "blocks" / f"{block}.safetensors").is_file()

    def read_block_ids(self, block: str) -> list[int] | None:
        """The token ids a block's tokens were written from (an evicted block keeps them,
        checked against their checksum: DamagedBlock), or None for blocks written before
        blocks kept them."""
        path = self._block_or_stub(block)
        try:
            with safe_open(path, framework="pt") as f:
                ids = f.get_tensor("ids") if "ids" in f.keys() else None
                meta = json.loads((f.metadata() or {}).get("memllm", "{}"))
        except (OSError, SafetensorError, json.JSONDecodeError) as err:
            raise DamagedBlock(self.name, block, f"it cannot be read: {_why(err, path)}") from None
        if path.parent.name == "evicted" and (ids is None or _ids_digest(ids) != (meta.get("evicted") or {}).get(
                "ids_sha256")):
            raise DamagedBlock(self.name, block, "what eviction kept of it no longer matches its checksum")
        return ids.tolist() if ids is not None else None

    def block_meta(self, block: str) -> dict:
        """A block's metadata, from the block or, once evicted, from what it left behind."""
        return self._meta(self._block_or_stub(block))

    def _block_or_stub(self, block: str) -> Path:
        stub = self.folder / "evicted" / f"{block}.safetensors"
        return stub if not self.has_block(block) and stub.is_file() else self._object("blocks", block)

    # -- the disk budget: evicted blocks, recomputed ones, when blocks were read -----------

    def evicted(self) -> list[str]:
        """Blocks that keep only their token ids and metadata (evicted by the disk budget)."""
        return sorted(p.name.removesuffix(".safetensors") for p in (self.folder / "evicted").glob("*.safetensors"))

    def is_evicted(self, block: str) -> bool:
        return (self.folder / "evicted" / f"{block}.safetensors").is_file()

    def evict_block(self, block: str, keep_rows: list[int] | None = None, keep: Keep | None = None) -> int:
        """Replace a stored block by its token ids and metadata (written first, so one of the
        two is always there); returns the bytes freed. With `keep_rows` (sorted), the stub also
        keeps those rows: what `keep` makes of the block's tensors (but ids), its codec and the
        rows (memory/codec.py `kept_rows`: a quantized block keeps its key scales whole, its
        codes uncompressed); without `keep`, those rows of every tensor (a float16 block). So
        the rows a pool holds still read back exactly."""
        path = self._object("blocks", block)
        size = path.stat().st_size
        ids = self.read_block_ids(block)
        if ids is None:
            raise StoreError(f"block {block[:12]} keeps no token ids: it cannot be recomputed, so it is not evicted")
        tensor = torch.tensor(ids, dtype=torch.int32)
        meta = self.block_meta(block)
        codec = meta.pop("codec", None)  # a stub has no whole keys and values to decode
        tensors = {"ids": tensor}
        evicted = {"time": now(), "bytes": size, "ids_sha256": _ids_digest(tensor)}
        if keep_rows is not None:
            rows = torch.tensor(keep_rows, dtype=torch.int64)
            with safe_open(path, framework="pt") as f:
                stored = {name: f.get_tensor(name) for name in f.keys() if name != "ids"}
            kept, codec = keep(stored, codec, rows) if keep else ({n: t[rows] for n, t in stored.items()}, codec)
            tensors.update({f"kept.{name}": t for name, t in kept.items()})
            tensors["kept.rows"] = rows
            evicted.update(rows=len(keep_rows), kept_sha256=_kept_digest(tensors), kept_codec=codec)
        stub = self._write_stub(block, tensors, meta, evicted)
        path.unlink()
        _fsync_dir(path.parent)
        return size - stub.stat().st_size

    def rebuild_block(self, block: str, ids: list[int], meta: dict, why: str) -> None:
        """Stand in for a damaged or lost block with what eviction would have kept of it: its
        token ids (from its document, which is unchanged) and metadata, under its id, so the
        versions that name it are whole again and its keys and values are recomputed when
        read. The damaged file, if any, moves under damaged/ first."""
        path = self.folder / "blocks" / f"{block}.safetensors"
        if os.path.lexists(path):
            self.set_aside([path])
        tensor = torch.tensor(ids, dtype=torch.int32)
        meta = {k: v for k, v in meta.items() if k != "codec"}
        self._write_stub(block, {"ids": tensor}, meta,
                         {"time": now(), "bytes": 0, "ids_sha256": _ids_digest(tensor), "rebuilt": why})

    def _write_stub(self, block: str, tensors: dict[str, torch.Tensor], meta: dict, evicted: dict) -> Path:
        stub = self.folder / "evicted" / f"{block}.safetensors"
        _private_dir(stub.parent)
        _atomic_write(stub, save(tensors, metadata={"memllm": json.dumps({**meta, "evicted": evicted})}))
        return stub

    def read_kept(self, block: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict | None] | None:
        """The rows an evicted block kept (sorted), their tensors (names as in the block) and the
        block's codec; None when it kept none."""
        path = self.folder / "evicted" / f"{block}.safetensors"
        try:
            with safe_open(path, framework="pt") as f:
                if "kept.rows" not in f.keys():
                    return None
                meta = json.loads((f.metadata() or {}).get("memllm", "{}"))
                tensors = {name: f.get_tensor(name) for name in f.keys() if name.startswith("kept.")}
        except (OSError, SafetensorError, json.JSONDecodeError) as err:
            raise DamagedBlock(self.name, block, f"it cannot be read: {_why(err)}") from None
        evicted = meta.get("evicted") or {}
        if _kept_digest(tensors) != evicted.get("kept_sha256"):
            raise DamagedBlock(self.name, block, "the rows it kept no longer match their checksum")
        tensors = {name.removeprefix("kept."): t for name, t in tensors.items()}
        return tensors.pop("rows"), tensors, evicted.get("kept_codec")

    def _stub_tokens(self, block: str) -> int:
        """The tokens of an evicted block, checked: its ids must hash to what eviction recorded."""
        path = self.folder / "evicted" / f"{block}.safetensors"
        try:
            with safe_open(path, framework="pt") as f:  # opened once: ids, and the kept rows if any
                meta = json.loads((f.metadata() or {}).get("memllm", "{}"))
                ids = f.get_tensor("ids")
                kept = {name: f.get_tensor(name) for name in f.keys() if name.startswith("kept.")}
        except (OSError, SafetensorError, json.JSONDecodeError) as err:
            raise StoreError(f"evicted block {block[:12]}: unreadable: {err}") from None
        evicted = meta.get("evicted") or {}
        if _ids_digest(ids) != evicted.get("ids_sha256"):
            raise StoreError(f"evicted block {block[:12]}: its token ids no longer match their checksum")
        if "kept_sha256" in evicted:
            if _kept_digest(kept) != evicted["kept_sha256"]:
                raise StoreError(f"evicted block {block[:12]}: the rows it kept no longer match their checksum")
        return len(ids)

    def read_recomputed(self, block: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """An evicted block's recomputed keys and values, if cached (and readable)."""
        path = self.folder / "recomputed" / f"{block}.safetensors"
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("memllm", "{}"))
                return {key: f.get_tensor(key) for key in f.keys()}, meta
        except (OSError, SafetensorError, json.JSONDecodeError):
            return None  # derived data: missing or damaged, it is recomputed

    def write_recomputed(self, block: str, tensors: dict[str, torch.Tensor], meta: dict, max_disk: int) -> bool:
        """Cache an evicted block's recomputed keys and values, if that keeps the memory within
        `max_disk` bytes; returns whether it did."""
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"memllm": json.dumps(meta)})
        if self.disk_bytes() + len(data) > max_disk:
            return False
        path = self.folder / "recomputed" / f"{block}.safetensors"
        try:
            _private_dir(path.parent)
            _atomic_write(path, data)
        except OSError as err:  # a cache: a full or read-only disk only costs the next read a recompute
            log.debug("cannot cache recomputed block %s: %s", block[:12], err)
            return False
        return True

    def recomputed(self) -> dict[str, int]:
        """Cached recomputed blocks and their sizes."""
        return {p.name.removesuffix(".safetensors"): p.stat().st_size
                for p in (self.folder / "recomputed").glob("*.safetensors")}

    def drop_recomputed(self, block: str) -> int:
        path = self.folder / "recomputed" / f"{block}.safetensors"
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def note_reads(self, blocks: list[str]) -> None:
        """Record that an answer read these blocks (the disk budget evicts the least recently
        read). Best effort: a memory on a read-only disk still answers."""
        if not blocks:
            return
        line = json.dumps({"time": time.time(), "blocks": blocks}) + "\n"
        try:
            fd = os.open(self.folder / "reads.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as err:
            log.debug("cannot record reads: %s", err)

    def last_reads(self) -> dict[str, float]:
        """When each block was last read (blocks never read are absent)."""
        last: dict[str, float] = {}
        try:
            data = (self.folder / "reads.jsonl").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return last
        for raw in data.splitlines():
            try:
                entry = json.loads(raw)
                for block in entry["blocks"]:
                    last[block] = max(last.get(block, 0.0), float(entry["time"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short, or damaged: it only ages what it named
        return last

    def keep_reads(self, last: dict[str, float]) -> None:
        """Rewrite the reads log as one line per read time (it grows with every answer)."""
        by_time: dict[float, list[str]] = {}
        for block, t in last.items():
            by_time.setdefault(t, []).append(block)
        lines = "".join(json.dumps({"time": t, "blocks": sorted(b)}) + "\n" for t, b in sorted(by_time.items()))
        _atomic_write(self.folder / "reads.jsonl", lines.encode())

    def block_time(self, block: str) -> float:
        """When a block was written (or, evicted, when it was evicted): its file's time."""
        for path in (self.folder / "blocks" / f"{block}.safetensors", self.folder / "evicted" / f"{block}.safetensors"):
            with contextlib.suppress(OSError):
                return path.stat().st_mtime
        return 0.0

    def write_version(self, tensors: dict[str, torch.Tensor], meta: dict) -> str:
        return self._put("versions", tensors, meta)

    def read_version(self, version: str) -> tuple[dict[str, torch.Tensor], dict]:
        path = self._object("versions", version)
        try:
            with safe_open(path, framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
                meta = json.loads((f.metadata() or {}).get("memllm", "null"))
        except (OSError, SafetensorError, json.JSONDecodeError) as err:
            raise StoreError(f"memory {self.name!r} is damaged: version {version[:12]} cannot be read: {err}") from None
        if not isinstance(meta, dict):
            raise StoreError(f"memory {self.name!r} is damaged: version {version[:12]} has no metadata")
        return tensors, meta

    def version_meta(self, version: str) -> dict:
        return self._meta(self._object("versions", version))

    def versions(self) -> list[str]:
        return sorted(p.name.removesuffix(".safetensors") for p in (self.folder / "versions").glob("*.safetensors"))

    def block_count(self) -> int:
        """How many blocks are stored (cheaper than listing them)."""
        try:
            return sum(1 for name in os.listdir(self.folder / "blocks")
                       if name.endswith(".safetensors") and not name.startswith("."))
        except FileNotFoundError:
            return 0

    def blocks(self) -> list[str]:
        return sorted(p.name.removesuffix(".safetensors") for p in (self.folder / "blocks").glob("*.safetensors"))

    def _put(self, kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> str:
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"memllm": json.dumps(meta)})
        digest = hashlib.sha256(data).hexdigest()
        path = self.folder / kind / f"{digest}.safetensors"
        if not path.exists():
            _private_dir(path.parent)
            _atomic_write(path, data)
        return digest

    def _object(self, kind: str, digest: str) -> Path:
        path = self.folder / kind / f"{digest}.safetensors"
        if not path.is_file():
            raise StoreError(f"memory {self.name!r} is damaged: {kind[:-1]} {digest[:12]} is missing")
        return path

    @staticmethod
    def _meta(path: Path) -> dict:
        try:
            with safe_open(path, framework="pt") as f:
                return json.loads((f.metadata() or {}).get("memllm", "{}"))
        except (OSError, SafetensorError, json.JSONDecodeError) as err:
            raise StoreError(f"cannot read {path}: {_why(err, path)}") from None

    # -- refs ------------------------------------------------------------------------

    def head(self) -> str | None:
        return self._ref("HEAD")

    def set_head(self, version: str) -> None:
        self._set_ref("HEAD", version)

    def tags(self) -> dict[str, str]:
        folder = self.folder / "refs" / "tags"
        if not folder.is_dir():
            return {}
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        return {tag: self._ref(f"tags/{tag}") for tag in names}

    def resolve_tag(self, tag: str) -> str | None:
        """The version a snapshot names (None: no such snapshot); StoreError when garbled."""
        return self._ref(f"tags/{tag}") if NAME.match(tag) and tag != "HEAD" else None

    def set_tag(self, tag: str, version: str) -> None:
        if not NAME.match(tag) or tag == "HEAD":
            raise InputError(f"invalid snapshot name {tag!r}", hint="use letters, digits, '.', '_' and '-'")
        self._set_ref(f"tags/{tag}", version)

    def delete_tag(self, tag: str) -> None:
        path = self.folder / "refs" / "tags" / tag
        if not NAME.match(tag) or not path.is_file():
            raise InputError(f"no snapshot named {tag!r}", hint=_known(list(self.tags()), "snapshots"))
        path.unlink()
        _fsync_dir(path.parent)

    def resolve(self, spec: str) -> str:
        """A version id from HEAD, HEAD~N, a snapshot name, or a unique id prefix."""
        base, _, back = spec.partition("~")
        if base == "HEAD":
            version = self.head()
            if version is None:
                raise MemoryNotFound(f"memory {self.name!r} has no versions yet")
        elif base in (tags := self.tags()):
            version = tags[base]
        else:
            matches = [v for v in self.versions() if re.fullmatch(r"[0-9a-f]{4,64}", base) and v.startswith(base)]
            if len(matches) != 1:
                problem = "is ambiguous" if matches else "is neither a snapshot nor a version"
                raise InputError(
                    f"{spec!r} {problem} in memory {self.name!r}", hint="see memllm log and memllm snapshot list"
                )
            version = matches[0]
        if back and not back.isdigit():
            raise InputError(f"{spec!r}: expected a number of versions after '~'")
        steps = int(back) if back else (1 if "~" in spec else 0)
        for _ in range(steps):
            parent = self.version_meta(version).get("parent")
            if parent is None:
                raise InputError(f"{spec!r} goes back past the first version of memory {self.name!r}")
            if not (self.folder / "versions" / f"{parent}.safetensors").is_file():
                raise InputError(f"{spec!r} goes back past what gc kept of memory {self.name!r}'s history")
            version = parent
        return version

    def _ref(self, ref: str) -> str | None:
        path = self.folder / "refs" / ref
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StoreError(f"memory {self.name!r} is damaged: cannot read refs/{ref}: {err}") from None
        if not _SHA.match(value):
            raise StoreError(f"memory {self.name!r} is damaged: refs/{ref} does not name a version")
        return value

    def _set_ref(self, ref: str, version: str) -> None:
        path = self.folder / "refs" / ref
        _private_dir(path.parent)
        _atomic_write(path, f"{version}\n".encode())

    # -- journal -----------------------------------------------------------------------

    def log_operation(self, entry: dict) -> None:
        path = self.folder / "journal.jsonl"
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # a crash cut the last line short
                os.write(fd, (("\n" if torn else "") + json.dumps(entry, sort_keys=True) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:  # os.write names no file: name the journal
            raise OSError(err.errno, err.strerror, str(path)) from None

    def journal(self) -> list[dict]:
        """The journal's entries; lines that are not entries are left out (see `_journal`)."""
        return self._journal()[0]

    def _journal(self) -> tuple[list[dict], list[int]]:
        """The entries, and the numbers of damaged lines. A line that is the start of a JSON
        object cut short (a write a crash interrupted) is skipped silently: the journal is
        append-only and the next write starts a new line after it. Anything else that is not
        a JSON object (other bytes, text that is not UTF-8) is damage."""
        path = self.folder / "journal.jsonl"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return [], []
        except OSError as err:
            raise StoreError(f"memory {self.name!r} is damaged: cannot read journal.jsonl: {err}") from None
        entries, damaged = [], []
        for number, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                entry = json.loads(line)
            except UnicodeDecodeError:
                damaged.append(number)
                continue
            except json.JSONDecodeError:
                if not (line.startswith('{"') and line.isprintable()):
                    damaged.append(number)
                continue
            if isinstance(entry, dict):
                entries.append(entry)
            else:
                damaged.append(number)
        return entries, damaged

    # -- integrity and space ---------------------------------------------------------------

    def verify(self, progress: Callable[[int], None] | None = None) -> Verification:
        """Check every block's and version's checksum, every reference, and the refs."""
        report = Verification()
        folder = self.folder
        blocks, versions = self.blocks(), self.versions()
        good_blocks: dict[str, int] = {}
        for kind, ids in (("blocks", blocks), ("versions", versions)):
            for digest in ids:
                path = folder / kind / f"{digest}.safetensors"
                problem = _stored_file_problem(path, digest)
                if problem:
                    report.damaged.append(f"{kind[:-1]} {digest[:12]}: {problem}")
                elif kind == "blocks":
                    try:
                        with safe_open(path, framework="pt") as f:
                            # tokens: the first axis of keys (float16), of ids (compact), of codes or of rows (trained)
                            rows = next(k for k in ("keys", "ids", "values.codes", "rows", *f.keys()) if k in f.keys())
                            good_blocks[digest] = f.get_slice(rows).get_shape()[0]
                    except (OSError, SafetensorError) as err:
                        report.damaged.append(f"block {digest[:12]}: unreadable: {err}")
                if progress:
                    progress(1)
        evicted = self.evicted()
        for digest in evicted:  # what the disk budget left of a block: its ids, checked
            try:
                tokens = self._stub_tokens(digest)
            except StoreError as err:
                report.damaged.append(err.message)
                continue
            good_blocks.setdefault(digest, tokens)
        damaged_versions = {d.split()[1] for d in report.damaged if d.startswith("version")}
        pruned = self.pruned()
        pruned_blocks = self.pruned_blocks()
        listed: set[str] = set()  # blocks some readable version names
        for version in versions:
            if version[:12] in damaged_versions:
                continue
            try:
                tensors, meta = self.read_version(version)
            except StoreError as err:
                report.damaged.append(f"version {version[:12]}: {err.message}")
                continue
            pairs = [(k, k.replace("block", "row")) for k in tensors if k.split(".")[0].endswith("block")]
            listed.update(meta.get("blocks", []))
            for i, block in enumerate(meta.get("blocks", [])):
                if block.startswith("@"):
                    continue  # the model checkpoint's own rows (trained kind)
                rows = torch.cat([tensors[r][tensors[b] == i].flatten() for b, r in pairs])
                if block not in good_blocks and block in pruned_blocks and not len(rows):
                    continue  # gc bounded the long-term tier; no pool row of this version needs it
                if block not in good_blocks:
                    report.damaged.append(f"version {version[:12]}: block {block[:12]} is missing or damaged")
                elif len(rows) and int(rows.max()) >= good_blocks[block]:
                    report.damaged.append(f"version {version[:12]}: rows past the end of block {block[:12]}")
            parent = meta.get("parent")
            if parent and parent not in versions and parent not in pruned:
                report.damaged.append(f"version {version[:12]}: parent {parent[:12]} is missing")
        refs = {"HEAD": self._safe_ref("HEAD", report)} | {
            f"tags/{t}": self._safe_ref(f"tags/{t}", report)
            for t in (os.listdir(folder / "refs" / "tags") if (folder / "refs" / "tags").is_dir() else [])
            if not t.startswith(".")
        }
        for ref, version in refs.items():
            if version and version not in versions:
                report.damaged.append(f"refs/{ref}: version {version[:12]} is missing")
        if versions and not (folder / "refs" / "HEAD").exists():
            report.damaged.append(f"refs/HEAD is missing, though the memory has {len(versions)} versions")
        if versions and not (folder / "journal.jsonl").exists():
            report.damaged.append(f"journal.jsonl is missing, though the memory has {len(versions)} versions")
        _, torn = self._journal()
        if torn:
            lines = ", ".join(map(str, torn[:5])) + (f" and {len(torn) - 5} more" if len(torn) > 5 else "")
            report.damaged.append(f"journal.jsonl: line {lines} is not a journal entry")
        report.checked = {"blocks": len(blocks), "versions": len(versions), "refs": len(refs),
                          **({"evicted": len(evicted)} if evicted else {})}
        report.unreached = sorted(set(good_blocks) - listed)
        return report

    def damaged_blocks(self, blocks: set[str]) -> list[str]:
        """Those of `blocks` (but a checkpoint's own rows, "@...") that `block_problem` finds
        wrong: missing, unreadable, a link, or not hashing to their id (an evicted block is not
        damaged while what it left behind checks)."""
        return [b for b in sorted(blocks) if not b.startswith("@") and self.block_problem(b)]

    def block_problem(self, block: str) -> str | None:
        """What is wrong with a block a version names (as verify says it), or None."""
        problem = _stored_file_problem(self.folder / "blocks" / f"{block}.safetensors", block)
        if problem == "missing" and self.is_evicted(block):
            try:
                self._stub_tokens(block)
            except StoreError as err:
                return err.message.split(": ", 1)[-1]
            return None
        return problem

    # -- repair ------------------------------------------------------------------------

    def set_aside_objects(self, tags: list[str] = (), versions: list[str] = (), blocks: list[str] = (), *,
                          dry_run: bool = False) -> list[str]:
        """Move damaged snapshot refs, version and block files under damaged/ (see `set_aside`);
        returns their paths inside the memory (what would move, with `dry_run`)."""
        paths = [self.folder / "refs" / "tags" / t for t in tags]
        paths += [self.folder / "versions" / f"{v}.safetensors" for v in versions]
        paths += [self.folder / "blocks" / f"{b}.safetensors" for b in blocks]
        if dry_run:
            return [str(p.relative_to(self.folder)) for p in paths]
        return self.set_aside(paths)

    def damaged_journal_lines(self) -> list[int]:
        return self._journal()[1]

    def set_aside(self, paths: list[Path]) -> list[str]:
        """Move damaged files into <memory>/damaged/<time>/ (never deleted: the user may want
        them); returns their paths relative to the memory's folder."""
        if not paths:
            return []
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        moved = []
        for path in paths:
            relative = path.relative_to(self.folder)
            target = self.folder / "damaged" / stamp / relative
            for parent in reversed(target.parents[: len(relative.parts) + 1]):
                _private_dir(parent)
            os.replace(path, target)
            moved.append(str(relative))
        _fsync_dir(self.folder)
        return moved

    def mend_block_link(self, block: str, *, dry_run: bool = False) -> bool:
        """A block replaced by a symbolic link to a file that holds its bytes: store those bytes
        as the block again (a regular file); returns whether it did (would)."""
        path = self.folder / "blocks" / f"{block}.safetensors"
        try:
            data = path.read_bytes() if path.is_symlink() else None
        except OSError:
            return False
        if data is None or hashlib.sha256(data).hexdigest() != block:
            return False
        if not dry_run:
            _atomic_write(path, data)  # os.replace puts the file where the link was
        return True

    def tag_names(self) -> list[str]:
        """The snapshot refs' names, readable or not."""
        folder = self.folder / "refs" / "tags"
        return sorted(t for t in os.listdir(folder) if not t.startswith(".")) if folder.is_dir() else []

    def listed_blocks(self) -> set[str]:
        """The blocks some readable version names."""
        listed: set[str] = set()
        for version in self.versions():
            try:
                listed.update(self.version_meta(version).get("blocks", []))
            except StoreError:
                continue
        return listed

    def unlisted(self) -> list[str]:
        """Blocks on disk (stored or evicted) that no readable version names: a lost version's,
        or an interrupted commit's (verify's `unreached` are those of them that are intact)."""
        listed = self.listed_blocks()
        return sorted(b for b in set(self.blocks()) | set(self.evicted()) if b not in listed)

    def damaged_tags(self) -> list[str]:
        """Snapshot names whose ref file does not name a version."""
        folder = self.folder / "refs" / "tags"
        out = []
        for tag in sorted(os.listdir(folder)) if folder.is_dir() else []:
            if tag.startswith("."):
                continue
            try:
                self._ref(f"tags/{tag}")
            except StoreError:
                out.append(tag)
        return out

    def mend_journal(self) -> int:
        """Rewrite the journal without its damaged lines (kept under damaged/); returns how many."""
        entries, damaged = self._journal()
        if not damaged:
            return 0
        path = self.folder / "journal.jsonl"
        lines = path.read_bytes().split(b"\n")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        aside = self.folder / "damaged" / stamp
        _private_dir(self.folder / "damaged")
        _private_dir(aside)
        _atomic_write(aside / "journal-lines.txt", b"\n".join(lines[n - 1] for n in damaged) + b"\n")
        _atomic_write(path, b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries))
        return len(damaged)

    def rebuild_info(self, info: dict) -> None:
        """Write memory.json again (after it was damaged), keeping the damaged copy aside."""
        path = self.folder / INFO
        if path.exists():
            self.set_aside([path])
        _atomic_write(path, json.dumps({**info, "format": FORMAT}, indent=2).encode())

    def damaged_versions(self, versions: set[str]) -> list[str]:
        """Those of `versions` whose file is missing or no longer hashes to its id."""
        return [v for v in sorted(versions) if _stored_file_problem(self.folder / "versions" / f"{v}.safetensors", v)]

    def write_journal(self, entries: list[dict]) -> None:
        """Write a journal that was lost (repair rebuilds its entries from the versions)."""
        _atomic_write(self.folder / "journal.jsonl",
                      b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries))

    def has_journal(self) -> bool:
        return (self.folder / "journal.jsonl").exists()

    def last_committed(self) -> str | None:
        """The newest version the journal records as committed whose file is intact."""
        present = set(self.versions())
        for entry in reversed(self.journal()):
            version = entry.get("version")
            if entry.get("op") in COMMITS and version in present \
                    and not self.damaged_versions({version}):
                return version
        return None

    def _safe_ref(self, ref: str, report: Verification) -> str | None:
        try:
            return self._ref(ref)
        except StoreError as err:
            report.damaged.append(err.message.split(": ", 1)[-1])
            return None

    def reachable(self, depth: int | None = None) -> set[str]:
        """Versions reachable from HEAD and the snapshots through parents; with `depth`, only
        the ref itself and its depth - 1 nearest ancestors."""
        seen: set[str] = set()
        present = set(self.versions())
        past = self.past_lost()
        todo = [(v, 1) for v in [self.head(), *self.tags().values()] if v]
        while todo:
            version, level = todo.pop()
            if version in seen or version not in present:
                continue
            seen.add(version)
            parent = self.version_meta(version).get("parent")
            while parent in past:  # a version repair wrote off: history goes on past it
                parent = past[parent]["parent"]
            if parent and (depth is None or level < depth):
                todo.append((parent, level + 1))
        return seen

    def past_lost(self) -> dict[str, dict]:
        """Versions repair wrote off (damaged or missing) that the journal recorded as
        committed: version -> that journal entry (its parent, time, operation, counts), so
        that history can be followed past them."""
        journal = self.journal()
        lost = {v for e in journal if e.get("op") == "repair" for v in e.get("lost_versions", [])}
        present = set(self.versions())
        return {e["version"]: e for e in journal if e.get("version") in lost and e.get("version") not in present
                and e.get("op") in COMMITS and "parent" in e}

    def pruned(self) -> set[str]:
        """Versions gone on purpose, so their children's parent links dangle: deleted by gc,
        or found damaged or missing and written off by repair (history ends there)."""
        return {v for e in self.journal() if e.get("op") in ("gc", "repair")
                for v in e.get("pruned", []) + e.get("lost_versions", [])}

    def pruned_blocks(self) -> set[str]:
        """Long-term blocks that gc deleted on purpose (versions still list them, no pool row uses them)."""
        return {b for e in self.journal() if e.get("op") == "gc" for b in e.get("pruned_blocks", [])}

    def delete_objects(self, kind: str, ids: list[str]) -> int:
        """Delete versions, or blocks (with what eviction left of them and their recomputed
        keys and values); returns the bytes freed."""
        folders = [self.folder / kind] + ([self.folder / "evicted", self.folder / "recomputed"]
                                          if kind == "blocks" else [])
        freed = 0
        for folder in folders:
            for digest in ids:
                path = folder / f"{digest}.safetensors"
                with contextlib.suppress(FileNotFoundError):
                    freed += path.stat().st_size
                    path.unlink()
            if folder.is_dir():
                _fsync_dir(folder)
        return freed

    def remove_if_empty(self) -> None:
        """Remove a memory folder that never got its memory.json (a failed import or create),
        and never one with history (a memory whose memory.json was lost: repair restores it)."""
        folder = self.folder
        history = any((folder / "versions").glob("*.safetensors")) or (folder / "refs" / "HEAD").exists()
        if folder.is_dir() and not (folder / INFO).exists() and not history:
            shutil.rmtree(folder, ignore_errors=True)

    def remove_temporaries(self) -> int:
        freed = 0
        for path in self.folder.rglob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                freed += path.stat().st_size
                path.unlink()
        return freed

    # -- caches (derived data, rebuilt when missing or damaged) --------------------------

    def cached(self, key: str) -> Path | None:
        """The cache folder published under `key`, or None."""
        folder = self.folder / "cache" / key
        return folder if folder.is_dir() else None

    def write_cache(self, key: str, fill: Callable[[Path], None]) -> None:
        """Publish a cache folder under `key`: `fill` writes it in a private temporary folder,
        which is renamed into place; every other cache entry is removed (one key is live)."""
        cache = self.folder / "cache"
        _private_dir(cache)
        tmp = Path(tempfile.mkdtemp(prefix=".cache-", dir=cache))
        try:
            fill(tmp)
            for file in tmp.iterdir():
                file.chmod(0o600)
            try:
                tmp.rename(cache / key)
            except OSError:
                pass  # another process published it meanwhile
            for old in cache.iterdir():
                if old.name != key and not old.name.startswith("."):
                    shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def drop_cache(self, key: str | None = None) -> None:
        """Remove one cache entry, or all of them (they may hold the text of purged documents)."""
        shutil.rmtree(self.folder / "cache" / key if key else self.folder / "cache", ignore_errors=True)

    # -- format 1 (a single pool file), for the migration ------------------------------------

    def read_legacy_pool(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        path = self.folder / "pool.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("memllm", "null"))
                return {key: f.get_tensor(key) for key in f.keys()}, meta
        except (OSError, SafetensorError, json.JSONDecodeError) as err:
            raise StoreError(f"memory {self.name!r} is damaged: cannot read {path}: {err}") from None

    def remove_legacy_pool(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / "pool.safetensors").unlink()




def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted rows as [start, stop) runs: [1, 2, 3, 7] -> [(1, 4), (7, 8)]."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def _stored_file_problem(path: Path, digest: str) -> str | None:
    """What is wrong with an immutable stored file, or None: it must be a regular file (not a
    link to somewhere else), readable, and hash to its name."""
    try:
        if path.is_symlink():
            return "replaced by a symbolic link (a stored file is a regular file)"
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"cannot be read: {_why(err)}"
    return None if hashlib.sha256(data).hexdigest() == digest else "checksum mismatch"


def _why(err: Exception, path: Path | None = None) -> str:
    """An error's reason in a few words (an OSError's strerror, not its repr). The safetensors
    reader reports a file it may not open in its own words: `path` is opened to say why."""
    if path is not None and not isinstance(err, OSError):
        try:
            with open(path, "rb"):
                pass
        except OSError as opened:
            err = opened
    return (err.strerror or str(err)) if isinstance(err, OSError) else str(err)


def _check_format(name: str, found) -> None:
    if not isinstance(found, int):
        raise StoreError(f"memory {name!r} is damaged: no format version")
    if found > FORMAT:
        raise StoreError(
            f"memory {name!r} was written by a newer memllm (format {found}; this one reads up to {FORMAT})",
            hint="upgrade memllm",
        )


def _known(names: list[str], what: str = "memories") -> str:
    if not names:
        return "nothing has been ingested yet: memllm ingest FILE" if what == "memories" else f"no {what} yet"
    return f"known {what}: " + ", ".join(names)


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


def _kept_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the kept tensors (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(k for k in tensors if k.startswith("kept.")):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _private_dir(path: Path) -> None:
    """A folder of the store (made user-only, with the folders above it that memllm creates)."""
    private_folder(path)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file; an error names `path` (the file the
    user's memory was writing), not the temporary file."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)  # mode 0600
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
