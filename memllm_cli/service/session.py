"""The session: the model, writing into a memory, and answering from it.

The service is where model, memory and store meet. It holds one store handle (`repo`)
and the model; the memory kinds (memory/) decide what writing, reading and counting mean.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from .. import __version__, cpus, memory
from ..clock import now
from ..config import Settings, load_settings
from ..errors import InputError, MemoryNotFound, ModelError, StoreError, UsageError
from ..memory import Memory, Sampling
from ..memory.base import CHUNK_TOKENS
from ..model import placement
from ..model.loading import EMBEDDED, LoadedModel, load_model
from ..progress import NoProgress, Progress, Stop
from ..store import FORMAT, Store
from ..store.migrations import migrate
from ..text.chunking import Chunk, chunk_document
from ..text.sources import Collected, Document, checked, collect
from . import space

log = logging.getLogger("memllm")

CHECKPOINT_SECONDS = 60.0  # a long ingest commits this often, at chunk boundaries
THREADS_SECONDS = 10.0  # a long ingest looks again this often at how many CPUs are free (cpus.py)
READ_BUDGET = 512  # tokens ask reads by default (docs/design.md, "Reading within a budget")
MAX_SEED = (1 << 64) - 1  # torch generators take seeds below 2**64


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
    updated: list[str] = field(default_factory=list)  # documents whose new text replaced the old
    removed: list[str] = field(default_factory=list)  # --sync: documents whose files are gone
    renamed: list[dict] = field(default_factory=list)  # --sync: {from, to}: a gone file's text found at a new path
    resumed: list[str] = field(default_factory=list)  # documents a stopped ingest had written in part
    reused: int = 0  # chunks of edited documents kept as they were (not written again)
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unit: str = "tokens"  # of tokens_held and pool_size; "rows per layer" for MemoryLLM checkpoints
    interrupted: str | None = None  # the signal that stopped it at a chunk boundary ("SIGINT", "SIGTERM")
    disk: dict | None = None  # with max_disk: what fitting the memory into it did (service/space.py)

    @property
    def fill(self) -> float:
        return self.tokens_held / self.pool_size

    def to_dict(self) -> dict:
        return {**asdict(self), "fill": round(self.fill, 4), "seconds": round(self.seconds, 3)}


@dataclass
class _Step:
    """One document of an ingest: its chunks, the live document it replaces, the chunks
    (index -> block id) already stored that it keeps, and whether it resumes a stopped ingest."""

    doc: Document
    chunks: list[Chunk]
    old: int | None
    kept: dict[int, str]
    resumed: bool = False
    renamed: bool = False  # `old` is another document with this text, whose file is gone (--sync)


class Answer:
    """Iterate for the answer's text pieces as they are generated; then read the totals."""

    def __init__(self, tokens: Iterator[int], tokenizer, info: dict, started: float,
                 judge: Callable[[str], dict] | None = None) -> None:
        self._tokens = tokens
        self._judge = judge
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
        if self._judge is not None:
            self.info.update(self._judge(text))

    @property
    def grounded(self) -> bool | None:
        """Whether what was read supports the answer (after iterating); None: not judged."""
        return self.info.get("grounded")

    def to_dict(self) -> dict:
        return {
            "answer": self.text.strip(), **self.info, "tokens": len(self.ids),
            "seconds": round(self.seconds or 0.0, 3),
            "first_token_seconds": round(self.first_token_seconds or 0.0, 3),
        }


