"""Turn what the user names (files, folders, globs, `-` for stdin) into text documents.

Everything is read and checked before anything is written, so bad input never leaves a
memory half-updated. A file named explicitly must be good text or the whole ingest fails;
inside a folder or a glob, files that are not text are skipped and reported.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError

_GLOB_CHARS = set("*?[")


STDIN = "<stdin>"


@dataclass(frozen=True)
class Document:
    name: str  # the resolved path of a file, the name given to text (--name), or "<stdin>"
    text: str
    sha256: str  # of the UTF-8 bytes: re-ingesting the same content is a no-op
    via: str | None = None  # the path inside a folder that reached it, where that is not `name` (a symlink)

    @classmethod
    def of(cls, name: str, text: str) -> Document:
        """A document of text given by a program (its name is its identity)."""
        return cls(name, text, hashlib.sha256(text.encode()).hexdigest())

    @property
    def identity(self) -> str | None:
        """What makes two ingests the same document: its name, so an edited file replaces
        its earlier text. Unnamed standard input has none: each text is its own document."""
        return None if self.name == STDIN else self.name


def checked(documents: list[Document]) -> list[Document]:
    """Documents a program gave (the API, MCP), held to what a file must be for `ingest`: a
    name, text that is not empty and has no NUL, and one document per name in one request."""
    seen: set[str] = set()
    for doc in documents:
        if not doc.name.strip() or "\x00" in doc.name:
            raise InputError("a document's name must not be empty", hint="name it as a later ingest would replace it")
        if "\x00" in doc.text:
            raise InputError(f"{doc.name} is a binary file, not text (it holds a NUL character)")
        if not doc.text.strip():
            raise InputError(f"{doc.name} is empty")
        if doc.name in seen and doc.name != STDIN:
            raise InputError(f"{doc.name} is given twice in one ingest", hint="give each document once")
        seen.add(doc.name)
    return documents


@dataclass
class Collected:
    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    folders: list[str] = field(default_factory=list)  # resolved folders named (what --sync mirrors)


class _NotText(Exception):
    pass


def collect(paths: list[str], stdin: BinaryIO | None = None, *, stdin_name: str | None = None) -> Collected:
    """Documents from files, folders, globs and "-" (stdin, named `stdin_name` if given).
    A file's name is its resolved path, so two spellings of one file are one document."""
    if not paths:
        raise InputError("nothing to ingest", hint="name files, folders, globs, or - for stdin")
    result = Collected()
    seen: set[str] = set()

    def add(name: str, data: bytes, via: str | None = None) -> None:
        result.documents.append(Document(name, _decode(data), hashlib.sha256(data).hexdigest(),
                                         via if via != name else None))

    for raw in paths:
        if raw == "-":
            if stdin is None:
                raise InputError("- means standard input, but there is none")
            try:
                add(stdin_name or STDIN, stdin.read())
            except _NotText as err:
                raise InputError(f"standard input {err}") from None
            continue
        path = Path(raw).expanduser()
        if path.is_dir():
            result.folders.append(str(path.resolve()))
            if not _add_files(_walk(path), result, seen, add):
                raise InputError(f"{raw}: no text files in this folder", hint=_skipped_hint(result, raw))
        elif path.exists():
            key = str(path.resolve())
            if key in seen:
                continue
            seen.add(key)
            try:
                add(key, _read(path))
            except _NotText as err:
                raise InputError(f"{raw} {err}") from None
        elif _GLOB_CHARS & set(raw):
            matches = [Path(p) for p in sorted(glob.glob(os.path.expanduser(raw), recursive=True))]
            files = [f for m in matches for f in (_walk(m) if m.is_dir() else [m])]
            if not files:
                raise InputError(f"{raw}: no files match this pattern")
            if not _add_files(files, result, seen, add):
                raise InputError(f"{raw}: no text files match this pattern", hint=_skipped_hint(result, raw))
        else:
            raise InputError(f"{raw}: no such file or directory")
    return result


def _add_files(files, result: Collected, seen: set[str], add) -> int:
    """Add the text files among `files`; returns how many are text (already seen ones too)."""
    texts = 0
    for file in files:
        key = str(file.resolve())
        if key in seen:
            texts += 1
            continue
        seen.add(key)
        try:
            add(key, _read(file), str(file.parent.resolve() / file.name))  # a link: named by its target
            texts += 1
        except _NotText as err:
            result.skipped.append((str(file), str(err).removeprefix("is ")))
    return texts


def _walk(folder: Path) -> list[Path]:
    """Regular files under `folder`, recursively, sorted, hidden files and folders left out."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return out


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise _NotText("is not a regular file")
    try:
        return path.read_bytes()
    except PermissionError:
        raise _NotText("cannot be read: permission denied") from None
    except OSError as err:
        raise _NotText(f"cannot be read: {err.strerror or err}") from None


def _decode(data: bytes) -> str:
    if b"\x00" in data:  # anywhere: a NUL byte is never text
        raise _NotText("is a binary file, not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _NotText(f"is not valid UTF-8 text (bad byte at offset {err.start})") from None
    if not text.strip():
        raise _NotText("is empty")
    return text


def _skipped_hint(result: Collected, prefix: str) -> str | None:
    reasons = sorted({reason for path, reason in result.skipped if path.startswith(prefix.rstrip("/*"))})
    return "skipped: " + "; ".join(reasons) if reasons else None
