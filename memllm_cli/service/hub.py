"""Many memories in one process (memllm serve): a session per memory, and the loaded models
they share, kept in an LRU bounded by the RAM their weights take.

Sessions of memories written by the same model share one loaded model; loading a model
past `max_model_bytes` unloads the least recently used others first (a session that used
one loads it again when next asked). Loading is serialised per model, so requests that
arrive while a model loads wait for it instead of loading it twice.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

from ..config import Settings
from ..model.loading import EMBEDDED, LoadedModel, load_model
from . import Memllm


def weight_bytes(lm: LoadedModel) -> int:
    """RAM the model's weights take, as its engine counts them (both engines do: a trained
    checkpoint counted 0, and --max-model-ram never unloaded the 7B/8B models it exists for)."""
    return lm.engine.weight_bytes()


class Models:
    """Loaded models by what was asked for (spec, device, dtype), least recently used first out."""

    def __init__(self, settings: Settings, max_bytes: int | None = None) -> None:
        self.settings = settings
        self.max_bytes = max_bytes
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, spec: str) -> LoadedModel:
        with self._lock:
            if spec in self._loaded:
                self._loaded.move_to_end(spec)
                return self._loaded[spec]
            gate = self._loading.setdefault(spec, threading.Lock())
        with gate:  # one load per model, however many requests wait for it
            with self._lock:
                if spec in self._loaded:
                    return self._loaded[spec]
            lm = load_model(spec, cache_dir=self.settings.cache_dir, device=self.settings.device,
                            dtype=self.settings.dtype)
            with self._lock:
                self._loaded[spec] = lm
                self._evict(keep=spec)
            return lm

    def _evict(self, keep: str) -> None:
        if self.max_bytes is None:
            return
        while len(self._loaded) > 1 and sum(weight_bytes(m) for m in self._loaded.values()) > self.max_bytes:
            oldest = next(s for s in self._loaded if s != keep)
            del self._loaded[oldest]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)


class Hub:
    """The sessions of one home's memories, and the models they share."""

    def __init__(self, settings: Settings, *, max_model_bytes: int | None = None) -> None:
        self.settings = settings
        self.models = Models(settings, max_model_bytes)
        self._sessions: dict[str, Memllm] = {}
        self._lock = threading.Lock()

    def session(self, memory: str) -> Memllm:
        """The session of a memory (it need not exist yet: ingest creates it)."""
        with self._lock:
            found = self._sessions.get(memory)
            if found is None:
                found = Memllm(dataclasses.replace(self.settings, memory=memory))
                found.store.open(memory)  # refuses an invalid name now
                self._sessions[memory] = found
        return found.attach(self.models)

    def memories(self) -> list[str]:
        return Memllm(self.settings).memories()


__all__ = ["EMBEDDED", "Hub", "Models"]