def sampling(max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None) -> Sampling:
    """Sampling settings, checked: every value finite and in range."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"the most tokens to generate must be >= 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UsageError(f"the temperature must be a finite number >= 0, got {temperature}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise UsageError(f"top-p must be in (0, 1], got {top_p}", hint="1 keeps every token; 0.9 is common")
    if top_k < 0:
        raise UsageError(f"top-k must be >= 0 (0: all tokens), got {top_k}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UsageError(f"the seed must be between 0 and 2**64 - 1, got {seed}")
    return Sampling(max_new_tokens, temperature, top_p, top_k, seed)


class Session:
    """One memory (by name) under one home, and the model that reads and writes it."""

    def __init__(self, settings: Settings | None = None, **overrides) -> None:
        self.settings = settings or load_settings(**overrides)
        self.store = Store(self.settings.home)
        self._model: LoadedModel | None = None
        self._models = None  # a shared model cache (hub.Models), when serving
        self._repo = None
        self._threads_at = -1e9  # when the threads were last sized

    @property
    def memory_name(self) -> str:
        return self.settings.memory

    @property
    def repo(self):
        """The store handle of this session's memory."""
        if self._repo is None:
            self._repo = self.store.open(self.memory_name)
        return self._repo

    # -- the model ---------------------------------------------------------------------

    def attach(self, models) -> Session:
        """Take loaded models from a shared cache (service/hub.py) instead of loading them."""
        self._models = models
        return self

    def model_spec(self, info: dict | None = None) -> str:
        """The model to use: the one asked for, else the one that wrote the memory, else the default."""
        return self.settings.model or (info or {}).get("model", {}).get("name") or EMBEDDED

    def model(self, info: dict | None = None) -> LoadedModel:
        """The model: the one asked for, else the one that wrote the memory, else the default."""
        if self._models is not None:  # shared: the cache decides what stays loaded
            if info is None and self.settings.model is None and self.repo.exists():
                info = self.repo.info()  # a session serves its memory's own model
            self._model = self._models.get(self.model_spec(info))
        if self._model is None:
            self._model = load_model(
                self.model_spec(info), cache_dir=self.settings.cache_dir, device=self.settings.device,
                dtype=self.settings.dtype,
            )
        if info is not None and info["model"].get("fingerprint") not in (None, self._model.fingerprint,
                                                                         *self._model.aliases):
            raise ModelError(
                f"memory {self.memory_name!r} was written by model {info['model']['name']}, "
                f"not by {self._model.name}",
                hint=f"use --model {info['model']['name']}, or another --memory",
            )
        return self._model

    def size_threads(self) -> None:
        """Compute with the CPUs that are free now (or the configured `threads`): called as
        work starts (at most once a second: looking costs a few milliseconds, which a warm
        server's answers would feel), and now and then during a long ingest."""
        if time.perf_counter() - self._threads_at < 1.0:
            return
        self._threads_at = time.perf_counter()
        placement.use_threads(cpus.threads(self.settings.threads))

    def kind(self) -> type[Memory]:
        """The kind of memory this session's model writes."""
        return memory.for_model(self.model())

    # -- opening and loading -----------------------------------------------------------

    def _open(self, *, locked: bool = False) -> dict:
        """The memory's info, after migrating an older store format forward."""
        info = self.repo.info()
        if info["format"] < FORMAT:
            if locked:
                migrate(self.repo)
            else:
                with self.repo.lock(self.settings.lock_timeout):
                    migrate(self.repo)
            info = self.repo.info()
        return info

    def fit_disk(self) -> dict | None:
        """Evict blocks until the memory fits max_disk (when set); hold the lock."""
        if self.settings.max_disk is None:
            return None
        return space.fit(self.repo, self.settings.max_disk)

    def load(self, version: str | None = None, *, states: bool = False, model: bool = True) -> Memory | None:
        """A stored version (default HEAD) in RAM, None if the memory has no version yet.
        Keys and values are read when first needed (or now, with `states`); without
        `model`, no model is loaded (counts only)."""
        version = version or self.repo.head()
        if version is None:
            if versions := self.repo.versions():  # never start a new root over existing history
                raise StoreError(f"memory {self.memory_name!r} is damaged: refs/HEAD is missing, though it has "
                                 f"{len(versions)} versions", hint="memllm repair restores it")
            return None
        tensors, meta = self.repo.read_version(version)
        lm = self.model(self.repo.info()) if model or states else None
        mem = memory.for_version(meta).load(version, tensors, meta, lm, self.repo, states=states)
        if mem.recomputes:
            mem.max_disk = self.settings.max_disk  # caps the cache of recomputed blocks
        return mem

    def check_head(self, mem: Memory, done: str = "nothing was written") -> None:
        """Refuse to build on (or read) a pool whose blocks are damaged: a commit would carry
        the damage on, an answer would be made of garbage."""
        tensors, meta = mem.version_record("check")
        damaged = self.repo.damaged_blocks(mem.held_blocks(tensors, meta))
        if damaged:
            names = sorted({self._block_source(b) for b in damaged})
            raise StoreError(f"memory {self.memory_name!r} is damaged: {len(damaged)} block(s) of HEAD "
                             f"({', '.join(names[:3])}) are missing or corrupt; {done}",
                             hint="see memllm verify; memllm snapshot rollback to an intact version, or "
                                  "memllm forget the damaged documents")

    def _block_source(self, block: str) -> str:
        try:
            return self.repo.block_meta(block).get("source", block[:12])
        except StoreError:
            return f"block {block[:12]}"

    def _commit(self, mem: Memory, op: str, message: str = "", journal: dict | None = None, **extra) -> str:
        """Write pending blocks, then the version, then move HEAD: a crash leaves HEAD intact.
        The journal records the blocks the commit wrote (so that repair can rebuild a version
        that is lost later) and `journal`'s entries."""
        repo = self.repo
        written = [repo.write_block(tensors, meta) for tensors, meta in mem.pending]
        mem.settle(written)
        tensors, meta = mem.version_record(op, message, **extra)
        version = repo.write_version(tensors, meta)
        repo.set_head(version)
        repo.log_operation({
            "time": meta["time"], "op": op, "version": version, "parent": meta["parent"], "message": message,
            **meta["stats"], **({"blocks": written} if written else {}), **(journal or {}),
        })
        mem.committed(version)
        return version

    def _create(self, lm: LoadedModel, mem: Memory) -> dict:
        info = {
            **mem.settings(),
            "model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "sink": lm.prompt.sink_text,
            "created": now(),
            "memllm": __version__,
        }
        self.repo.create(info)
        # the journal keeps memory.json's content, so that `memllm repair` can restore it
        self.repo.log_operation({"time": info["created"], "op": "create", "model": lm.name, "info": info})
        mem.library = self.repo
        return self.repo.info()

    # -- ingest ------------------------------------------------------------------------

    def ingest(self, paths: list[str], *, stdin: BinaryIO | None = None, name: str | None = None,
               force: bool = False, sync: bool = False, progress: Progress | None = None,
               stop: Stop | None = None) -> IngestReport:
        """Write files, folders, globs or stdin ("-", named `name`) into the memory, one update
        per chunk. A document already in memory (by resolved path, or by name) whose content
        changed replaces its earlier text. With `sync`, the memory mirrors the folders named:
        documents under them whose files are gone are forgotten, in the same version.

        `stop.requested` set while chunks are written (a signal handler does it) ends the
        ingest at the next chunk boundary, with a commit of what was written."""
        if name is not None and not name.strip():
            raise UsageError("--name must not be empty")
        return self.ingest_documents(collect(paths, stdin, stdin_name=name), force=force, sync=sync,
                                     progress=progress, stop=stop)

    def ingest_text(self, name: str, text: str, *, force: bool = False, stop: Stop | None = None) -> IngestReport:
        """Write `text` as the document `name` (a later text under that name replaces it)."""
        return self.ingest_documents([Document.of(name, text)], force=force, stop=stop)

    def ingest_documents(self, collected: Collected | list[Document], *, force: bool = False, sync: bool = False,
                         progress: Progress | None = None, stop: Stop | None = None) -> IngestReport:
        if isinstance(collected, list):
            collected = Collected(checked(collected))
        progress = progress or NoProgress()
        existed = self.repo.exists()
        try:
            return self._ingest(collected, force, sync, progress, stop or Stop())
        finally:
            if not existed:
                self.repo.remove_if_empty()  # a first ingest that failed before creating the memory

    def _ingest(self, collected: Collected, force: bool, sync: bool, progress: Progress,
                stop: Stop) -> IngestReport:
        name = self.memory_name
        with self.repo.lock(self.settings.lock_timeout, create=True):
            started = time.perf_counter()  # the time spent waiting for another writer is not ingest time
            info = self._open(locked=True) if self.repo.exists() else None
            lm = self.model(info)
            self.size_threads()
            mem = self.load() if info else None
            if mem is not None:
                self.check_head(mem)
                if self.settings.block_format:
                    mem.use_block_format(self.settings.block_format)  # for the blocks written from now on
            if mem is None:
                mem = self.kind().create_for(lm, self.settings)
                mem.library = self.repo
                if info is None:
                    self._create(lm, mem)
            report = IngestReport(name, 0, 0, 0, 0, 0.0, len(mem), mem.pool_size,
                                  skipped=[{"path": p, "reason": r} for p, r in collected.skipped], unit=mem.unit)
            gone = _deleted(mem, collected) if sync else []
            plan = self._plan(mem, collected, force, report, set(gone))
            carried = {step.old for step in plan if step.renamed}  # a renamed document keeps its chunks
            gone = [i for i in gone if i not in carried]
            report.removed = [mem.sources[i]["name"] for i in gone]
            touched = _note_links(mem, collected)
            progress.start(sum(len(c.ids) for step in plan for c in step.chunks if c.index not in step.kept),
                           f"ingesting into {name}")
            last_commit = time.perf_counter()
            stop.armed = True
            try:
                if gone:
                    mem.forget(set(gone))
                for step in plan:
                    last_commit = self._write_document(mem, step, report, progress, stop, last_commit)
                    if stop.requested:
                        break
            finally:
                stop.armed = False
                progress.finish()
            if stop.requested:
                report.interrupted = stop.requested
            if mem.updates or gone or report.updated or report.reused or touched:
                stopped = f" (stopped by {stop.requested})" if stop.requested else ""
                self._commit(mem, "ingest", _ingest_message(mem, report) + stopped)
                report.disk = self.fit_disk()
                if not stop.requested:
                    mem.prepare_reads()
        report.tokens_held = len(mem)
        report.seconds = time.perf_counter() - started
        return report

    def _plan(self, mem: Memory, collected: Collected, force: bool, report: IngestReport,
              gone: set[int] = frozenset()) -> list[_Step]:
        """What each document needs: nothing (unchanged), all of its chunks, or, for an edited
        or half-written one, the chunks that are not already stored. A new path whose text
        only documents that this sync forgets hold (a file renamed, or copied and its original
        deleted) keeps their chunks under its new name."""
        lm = self.model()
        plan, planned = [], set()
        for doc in collected.documents:
            old = mem.live_source(doc.identity)
            renamed = False
            if old is None and gone and doc.identity is not None and not force:
                holders = [i for i, s in enumerate(mem.sources) if s["sha256"] == doc.sha256
                           and not s.get("forgotten") and not s.get("partial")]
                if holders and set(holders) <= gone:
                    old, renamed = holders[-1], True
            partial = old is not None and bool(mem.sources[old].get("partial"))
            same = old is not None and mem.sources[old]["sha256"] == doc.sha256 and not renamed
            if doc.sha256 in planned or (not force and not partial and not renamed and
                                         (same or (old is None and mem.has_content(doc.sha256)))):
                report.unchanged.append(doc.name)
                continue
            planned.add(doc.sha256)
            stored = mem.chunk_blocks(old) if old is not None and not force else []
            chunks = chunk_document(doc.text, lm.tokenizer, CHUNK_TOKENS, keep=[ids for _, ids in stored])
            by_ids = {tuple(ids): block for block, ids in stored}
            kept = {}
            for chunk in chunks:
                block = by_ids.pop(tuple(chunk.ids), None)
                if block is not None:
                    kept[chunk.index] = block
            plan.append(_Step(doc, chunks, old, kept, resumed=partial and same, renamed=renamed))
            report.warnings += mem.check_chunks(doc.name, [c for c in chunks if c.index not in kept])
            if renamed:
                report.renamed.append({"from": mem.sources[old]["name"], "to": doc.name})
            elif old is not None and not (partial and same):
                report.updated.append(doc.name)
            if partial and same:
                report.resumed.append(doc.name)
        return plan

    def _write_document(self, mem: Memory, step: _Step, report: IngestReport, progress: Progress, stop: Stop,
                        last_commit: float) -> float:
        """Write one document's chunks (stopping at a chunk boundary when asked to), committing
        every CHECKPOINT_SECONDS: a document written in part is marked so, and the same ingest
        run again resumes it. Returns when it last committed."""
        doc, old = step.doc, step.old
        source = mem.add_source(doc.name, doc.sha256)
        if doc.via:
            mem.sources[source]["via"] = doc.via
        revision = mem.sources[old].get("revision", 1) if old is not None else 0
        mem.sources[source]["revision"] = revision if step.resumed else revision + 1
        mem.sources[source]["partial"] = True
        if step.kept:  # an edited document keeps its unchanged chunks; the rest of the old text goes
            mem.carry(old, source, [(block, i, len(step.chunks[i].ids)) for i, block in step.kept.items()])
            report.reused += len(step.kept)
        elif old is not None:  # an edited document replaces its earlier text, in the same version
            mem.forget({old})
        for chunk in step.chunks:
            if chunk.index in step.kept:
                continue
            if stop.requested:
                break
            update = mem.write(chunk.ids, source=source, chunk=chunk.index, span=(chunk.start, chunk.end))
            report.chunks += 1
            report.tokens += update["tokens"]
            report.dropped += update["dropped"]
            progress.advance(update["tokens"], doc.name)
            if time.perf_counter() - self._threads_at > THREADS_SECONDS:
                self.size_threads()
            if time.perf_counter() - last_commit > CHECKPOINT_SECONDS and not stop.requested:
                self._commit(mem, "ingest", _ingest_message(mem, report) + " (checkpoint)")
                self.fit_disk()
                last_commit = time.perf_counter()
        else:
            del mem.sources[source]["partial"]
            report.files += 1
            if note := mem.larger_than_pool(source):
                report.warnings.append(note)
        return last_commit

    # -- ask ---------------------------------------------------------------------------

    def ask(self, question: str, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
            top_k: int = 0, seed: int | None = None, budget: int | None = None) -> Answer:
        """Answer from memory. Iterate the result for the text as it is generated.

        `budget` (default: the config's read_budget, else READ_BUDGET) caps the tokens read:
        the blocks most relevant to the question, from the pool and the long-term tier; 0
        reads the whole pool, as MemoryLLM does."""
        started = time.perf_counter()
        if not question.strip():
            raise InputError("the question is empty")
        chosen = sampling(max_new_tokens, temperature, top_p, top_k, seed)
        budget = self.budget(budget)
        self.model(self._open())  # checks that this model wrote the memory
        self.size_threads()
        mem = self.load()
        if mem is None or len(mem) == 0:
            raise MemoryNotFound(f"memory {self.memory_name!r} is empty",
                                 hint="ingest something first: memllm ingest FILE")
        if budget == 0 or not mem.checks_reads:
            self.check_head(mem, "nothing was read")  # what is read must be what was stored
        return self._answer(mem, question, chosen, budget, started)

    def budget(self, budget: int | None = None) -> int:
        """The read budget: the one given, else the config's, else READ_BUDGET."""
        budget = budget if budget is not None else self.settings.read_budget
        budget = READ_BUDGET if budget is None else budget
        if budget < 0:
            raise UsageError("the read budget must be >= 0 (0: the whole pool)")
        return budget

    def _answer(self, mem: Memory, question: str, chosen: Sampling, budget: int, started: float) -> Answer:
        lm = self.model()
        reading = mem.read(question, budget, chosen)
        reading.info = {"model": lm.name, "memory": self.memory_name, **reading.info}  # the kind adds to it
        for part in reading.info.get("damaged", []):
            what = (f"block {part['block'][:12]}" if part["source"] is None
                    else f"{part['source']}, chunk {part['chunk']},")
            log.warning("%s is damaged in memory %r and was not read; see memllm verify (memllm repair mends it)",
                        what, self.memory_name)
        return Answer(reading.tokens, lm.tokenizer, reading.info, started, reading.judge)

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict:
        """What the memory holds; reads the store only (no model is loaded)."""
        info = self._open()
        mem = self.load(model=False)
        kind = memory.for_version(info)
        n = len(mem) if mem else 0
        pool_size = mem.pool_size if mem else info["pool_size"]
        return {
            "memory": self.memory_name,
            "model": info["model"]["name"],
            "fingerprint": info["model"]["fingerprint"][:16],
            "kind": kind.kind,
            "version": mem.head if mem else None,
            "pool_size": pool_size,
            "tokens": n,
            "fill": round(n / pool_size, 4),
            "updates": mem.update_count if mem else 0,
            "dropped": mem.dropped_total() if mem else 0,
            "unit": kind.unit,
            "dtype": info.get("dtype"),
            "write_context": mem.write_context if mem else info.get("write_context"),
            "block_format": mem.block_format if mem else info.get("block_format"),
            "write_scope": mem.write_scope if mem else info.get("write_scope"),
            "disk_bytes": self.repo.disk_bytes(),
            "max_disk": self.settings.max_disk,
            "evicted_blocks": len(self.repo.evicted()),
            "created": info.get("created"),
            "sources": mem.source_counts() if mem else [],
        }


