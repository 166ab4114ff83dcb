"""Memories: one interface (`base.Memory`), two kinds, and reading within a budget (recall).

Which kind a memory is comes from the model that writes it (`for_model`) or from what a
stored version records (`for_version`); nothing else asks.
"""

from __future__ import annotations

from ..errors import StoreError
from .base import BlockSource, Memory, Reading, Sampling
from .free import FreeMemory
from .trained import TrainedMemory

KINDS: dict[str, type[Memory]] = {FreeMemory.kind: FreeMemory, TrainedMemory.kind: TrainedMemory}


def for_model(lm) -> type[Memory]:
    """The kind of memory a loaded model writes."""
    return KINDS[lm.kind]


def for_version(meta: dict) -> type[Memory]:
    """The kind that wrote a stored version or memory (versions written before kinds were
    recorded are training-free)."""
    kind = meta.get("kind", FreeMemory.kind)
    if kind not in KINDS:
        raise StoreError(f"unknown kind of memory {kind!r}", hint="upgrade memllm")
    return KINDS[kind]


__all__ = ["KINDS", "BlockSource", "FreeMemory", "Memory", "Reading", "Sampling", "TrainedMemory", "for_model",
           "for_version"]
