"""Domain errors. Raised anywhere below the CLI; the CLI maps each class to an exit code."""

from __future__ import annotations


class MemllmError(Exception):
    """Base class: a one-line message for the user, and an optional hint on what to do."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(MemllmError):
    """A value given on the command line (or through the API) is out of range."""

    exit_code = 2


class ConfigError(MemllmError):
    """The config file cannot be read, has unknown keys, or a value of the wrong type."""

    exit_code = 2


class InputError(MemllmError):
    """A path or text the user gave cannot be used (missing, unreadable, binary, empty, not UTF-8)."""

    exit_code = 3


class MemoryNotFound(MemllmError):
    """The named memory does not exist, or holds nothing yet."""

    exit_code = 4


class ModelError(MemllmError):
    """The model cannot be loaded or does not fit the memory (another model wrote it)."""

    exit_code = 5


class StoreError(MemllmError):
    """The stored memory is damaged or was written by a newer memllm."""

    exit_code = 6


class Busy(MemllmError):
    """Another process holds the memory's write lock past the timeout."""

    exit_code = 7


class Ungrounded(MemllmError):
    """ask --strict: what was read from memory does not support the answer."""

    exit_code = 8
