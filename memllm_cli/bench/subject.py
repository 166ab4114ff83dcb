"""The real subject of the benchmarks: the configured model and memory settings, through
the service's public API (its in-RAM memories), and the environment a run reports."""

from __future__ import annotations

import platform

from .. import __version__
from .protocols import Subject


class ServiceSubject:
    """A `protocols.Subject` over `service.Memllm`."""

    def __init__(self, service, *, max_new_tokens: int = 32, base_memory: str | None = None,
                 budget: int | None = None, keep_memory: bool = False) -> None:
        self.service = service
        self.budget = service.budget(budget)
        self.max_new_tokens = max_new_tokens
        self.keep_memory = keep_memory  # bench scale --keep: leave the grown memory where it was made
        self.base = service.stored_copy(base_memory) if base_memory else None
        probe = service.scratch_memory()
        self.pool_size = probe.pool_size
        self.kind = probe.kind
        self.name = service.model().name
        self.window = service.window()
        self._baselines = service.baselines()

    def supports(self, method: str) -> bool:
        if method == "pool":
            return "pool" in self._baselines and self.budget > 0
        return method == "memllm" or method in self._baselines

    def count(self, text: str) -> int:
        return self.service.count(text)

    def new_prompt_memory(self):
        """A float32 pool that never drops, written after the whole pool: exactly a prompt
        prefilled chunk by chunk (tests/test_service.py checks the equality)."""
        if "prompt" not in self._baselines:
            return None
        return self.service.scratch_memory(pool_size=self.window, write_context=self.window, dtype="float32",
                                           block_format="float16", write_scope="pool")

    def room(self, memory) -> int:
        return memory.pool_size - len(memory)

    def new_memory(self, seed: int, *, archive: bool = True):
        if self.base is not None:
            memory = self.base.fork()
            memory.archive_in_ram(archive and bool(self.budget))
            return memory
        return self.service.scratch_memory(seed=seed, keep_blocks=archive and bool(self.budget))

    def fork(self, memory):
        copy = memory.fork()
        copy.archive_in_ram(bool(self.budget))
        return copy

    def write(self, memory, text: str, name: str) -> int:
        before = memory.update_count
        self.service.write_text(memory, text, name)
        return memory.update_count - before

    @staticmethod
    def _timed(answer) -> tuple[float, int, float]:
        """(first token seconds, tokens, total seconds) of an answer, generated to the end."""
        for _ in answer:
            pass
        return answer.first_token_seconds or answer.seconds, len(answer.ids), answer.seconds

    def ask(self, memory, question: str, *, whole_pool: bool = False) -> str:
        budget = 0 if whole_pool else self.budget
        return "".join(self.service.ask_in(memory, question, max_new_tokens=self.max_new_tokens, budget=budget))

    def ask_timed(self, memory, question: str) -> tuple[float, int, float]:
        answer = self.service.ask_in(memory, question, max_new_tokens=self.max_new_tokens, budget=self.budget)
        return self._timed(answer)

    def ask_text(self, texts: list[str], question: str) -> str:
        if "prompt" not in self._baselines:
            return ""
        return "".join(self.service.ask_with_text(question, texts, max_new_tokens=self.max_new_tokens))

    def ask_text_timed(self, texts: list[str], question: str) -> tuple[float, int, float]:
        return self._timed(self.service.ask_with_text(question, texts, max_new_tokens=self.max_new_tokens))

    def held(self, memory) -> dict[str, float]:
        return self.service.held_shares(memory)

    def held_tokens(self, memory) -> int:
        return len(memory)

    def updates(self, memory) -> list[dict]:
        return memory.history()

    def nll(self, memory, text: str) -> tuple[float, int]:
        return self.service.nll(memory, text)

    def pool_stats(self, memory) -> list[dict]:
        return memory.layer_stats()

    def plain_forward(self, text: str) -> None:
        self.service.plain_forward(text)

    def disk_bytes_per_token(self, memory) -> float | None:
        return self.service.disk_bytes_per_token(memory)

    # -- a stored memory (bench scale) ----------------------------------------------------

    def stored_memory(self):
        """An empty stored memory in a temporary home (under $MEMLLM_BENCH_DIR if set), with
        this subject's model and settings."""
        import os
        import tempfile
        from pathlib import Path

        home = Path(tempfile.mkdtemp(prefix="memllm-bench-", dir=os.environ.get("MEMLLM_BENCH_DIR")))
        return self.service.elsewhere(home, "scale")

    def ingest(self, stored, notes: list[tuple[str, str]]) -> int:
        from ..text.sources import Document

        return stored.ingest_documents([Document.of(name, text) for name, text in notes]).tokens

    def ask_stored(self, stored, question: str) -> tuple[str, float, list[str] | None]:
        answer = stored.ask(question, max_new_tokens=self.max_new_tokens, budget=self.budget)
        text = "".join(answer)
        read = answer.info.get("sources")
        names = None if read is None else [s["source"] for s in read]
        return text, answer.first_token_seconds or answer.seconds, names

    def disk_bytes(self, stored) -> int:
        return stored.repo.disk_bytes()

    def close(self, stored) -> str | None:
        """Remove the memory, or with `keep_memory` (memllm bench scale --keep) say where it is."""
        import shutil

        if self.keep_memory:
            return str(stored.settings.home)
        shutil.rmtree(stored.settings.home, ignore_errors=True)
        return None


def environment(subject: Subject) -> dict:
    import torch
    import transformers

    try:
        import bm25s

        bm25_version = bm25s.__version__
    except ImportError:
        bm25_version = None
    return {
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpus": _cpus(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": {"memllm": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "bm25s": bm25_version},
        "model": {"name": subject.name, "kind": getattr(subject, "kind", "training-free"),
                  "pool_size": subject.pool_size, "window": subject.window},
    }


def _cpus() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


