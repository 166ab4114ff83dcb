"""The Python API: everything a command does is one call here.

    from memllm_cli.service import Memllm
    m = Memllm(memory="notes")
    m.ingest(["notes.txt"])
    print("".join(m.ask("When is the meeting?")))
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import BinaryIO

import torch

from . import __version__
from .chunking import chunk_document
from .config import Settings, load_settings
from .engine import Pool
from .errors import InputError, MemoryNotFound, ModelError
from .memory import DTYPES, Memory
from .models import EMBEDDED, LoadedModel, load_model
from .progress import NoProgress, Progress
from .sources import Collected, Document, collect
from .store import Store

KIND = "training-free"
CHUNK_TOKENS = 512  # tokens per update at most (the MemoryLLM setting)
DEFAULT_POOL_SIZE = 4096  # see docs/design.md, "Choosing N"
ANSWER_RESERVE = 1024  # positions kept free after the pool for the question and the answer
CHECKPOINT_SECONDS = 60.0  # a long ingest commits at document boundaries this often


@dataclass
class IngestReport:
    memory: str
    files: int
    chunks: int
    tokens: int
    dropped: int
    seconds: float
    tokens_held: int
    pool_size: int
    unchanged: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    @property
    def fill(self) -> float:
        return self.tokens_held / self.pool_size

    def to_dict(self) -> dict:
        return {**asdict(self), "fill": round(self.fill, 4), "seconds": round(self.seconds, 3)}


class Answer:
    """Iterate for the answer's text pieces as they are generated; then read the totals."""

    def __init__(self, tokens: Iterator[int], tokenizer, info: dict, started: float) -> None:
        self._tokens = tokens
        self._tokenizer = tokenizer
        self.info = info
        self.ids: list[int] = []
        self.text = ""
        self.started = started
        self.first_token_seconds: float | None = None
        self.seconds: float | None = None

    def __iter__(self) -> Iterator[str]:
        for token in self._tokens:
            if self.first_token_seconds is None:
                self.first_token_seconds = time.perf_counter() - self.started
            self.ids.append(token)
            text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            piece, self.text = text[len(self.text):], text
            if piece:
                yield piece
        text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.text) and text.startswith(self.text):
            yield text[len(self.text):]  # what was held back, even if it ends mid-character
        self.text = text
        self.seconds = time.perf_counter() - self.started

    def to_dict(self) -> dict:
        return {
            "answer": self.text.strip(), **self.info, "tokens": len(self.ids),
            "seconds": round(self.seconds or 0.0, 3),
            "first_token_seconds": round(self.first_token_seconds or 0.0, 3),
        }