def _ingest_message(mem: Memory, report: IngestReport) -> str:
    updated = set(report.updated)
    names = list(dict.fromkeys(mem.sources[u["source"]]["name"] for u in mem.updates))
    names = [f"{n} (updated)" if n in updated else n for n in names]
    shown = _listed(names)
    if report.removed:
        shown = f"{shown}; forget {_listed(report.removed)}" if shown else f"forget {_listed(report.removed)}"
    return f"ingest {shown}"


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _deleted(mem: Memory, collected: Collected) -> list[int]:
    """Live documents under the folders collected, or reached through them (a symlink inside
    to a file outside: `via`), that were not found through them again."""
    found = {d.identity for d in collected.documents}
    roots = [folder.rstrip(os.sep) + os.sep for folder in collected.folders]
    return [i for i, s in enumerate(mem.sources) if not s.get("forgotten") and s["name"] not in found
            and any(place.startswith(root) for root in roots for place in (s["name"], s.get("via") or ""))]


def _note_links(mem: Memory, collected: Collected) -> bool:
    """Record on unchanged documents the link inside a folder that reaches them now (so a sync
    forgets them once the link is gone); returns whether any changed."""
    changed = False
    for doc in collected.documents:
        live = mem.live_source(doc.identity)
        if live is not None and mem.sources[live]["sha256"] == doc.sha256 and mem.sources[live].get("via") != doc.via:
            if doc.via or "via" in mem.sources[live]:
                mem.sources[live]["via"] = doc.via
                if doc.via is None:
                    del mem.sources[live]["via"]
                changed = True
    return changed
