"""On-disk memories: one directory per memory under $MEMLLM_HOME/memories/.

    <name>/memory.json        format version, model, settings; written once, at creation
    <name>/pool.safetensors   the whole pool and its bookkeeping (in the safetensors
                              metadata), replaced atomically on every commit
    <name>/lock               writers hold it (filelock) while they read-modify-write

A commit writes a temporary file in the same directory, fsyncs it, renames it over the old
one and fsyncs the directory, so a crash at any instant leaves either the old or the new
pool, never a mix. Readers take no lock: they always see a complete file. Everything is
created user-only (0700 directories, 0600 files): memories hold private notes.

The store knows tensors and JSON, not models: the service decides what they mean.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import Busy, MemoryNotFound, StoreError

FORMAT = 1  # bump with a migration when the layout changes
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
INFO = "memory.json"
POOL = "pool.safetensors"


class Store:
    def __init__(self, home: Path) -> None:
        self.root = Path(home) / "memories"

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise MemoryNotFound(
                f"invalid memory name {name!r}",
                hint="use letters, digits, '.', '_' and '-' (at most 64, not starting with '.')",
            )
        return self.root / name

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / INFO).is_file())

    def exists(self, name: str) -> bool:
        return (self.path(name) / INFO).is_file()

    def create(self, name: str, info: dict) -> None:
        folder = self.path(name)
        _private_dir(self.root)
        _private_dir(folder)
        _atomic_write(folder / INFO, json.dumps({"format": FORMAT, **info}, indent=2).encode())

    def info(self, name: str) -> dict:
        path = self.path(name) / INFO
        if not path.is_file():
            raise MemoryNotFound(f"no memory named {name!r}", hint=_known(self.names()))
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"memory {name!r} is damaged: cannot read {path}: {err}") from None
        _check_format(name, info.get("format"))
        return info

    def read_pool(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The last committed pool and its metadata, or None if nothing was committed yet."""
        path = self.path(name) / POOL
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("memllm", "null"))
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (OSError, SafetensorError, json.JSONDecodeError, ValueError) as err:
            raise StoreError(f"memory {name!r} is damaged: cannot read {path}: {err}") from None
        if not isinstance(meta, dict):
            raise StoreError(f"memory {name!r} is damaged: {path} has no memllm metadata")
        _check_format(name, meta.get("format"))
        return tensors, meta

    def write_pool(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        folder = self.path(name)
        fd, tmp = tempfile.mkstemp(prefix=".pool-", suffix=".tmp", dir=folder)  # mode 0600
        os.close(fd)
        try:
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                tmp,
                metadata={"memllm": json.dumps({"format": FORMAT, **meta})},
            )
            _fsync(tmp)
            os.replace(tmp, folder / POOL)
            _fsync_dir(folder)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float) -> Iterator[None]:
        folder = self.path(name)
        _private_dir(self.root)
        _private_dir(folder)
        lock = FileLock(str(folder / "lock"), timeout=timeout, mode=0o600)
        try:
            lock.acquire()
        except Timeout:
            raise Busy(
                f"memory {name!r} is busy: another memllm process has been writing to it for over {timeout:.0f} s",
                hint="wait for it to finish, or raise lock_timeout in the config file",
            ) from None
        try:
            yield
        finally:
            lock.release()

    def disk_bytes(self, name: str) -> int:
        folder = self.path(name)
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def _check_format(name: str, found) -> None:
    if not isinstance(found, int):
        raise StoreError(f"memory {name!r} is damaged: no format version")
    if found > FORMAT:
        raise StoreError(
            f"memory {name!r} was written by a newer memllm (format {found}; this one reads up to {FORMAT})",
            hint="upgrade memllm",
        )


def _known(names: list[str]) -> str:
    if not names:
        return "nothing has been ingested yet: memllm ingest FILE"
    return "known memories: " + ", ".join(names)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
