"""One memory as one file: an uncompressed tar of its folder (the tensors do not compress),
verified before an imported memory becomes visible."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

from ..config import NAME
from ..errors import InputError, StoreError
from .repo import INFO, Repo, Store, Verification, _check_format, _fsync_dir, _private_dir

ROOT = "memllm-memory"  # every member of an export lies under this folder
MAX_MEMBERS = 1_000_000  # far more than a memory of many millions of tokens and years of versions
_SHA_FILE = re.compile(r"^[0-9a-f]{64}\.safetensors$")
_FOLDERS = {(), ("blocks",), ("evicted",), ("versions",), ("refs",), ("refs", "tags")}
_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the disk memllm writes to, not the archive


def members(repo: Repo) -> list[str]:
    """What an export holds: everything but the lock, the caches, the recomputed blocks and
    the reads log (derived, or about this machine only)."""
    folder = repo.folder
    return [INFO, "journal.jsonl"] + [
        str(p.relative_to(folder)) for sub in ("blocks", "evicted", "versions", "refs")
        for p in sorted((folder / sub).rglob("*")) if p.is_file() and not p.name.startswith(".")
    ]


def write(repo: Repo, stream: BinaryIO) -> int:
    """Stream the export to a binary stream (a pipe is fine); returns the number of files."""
    names = members(repo)
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for member in names:
            if (repo.folder / member).is_file():
                tar.add(repo.folder / member, arcname=f"{ROOT}/{member}", recursive=False)
    return len(names)


def export(repo: Repo, target: Path, *, force: bool = False) -> int:
    """Write the export to `target` atomically; returns the number of files. An existing
    regular file is replaced only with `force`; a symlink, FIFO, device or folder never."""
    if os.path.lexists(target):
        if target.is_symlink() or not stat.S_ISREG(target.lstat().st_mode):
            raise InputError(f"{target} exists and is not a regular file; memllm export never replaces it",
                             hint="choose another path, or - to write the archive to stdout")
        if not force:
            raise InputError(f"{target} exists", hint="pass --force to replace it, or choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(target)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            count = write(repo, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(target)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return count


def _expected(member: tarfile.TarInfo) -> bool:
    """Whether an archive entry is one an export holds (docs/storage.md's layout)."""
    parts = tuple(member.name.rstrip("/").split("/"))
    if not parts or parts[0] != ROOT:
        return False
    inside = parts[1:]
    if member.isdir():
        return inside in _FOLDERS
    if not member.isfile():
        return False
    if inside in ((INFO,), ("journal.jsonl",), ("refs", "HEAD")):
        return True
    if len(inside) == 2 and inside[0] in ("blocks", "evicted", "versions"):
        return bool(_SHA_FILE.match(inside[1]))
    return len(inside) == 3 and inside[:2] == ("refs", "tags") and bool(NAME.match(inside[2])) and inside[2] != "HEAD"


def import_(repo: Repo, source: Path) -> Verification:
    """Unpack an export into the new memory `repo`; it only appears if it verifies."""
    root = repo.store.root
    _private_dir(root)
    staging = Path(tempfile.mkdtemp(prefix=f".import-{repo.name}-", dir=root))
    try:
        try:
            with tarfile.open(source, "r:*") as tar:
                for count, member in enumerate(tar, 1):  # one at a time: a huge archive is refused early
                    if count > MAX_MEMBERS:
                        raise InputError(f"{source} is not a memllm export (over {MAX_MEMBERS:,} entries)")
                    if not _expected(member):
                        raise InputError(f"{source} is not a memllm export (unexpected entry {member.name!r})",
                                         hint="an export holds memory.json, journal.jsonl, blocks/, evicted/, "
                                              "versions/ (files named by their SHA-256) and refs/ only")
                    if member.isfile():
                        tar.extract(member, staging, filter="data")
        except tarfile.TarError:
            raise InputError(f"{source} is not a memllm export (not a tar archive)") from None
        except OSError as err:
            if err.errno in _DISK:  # a full or read-only disk: the disk's error, not a bad archive
                raise OSError(err.errno, err.strerror, str(repo.store.root)) from None
            raise InputError(f"cannot read {source}: {err.strerror or err}") from None
        unpacked = staging / ROOT
        if not (unpacked / INFO).is_file():
            raise InputError(f"{source} is not a memllm export (no {INFO})")
        for path in [unpacked, *unpacked.rglob("*")]:
            path.chmod(0o700 if path.is_dir() else 0o600)
        for sub in ("blocks", "versions", "refs/tags"):
            _private_dir(unpacked / sub)
        staged = Repo(Store(staging.parent), repo.name, unpacked)  # verify the copy before it becomes visible
        _check_format(repo.name, staged.info().get("format"))
        report = staged.verify()
        if not report.ok:
            raise StoreError(f"{source} is damaged: " + "; ".join(report.damaged[:3]))
        _private_dir(repo.folder)
        # memory.json moves last: until it is there, the memory does not exist
        for item in sorted(unpacked.iterdir(), key=lambda p: p.name == INFO):
            os.replace(item, repo.folder / item.name)
        _fsync_dir(repo.folder)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
