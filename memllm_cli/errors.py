"""Domain errors. Raised anywhere below the CLI. Each class carries its exit code (the CLI's
one table, docs/cli.md) and its HTTP status (memllm serve answers with it, and the server's
client raises the class back from the exit code): both tables are derived from these classes."""

from __future__ import annotations


class MemllmError(Exception):
    """Base class: a one-line message for the user, and an optional hint on what to do."""

    exit_code = 1
    http_status = 500

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(MemllmError):
    """A value given on the command line (or through the API) is out of range."""

    exit_code = 2
    http_status = 400


class ConfigError(MemllmError):
    """The config file cannot be read, has unknown keys, or a value of the wrong type."""

    exit_code = 2
    http_status = 400


class InputError(MemllmError):
    """A path or text the user gave cannot be used (missing, unreadable, binary, empty, not UTF-8)."""

    exit_code = 3
    http_status = 400


class MemoryNotFound(MemllmError):
    """The named memory does not exist, or holds nothing yet."""

    exit_code = 4
    http_status = 404


class ModelError(MemllmError):
    """The model cannot be loaded or does not fit the memory (another model wrote it)."""

    exit_code = 5
    http_status = 400


class StoreError(MemllmError):
    """The stored memory is damaged or was written by a newer memllm."""

    exit_code = 6
    http_status = 500


class Busy(MemllmError):
    """Another process holds the memory's write lock past the timeout."""

    exit_code = 7
    http_status = 409


class Ungrounded(MemllmError):
    """ask --strict: what was read from memory does not support the answer."""

    exit_code = 8
    http_status = 422


def by_exit_code() -> dict[int, type[MemllmError]]:
    """The error class of each exit code but 1 (the first class here of a code: UsageError for 2)."""
    out: dict[int, type[MemllmError]] = {}
    for cls in MemllmError.__subclasses__():
        if cls.__module__ == __name__ and cls.exit_code != 1:
            out.setdefault(cls.exit_code, cls)
    return out
