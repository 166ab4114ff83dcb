"""Memories that live in RAM only, and the measurements `memllm bench` makes on them.

The benchmarks (bench/) go through these public calls only, so they measure what a user's
memory would do: the same kinds, the same writing and reading.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from ..errors import MemoryNotFound
from ..memory import Memory
from ..memory.base import CHUNK_TOKENS
from ..store import Store
from ..text.chunking import chunk_document
from .session import Answer, Session, sampling


class Evaluation(Session):
    def scratch_memory(self, *, pool_size: int | None = None, write_context: int | None = None,
                       seed: int | None = None, dtype: str | None = None, keep_blocks: bool = False,
                       block_format: str | None = None, write_scope: str | None = None) -> Memory:
        """An empty memory that lives in RAM only, for the current model. With `keep_blocks`,
        it keeps every update's tokens (its long-term tier, in RAM) for reading within a budget."""
        kind = self.kind()
        pool_size = pool_size if pool_size is not None else self.settings.pool_size
        write_context = write_context if write_context is not None else self.settings.write_context
        mem = kind.create(self.model(), pool_size=pool_size, write_context=write_context, dtype=dtype, seed=seed,
                          block_format=block_format or self.settings.block_format,
                          write_scope=write_scope or self.settings.write_scope)
        mem.archive_in_ram(keep_blocks)
        return mem

    def elsewhere(self, home: Path, memory: str) -> Evaluation:
        """A service on another home's memory with this one's settings and loaded model
        (benchmarks that build a stored memory of their own)."""
        other = type(self)(dataclasses.replace(self.settings, home=home, memory=memory))
        other._model = self.model()
        return other

    def stored_copy(self, name: str) -> Memory:
        """HEAD of another stored memory, in RAM, to start evaluations from (never changed)."""
        other = Evaluation(dataclasses.replace(self.settings, memory=name))
        other._model = self.model()
        other._open()
        mem = other.load(states=True)
        if mem is None:
            raise MemoryNotFound(f"memory {name!r} is empty")
        return mem

    def write_text(self, mem: Memory, text: str, name: str = "<text>") -> int:
        """Write one document into an in-RAM memory; returns the tokens written."""
        source = mem.add_source(name, "")
        chunks = chunk_document(text, self.model().tokenizer, CHUNK_TOKENS)
        for chunk in chunks:
            mem.write(chunk.ids, source=source, chunk=chunk.index)
        return sum(len(c.ids) for c in chunks)

    def ask_in(self, mem: Memory, question: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, budget: int | None = 0) -> Answer:
        """Answer from a given memory (stored or in RAM). With a budget, read only the blocks
        most relevant to the question (the memory's stored blocks, and its pending ones)."""
        return self._answer(mem, question, sampling(max_new_tokens, temperature, top_p, top_k, seed), budget or 0,
                            time.perf_counter())

    def ask_with_text(self, question: str, texts: list[str], *, max_new_tokens: int = 256) -> Answer:
        """The prompt baseline: the same texts placed in the prompt instead of memory."""
        started = time.perf_counter()
        lm = self.model()
        tokens = self.kind().prompt_answer(lm, texts, question, sampling(max_new_tokens))
        return Answer(tokens, lm.tokenizer, {"model": lm.name, "memory": None}, started)

    # -- what the benchmarks measure ---------------------------------------------------

    def count(self, text: str) -> int:
        """Tokens of `text` for this model."""
        return len(self.model().tokenizer(text, add_special_tokens=False).input_ids)

    def _ids(self, text: str) -> list[int]:
        return self.model().tokenizer(text, add_special_tokens=False).input_ids[:CHUNK_TOKENS]

    def window(self) -> int:
        """Tokens the prompt baselines may hold."""
        return self.kind().window(self.model())

    def baselines(self) -> frozenset[str]:
        """Bench methods beside "memllm" this model can be compared with."""
        return self.kind().baselines()

    def plain_forward(self, text: str) -> None:
        """One forward pass of the model alone over (at most one chunk of) `text`."""
        self.kind().plain_forward(self.model(), self._ids(text))

    def nll(self, mem: Memory, text: str) -> tuple[float, int]:
        """Summed NLL of (one chunk of) `text` read after the memory, and the tokens scored."""
        return mem.nll(self._ids(text))

    @staticmethod
    def held_shares(mem: Memory) -> dict[str, float]:
        """Per document name: the share of what it wrote that the pool still holds."""
        held = mem.held_per_source()
        out: dict[str, float] = {}
        for i, source in enumerate(mem.sources):
            written = mem.written(source)
            out[source["name"]] = held[i] / written if written else 0.0
        return out

    @staticmethod
    def disk_bytes_per_token(mem: Memory) -> float | None:
        """Bytes the store would write for this pool: its tokens as one block, plus one version."""
        form = mem.stored_form() if len(mem) else None
        if form is None:
            return None
        block, version = form
        with tempfile.TemporaryDirectory() as home:
            repo = Store(Path(home)).open("m")
            repo.create({})
            repo.write_block(block, {})
            repo.write_version(version, {"parent": None})
            return round(repo.disk_bytes() / len(mem), 1)