class Memllm:
    def __init__(self, settings: Settings | None = None, **overrides) -> None:
        self.settings = settings or load_settings(**overrides)
        self.store = Store(self.settings.home)
        self._model: LoadedModel | None = None
        self._sink: Pool | None = None

    @property
    def memory_name(self) -> str:
        return self.settings.memory

    # -- model -------------------------------------------------------------------------

    def model(self, info: dict | None = None) -> LoadedModel:
        """The model: the one asked for, else the one that wrote the memory, else the default."""
        if self._model is None:
            spec = self.settings.model or (info or {}).get("model", {}).get("name") or EMBEDDED
            self._model = load_model(
                spec, cache_dir=self.settings.cache_dir, device=self.settings.device, dtype=self.settings.dtype
            )
        if info is not None and info["model"]["fingerprint"] != self._model.fingerprint:
            raise ModelError(
                f"memory {self.memory_name!r} was written by model {info['model']['name']}, "
                f"not by {self._model.name}",
                hint=f"use --model {info['model']['name']}, or another --memory",
            )
        return self._model

    def sink(self) -> Pool:
        """The pinned prefix every chunk is written after and every question read after."""
        if self._sink is None:
            lm = self.model()
            self._sink = lm.engine.encode(torch.tensor(lm.prompt.sink_ids(lm.tokenizer)))
        return self._sink

    # -- ingest ------------------------------------------------------------------------

    def ingest(
        self,
        paths: list[str],
        *,
        stdin: BinaryIO | None = None,
        force: bool = False,
        progress: Progress | None = None,
    ) -> IngestReport:
        """Write files, folders, globs or stdin ("-") into the memory, one update per chunk."""
        return self.ingest_documents(collect(paths, stdin), force=force, progress=progress)

    def ingest_documents(
        self, collected: Collected | list[Document], *, force: bool = False, progress: Progress | None = None
    ) -> IngestReport:
        if isinstance(collected, list):
            collected = Collected(collected)
        progress = progress or NoProgress()
        started = time.perf_counter()
        name = self.memory_name
        with self.store.lock(name, self.settings.lock_timeout):
            info = self.store.info(name) if self.store.exists(name) else None
            lm = self.model(info)
            memory = self._load_memory(name, info) if info else None
            if memory is None:
                memory = self._new_memory(lm)
                if info is None:
                    info = self._create(name, lm, memory)
            report = IngestReport(
                name, 0, 0, 0, 0, 0.0, len(memory), memory.pool_size,
                skipped=[{"path": p, "reason": r} for p, r in collected.skipped],
            )
            plan, planned = [], set()
            for doc in collected.documents:
                if doc.sha256 in planned or (memory.has_content(doc.sha256) and not force):
                    report.unchanged.append(doc.name)
                else:
                    planned.add(doc.sha256)
                    plan.append((doc, chunk_document(doc.text, lm.tokenizer, CHUNK_TOKENS)))
            total = sum(len(c.ids) for _, chunks in plan for c in chunks)
            progress.start(total, f"ingesting into {name}")
            sink = self.sink()
            last_commit = time.perf_counter()
            try:
                for doc, chunks in plan:
                    source = memory.add_source(doc.name, doc.sha256)
                    for chunk in chunks:
                        update = memory.write(lm.engine, sink, chunk.ids, source=source, chunk=chunk.index)
                        report.chunks += 1
                        report.tokens += update["tokens"]
                        report.dropped += update["dropped"]
                        progress.advance(update["tokens"], doc.name)
                    report.files += 1
                    if time.perf_counter() - last_commit > CHECKPOINT_SECONDS:
                        self._commit(name, memory)
                        last_commit = time.perf_counter()
            finally:
                progress.finish()
            if plan:
                self._commit(name, memory)
        report.tokens_held = len(memory)
        report.seconds = time.perf_counter() - started
        return report

    # -- ask ---------------------------------------------------------------------------

    def ask(
        self,
        question: str,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> Answer:
        """Answer from memory. Iterate the result for the text as it is generated."""
        started = time.perf_counter()
        if not question.strip():
            raise InputError("the question is empty")
        name = self.memory_name
        info = self.store.info(name)
        memory = self._load_memory(name, info)
        if memory is None or len(memory) == 0:
            raise MemoryNotFound(f"memory {name!r} is empty", hint="ingest something first: memllm ingest FILE")
        self.model(info)  # checks that this model wrote the memory
        return self.ask_in(
            memory, question, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, started=started,
        )

    def ask_with_text(self, question: str, texts: list[str], *, max_new_tokens: int = 256) -> Answer:
        """The prompt baseline: the same texts placed in the prompt instead of memory."""
        started = time.perf_counter()
        lm = self.model()
        ids = lm.prompt.sink_ids(lm.tokenizer)
        for text in texts:
            ids += [i for c in chunk_document(text, lm.tokenizer, CHUNK_TOKENS) for i in c.ids]
        ids += lm.prompt.question_ids(lm.tokenizer, question)
        tokens = lm.engine.generate(torch.tensor(ids), None, max_new_tokens=max_new_tokens, stop_ids=_stop_ids(lm))
        return Answer(tokens, lm.tokenizer, {"model": lm.name, "memory": None}, started)

    # -- memories in RAM (evaluation, benchmarks) ----------------------------------------

    def scratch_memory(self, *, pool_size: int | None = None, write_context: int | None = None,
                       seed: int | None = None) -> Memory:
        """An empty memory that lives in RAM only, for the current model."""
        memory = self._new_memory(self.model(), pool_size=pool_size, write_context=write_context)
        if seed is not None:
            memory.seed = seed
        return memory

    def write_text(self, memory: Memory, text: str, name: str = "<text>") -> int:
        """Write one document into an in-RAM memory; returns the tokens written."""
        lm = self.model()
        source = memory.add_source(name, "")
        chunks = chunk_document(text, lm.tokenizer, CHUNK_TOKENS)
        for chunk in chunks:
            memory.write(lm.engine, self.sink(), chunk.ids, source=source, chunk=chunk.index)
        return sum(len(c.ids) for c in chunks)

    def ask_in(self, memory: Memory, question: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               started: float | None = None) -> Answer:
        """Answer from a given memory (stored or in RAM)."""
        started = started or time.perf_counter()
        lm = self.model()
        ids = lm.prompt.question_ids(lm.tokenizer, question)
        tokens = lm.engine.generate(
            torch.tensor(ids), memory.context(self.sink()), max_new_tokens=max_new_tokens,
            stop_ids=_stop_ids(lm), temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        )
        return Answer(tokens, lm.tokenizer, {"model": lm.name, "memory": self.memory_name}, started)

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict:
        """What the memory holds; reads the store only (no model is loaded)."""
        name = self.memory_name
        info = self.store.info(name)
        record = self.store.read_pool(name)
        memory = Memory.from_record(*record) if record else None
        held = memory.held_per_source() if memory else []
        sources = memory.sources if memory else []
        n = len(memory) if memory else 0
        pool_size = memory.pool_size if memory else info["pool_size"]
        return {
            "memory": name,
            "model": info["model"]["name"],
            "fingerprint": info["model"]["fingerprint"][:16],
            "kind": info.get("kind", KIND),
            "pool_size": pool_size,
            "tokens": n,
            "fill": round(n / pool_size, 4),
            "updates": len(memory.updates) if memory else 0,
            "dropped": sum(u["dropped"] for u in memory.updates) if memory else 0,
            "dtype": info.get("dtype"),
            "write_context": info.get("write_context"),
            "disk_bytes": self.store.disk_bytes(name),
            "created": info.get("created"),
            "sources": [
                {"name": s["name"], "sha256": s["sha256"], "chunks": s["chunks"],
                 "tokens_written": s["tokens"], "tokens_held": held[i]}
                for i, s in enumerate(sources)
            ],
        }

    def memories(self) -> list[str]:
        return self.store.names()

    # -- internals ---------------------------------------------------------------------

    def _new_memory(self, lm: LoadedModel, *, pool_size: int | None = None,
                    write_context: int | None = None) -> Memory:
        sink = len(lm.prompt.sink_ids(lm.tokenizer))
        window = lm.engine.max_positions - sink - ANSWER_RESERVE
        pool_size = pool_size or self.settings.pool_size or min(DEFAULT_POOL_SIZE, window)
        if not CHUNK_TOKENS <= pool_size <= window:
            raise ModelError(
                f"a pool of {pool_size} tokens does not fit: it must hold one chunk ({CHUNK_TOKENS}) "
                f"and leave room for a question in the model's window ({lm.engine.max_positions})",
                hint=f"choose a pool_size between {CHUNK_TOKENS} and {window}",
            )
        if write_context is None:
            write_context = self.settings.write_context if self.settings.write_context is not None else pool_size
        dtype = "float16" if lm.engine.dtype == torch.float32 else str(lm.engine.dtype).removeprefix("torch.")
        return Memory.empty(lm.engine, pool_size=pool_size, write_context=write_context, dtype=dtype)

    def _create(self, name: str, lm: LoadedModel, memory: Memory) -> dict:
        info = {
            "kind": KIND,
            "model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "pool_size": memory.pool_size,
            "write_context": memory.write_context,
            "dtype": memory.dtype,
            "sink": lm.prompt.sink_text,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "memllm": __version__,
        }
        self.store.create(name, info)
        return self.store.info(name)

    def _load_memory(self, name: str, info: dict) -> Memory | None:
        record = self.store.read_pool(name)
        if record is None:
            return None
        memory = Memory.from_record(*record)
        if memory.dtype not in DTYPES:
            raise ModelError(f"memory {name!r} has an unknown dtype {memory.dtype!r}")
        return memory

    def _commit(self, name: str, memory: Memory) -> None:
        self.store.write_pool(name, *memory.record())


def _stop_ids(lm: LoadedModel) -> frozenset[int]:
    ids = set()
    for value in (getattr(lm.engine.model.generation_config, "eos_token_id", None), lm.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)
