"""The Python API: everything a command does is one call here.

    from memllm_cli.service import Memllm
    m = Memllm(memory="notes")
    m.ingest(["notes.txt"])
    print("".join(m.ask("When is the meeting?")))
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import torch

from . import __version__, recall
from .chunking import chunk_document
from .config import Settings, load_settings
from .engine import Pool
from .errors import InputError, MemoryNotFound, ModelError, StoreError
from .memory import DTYPES, Memory, now
from .migrations import migrate
from .models import EMBEDDED, LoadedModel, load_model
from .official import MPlus, split_ids
from .progress import NoProgress, Progress
from .sources import Collected, Document, collect
from .store import FORMAT, Store
from .trained import TrainedMemory, block_tensors, drop_blocks

KIND = "training-free"
CHUNK_TOKENS = 512  # tokens per update at most (the MemoryLLM setting)
DEFAULT_POOL_SIZE = 4096  # see docs/design.md, "Choosing N"
ANSWER_RESERVE = 1024  # positions kept free after the pool for the question and the answer
CHECKPOINT_SECONDS = 60.0  # a long ingest commits at document boundaries this often
MIN_INJECTION = 16  # the official README: shorter injections disturb the trained memory
READ_BUDGET = 1024  # tokens ask reads by default (docs/design.md, "Reading within a budget")


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
    warnings: list[str] = field(default_factory=list)
    unit: str = "tokens"  # of tokens_held and pool_size; "rows per layer" for MemoryLLM checkpoints

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

    def sink(self) -> Pool | None:
        """The pinned prefix every chunk is written after and every question read after
        (training-free kind; the trained checkpoints read their pool themselves)."""
        if self._sink is None:
            lm = self.model()
            if lm.trained:
                return None
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
            info = self._open(name, locked=True) if self.store.exists(name) else None
            lm = self.model(info)
            memory = self._load_memory(name) if info else None
            if memory is None:
                memory = self._new_memory(lm)
                if info is None:
                    info = self._create(name, lm, memory)
            report = IngestReport(
                name, 0, 0, 0, 0, 0.0, len(memory), memory.pool_size,
                skipped=[{"path": p, "reason": r} for p, r in collected.skipped],
                unit="rows per layer" if lm.trained else "tokens",
            )
            plan, planned = [], set()
            for doc in collected.documents:
                if doc.sha256 in planned or (memory.has_content(doc.sha256) and not force):
                    report.unchanged.append(doc.name)
                else:
                    planned.add(doc.sha256)
                    plan.append((doc, chunk_document(doc.text, lm.tokenizer, CHUNK_TOKENS)))
                    if lm.trained:
                        short = [c for c in plan[-1][1] if len(c.ids) < MIN_INJECTION]
                        report.warnings += [
                            f"{doc.name}: chunk {c.index} has {len(c.ids)} tokens; MemoryLLM checkpoints were "
                            f"trained on injections of at least {MIN_INJECTION} and may be disturbed by shorter ones"
                            for c in short
                        ]
            total = sum(len(c.ids) for _, chunks in plan for c in chunks)
            progress.start(total, f"ingesting into {name}")
            sink = self.sink()
            last_commit = time.perf_counter()
            try:
                for doc, chunks in plan:
                    source = memory.add_source(doc.name, doc.sha256)
                    for chunk in chunks:
                        update = memory.write(
                            lm.engine, sink, chunk.ids, source=source, chunk=chunk.index, span=(chunk.start, chunk.end)
                        )
                        report.chunks += 1
                        report.tokens += update["tokens"]
                        report.dropped += update["dropped"]
                        progress.advance(update["tokens"], doc.name)
                    report.files += 1
                    if time.perf_counter() - last_commit > CHECKPOINT_SECONDS:
                        self._commit(name, memory, "ingest", _ingest_message(memory))
                        last_commit = time.perf_counter()
            finally:
                progress.finish()
            if memory.updates:
                self._commit(name, memory, "ingest", _ingest_message(memory))
                if not lm.trained:  # build the recall index now, so the next ask finds it ready
                    recall.index(memory, self.store, name, lm.tokenizer)
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
        budget: int | None = None,
    ) -> Answer:
        """Answer from memory. Iterate the result for the text as it is generated.

        `budget` (default: the config's read_budget, else READ_BUDGET) caps the tokens read:
        the blocks most relevant to the question, from the pool and the long-term tier; 0
        reads the whole pool, as MemoryLLM does."""
        started = time.perf_counter()
        if not question.strip():
            raise InputError("the question is empty")
        name = self.memory_name
        info = self._open(name)
        lm = self.model(info)  # checks that this model wrote the memory
        budget = self._budget(budget)
        memory = self._load_memory(name, states=lm.trained or not budget)
        if memory is None or len(memory) == 0:
            raise MemoryNotFound(f"memory {name!r} is empty", hint="ingest something first: memllm ingest FILE")
        return self.ask_in(
            memory, question, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, started=started, budget=budget,
        )

    def _budget(self, budget: int | None) -> int:
        budget = budget if budget is not None else self.settings.read_budget
        budget = READ_BUDGET if budget is None else budget
        if budget < 0:
            raise InputError("the read budget must be >= 0 (0: the whole pool)")
        return budget

    def ask_with_text(self, question: str, texts: list[str], *, max_new_tokens: int = 256) -> Answer:
        """The prompt baseline: the same texts placed in the prompt instead of memory."""
        started = time.perf_counter()
        lm = self.model()
        if lm.trained:
            raise ModelError("the prompt baseline needs a training-free model, not a MemoryLLM checkpoint")
        ids = lm.prompt.sink_ids(lm.tokenizer)
        for text in texts:
            ids += [i for c in chunk_document(text, lm.tokenizer, CHUNK_TOKENS) for i in c.ids]
        ids += lm.prompt.question_ids(lm.tokenizer, question)
        tokens = lm.engine.generate(torch.tensor(ids), None, max_new_tokens=max_new_tokens, stop_ids=lm.stop_ids())
        return Answer(tokens, lm.tokenizer, {"model": lm.name, "memory": None}, started)

    # -- memories in RAM (evaluation, benchmarks) ----------------------------------------

    def scratch_memory(self, *, pool_size: int | None = None, write_context: int | None = None,
                       seed: int | None = None, dtype: str | None = None,
                       keep_blocks: bool = False) -> Memory | TrainedMemory:
        """An empty memory that lives in RAM only, for the current model. With `keep_blocks`,
        it keeps every update's tokens (its long-term tier, in RAM) for reading within a budget."""
        lm = self.model()
        if lm.trained:
            memory = TrainedMemory.empty(lm.engine)
        else:
            memory = self._new_memory(lm, pool_size=pool_size, write_context=write_context)
            if dtype is not None:
                memory = Memory.empty(lm.engine, pool_size=memory.pool_size, write_context=memory.write_context,
                                      dtype=dtype)
        memory.keep_blocks = keep_blocks and not lm.trained
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

    def ask_in(self, memory: Memory | TrainedMemory, question: str, *, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               started: float | None = None, budget: int | None = 0) -> Answer:
        """Answer from a given memory (stored or in RAM). With a budget, read only the blocks
        most relevant to the question (the memory's stored blocks, and its pending ones)."""
        started = started or time.perf_counter()
        lm = self.model()
        ids = torch.tensor(lm.prompt.question_ids(lm.tokenizer, question))
        sampling = {"stop_ids": lm.stop_ids(), "temperature": temperature, "top_p": top_p, "top_k": top_k,
                    "seed": seed}
        info = {"model": lm.name, "memory": self.memory_name}
        if lm.trained:
            lm.engine.set_state(memory.state)
            return Answer(self._trained_tokens(memory, lm, ids, max_new_tokens, sampling, info), lm.tokenizer, info,
                          started)
        context = None
        if budget:
            stored = memory.head is not None and self.store.exists(self.memory_name) and not memory.pending
            idx = recall.index(memory, self.store if stored else None, self.memory_name, lm.tokenizer)
            if idx.candidates:
                selected = recall.select(idx, question, budget)
                dtype = DTYPES[memory.dtype]
                context = self.sink() + (recall.read(selected, dtype) if selected else Pool.empty(
                    lm.engine.layers, lm.engine.kv_heads, lm.engine.head_dim, dtype))
                info["read_tokens"] = sum(c.tokens for c in selected)
                info["sources"] = _cited(memory, selected, lm.tokenizer)
        if context is None:
            if not memory.has_states:  # loaded as an index, and nothing to read within a budget
                memory = self._load_memory(self.memory_name)
            context = memory.context(self.sink())
            info["read_tokens"] = len(memory)
        tokens = lm.engine.generate(ids, context, max_new_tokens=max_new_tokens, **sampling)
        return Answer(tokens, lm.tokenizer, info, started)

    def _trained_tokens(self, memory: TrainedMemory, lm: LoadedModel, ids: torch.Tensor, max_new_tokens: int,
                        sampling: dict, info: dict) -> Iterator[int]:
        """The official generation; for M+, once its retriever has chosen (at the prompt's
        forward pass), the documents the chosen long-term rows came from go into `info`."""
        stream = lm.engine.stream(ids, max_new_tokens, **sampling)
        cited = False
        for token, _ in stream:
            if not cited and isinstance(lm.engine, MPlus):
                info["sources"], cited = self._retrieved(memory, lm), True
            yield token
        if not cited and isinstance(lm.engine, MPlus):
            info["sources"] = self._retrieved(memory, lm)

    def _retrieved(self, memory: TrainedMemory, lm: LoadedModel) -> list[dict]:
        """M+: documents by the share of long-term rows its retriever placed before the pool."""
        engine, counts = lm.engine, {}
        for i, chosen in enumerate(engine.retrieved):
            block, _ = split_ids(torch.cat([engine.ltm_ids[i], engine.cached_ids[i]])[chosen])
            for b in block.tolist():
                counts[b] = counts.get(b, 0) + 1
        total = sum(counts.values()) or 1
        stored = memory.head is not None and self.store.exists(self.memory_name)
        merged: dict[tuple[int, int], dict] = {}
        for b, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            source = memory.meta["block_sources"][b] if 0 <= b < len(memory.meta["block_sources"]) else -1
            if source < 0:
                continue  # the checkpoint's own long-term rows
            key = (source, memory.meta["block_chunks"][b])
            row = merged.setdefault(key, {"source": memory.sources[source]["name"], "chunk": key[1], "score": 0.0,
                                          "rows": 0, "excerpt": ""})
            row["score"] += n / total
            row["rows"] += n
            if not row["excerpt"] and stored and self.store.has_block(self.memory_name, memory.blocks[b]):
                row["excerpt"] = _excerpt(lm.tokenizer, self.store.read_block_ids(self.memory_name, memory.blocks[b]))
        out = sorted(merged.values(), key=lambda r: -r["score"])
        for row in out:
            row["score"] = round(row["score"], 3)
        return out

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict:
        """What the memory holds; reads the store only (no model is loaded)."""
        name = self.memory_name
        info = self._open(name)
        memory = self._load_memory(name, states=False)
        held = memory.held_per_source() if memory else []
        n = len(memory) if memory else 0
        pool_size = memory.pool_size if memory else info["pool_size"]
        live = [(i, s, held[i]) for i, s in enumerate(memory.sources if memory else []) if not s.get("forgotten")]
        long_term = memory.long_term_per_source() if isinstance(memory, TrainedMemory) else None
        stored = self._stored_per_source(name, memory) if memory is not None and long_term is None else {}
        per_update = _per_update(memory.sources) if memory else 0.0
        if long_term is not None:
            per_update = float(memory.write_context)  # K rows per injection
        return {
            "memory": name,
            "model": info["model"]["name"],
            "fingerprint": info["model"]["fingerprint"][:16],
            "kind": info.get("kind", KIND),
            "version": memory.head if memory else None,
            "pool_size": pool_size,
            "tokens": n,
            "fill": round(n / pool_size, 4),
            "updates": memory.update_count if memory else 0,
            "dropped": sum(s.get("rows", s["tokens"]) - h for _, s, h in live),
            "unit": "tokens" if long_term is None else "rows per layer",
            "dtype": info.get("dtype"),
            "write_context": info.get("write_context"),
            "disk_bytes": self.store.disk_bytes(name),
            "created": info.get("created"),
            "sources": [
                {"name": s["name"], "sha256": s["sha256"], "chunks": s["chunks"],
                 "tokens_written": s["tokens"], "tokens_held": h,
                 **({"rows_written": s.get("rows", 0), "long_term_rows": long_term[i]}
                    if long_term is not None else {"tokens_long_term": max(0, stored.get(i, 0) - h)}),
                 **{f"pool_after_{t}": round(recall.forecast(h, n if long_term is None else pool_size, pool_size,
                                                             per_update, t)) for t in (10, 100)}}
                for i, s, h in live
            ],
        }

    def _stored_per_source(self, name: str, memory: Memory) -> dict[int, int]:
        """Tokens per document in the blocks still on disk (pool and long-term tier)."""
        by_sha = {s["sha256"]: i for i, s in enumerate(memory.sources) if not s.get("forgotten")}
        out: dict[int, int] = {}
        for digest in memory.blocks:
            if self.store.has_block(name, digest):
                meta = self.store.block_meta(name, digest)
                i = by_sha.get(meta.get("source_sha256"))
                if i is not None:
                    out[i] = out.get(i, 0) + int(meta.get("tokens", 0))
        return out

    # -- versions ----------------------------------------------------------------------

    def log(self, limit: int | None = None) -> list[dict]:
        """Versions from HEAD back through their parents, newest first."""
        name = self.memory_name
        self._open(name)
        tags: dict[str, list[str]] = {}
        for tag, version in self.store.tags(name).items():
            tags.setdefault(version, []).append(tag)
        out, version = [], self.store.head(name)
        present = set(self.store.versions(name))
        while version in present and (limit is None or len(out) < limit):  # stops where gc pruned
            meta = self.store.version_meta(name, version)
            out.append({"version": version, "time": meta["time"], "op": meta["op"], "message": meta["message"],
                        "tags": tags.get(version, []), **meta["stats"],
                        "unit": "rows per layer" if meta.get("kind") == "trained" else "tokens"})
            version = meta.get("parent")
        return out

    def snapshot_create(self, tag: str | None = None, message: str = "") -> dict:
        name = self.memory_name
        with self.store.lock(name, self.settings.lock_timeout):
            self._open(name, locked=True)
            version = self.store.resolve(name, "HEAD")
            tag = tag or "snapshot-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            if tag in self.store.tags(name):
                raise InputError(f"a snapshot named {tag!r} exists", hint="delete it first or choose another name")
            self.store.set_tag(name, tag, version)
            self.store.log_operation(name, {"time": now(), "op": "snapshot", "tag": tag, "version": version,
                                            "message": message})
        return {"snapshot": tag, "version": version, "message": message}

    def snapshot_list(self) -> list[dict]:
        name = self.memory_name
        self._open(name)
        messages = {e.get("tag"): e.get("message", "") for e in self.store.journal(name) if e.get("op") == "snapshot"}
        out = []
        for tag, version in self.store.tags(name).items():
            meta = self.store.version_meta(name, version)
            out.append({"snapshot": tag, "version": version, "time": meta["time"], "tokens": meta["stats"]["tokens"],
                        "message": messages.get(tag, "")})
        return out

    def snapshot_delete(self, tag: str) -> dict:
        name = self.memory_name
        with self.store.lock(name, self.settings.lock_timeout):
            self._open(name, locked=True)
            version = self.store.tags(name).get(tag)
            self.store.delete_tag(name, tag)
            self.store.log_operation(name, {"time": now(), "op": "snapshot-delete", "tag": tag, "version": version})
        return {"deleted": tag, "version": version}

    def rollback(self, target: str, *, dry_run: bool = False) -> dict:
        """Make `target`'s pool the new HEAD, as a new version (so a rollback can be rolled back)."""
        name = self.memory_name
        with self.store.lock(name, self.settings.lock_timeout):
            self._open(name, locked=True)
            head, version = self.store.resolve(name, "HEAD"), self.store.resolve(name, target)
            plan = {"from": head, "to": version, "target": target, "diff": self._diff(name, head, version),
                    "dry_run": dry_run}
            if dry_run or head == version:
                return {**plan, "version": head}
            tensors, meta = self.store.read_version(name, version)
            meta = {**meta, "parent": head, "op": "rollback", "time": now(), "message": f"rollback to {target}",
                    "updates": [], "target": version,
                    "stats": {"tokens": meta["stats"]["tokens"], "added": plan["diff"]["totals"]["added"],
                              "dropped": plan["diff"]["totals"]["dropped"]}}
            new = self.store.write_version(name, tensors, meta)
            self.store.set_head(name, new)
            self.store.log_operation(name, {"time": meta["time"], "op": "rollback", "version": new, "parent": head,
                                            "target": version, "message": meta["message"]})
        return {**plan, "version": new}

    def diff(self, a: str = "HEAD~1", b: str = "HEAD") -> dict:
        """Per source document: tokens added, dropped and held between two versions."""
        name = self.memory_name
        self._open(name)
        return self._diff(name, self.store.resolve(name, a), self.store.resolve(name, b))

    def _diff(self, name: str, a: str, b: str) -> dict:
        """Counts are tokens for the training-free kind; for the trained kind, pool rows per
        layer (rows are dropped per layer), with the checkpoint's own rows as one source."""
        sides, layers = [], 1
        for version in (a, b):
            tensors, meta = self.store.read_version(name, version)
            blocks, sources = meta["blocks"], meta["sources"]
            layered = tensors["block"].dim() == 2  # trained: (L, N)
            layers = tensors["block"].shape[0] if layered else 1
            layer = torch.arange(layers).repeat_interleave(tensors["block"].shape[-1]) if layered else None
            keys = {}
            for k, (blk, row, src) in enumerate(zip(tensors["block"].flatten().tolist(),
                                                    tensors["row"].flatten().tolist(),
                                                    tensors["source"].flatten().tolist(), strict=True)):
                source = sources[src] if src >= 0 else {"sha256": "", "name": "<checkpoint memory>"}
                key = (blocks[blk], row) if layer is None else (int(layer[k]), blocks[blk], row)
                keys[key] = (source["sha256"], source["name"])
            written = {s["sha256"]: s.get("rows", s["tokens"]) for s in sources}
            sides.append((keys, written))
        (old, _), (new, written) = sides
        rows: dict[str, dict] = {}
        for key, (sha, source) in {**old, **new}.items():
            row = rows.setdefault(sha, {"source": source, "sha256": sha, "added": 0, "dropped": 0, "held": 0,
                                        "written": written.get(sha, 0)})
            row["added"] += key in new and key not in old
            row["dropped"] += key in old and key not in new
            row["held"] += key in new
        meta_b = self.store.version_meta(name, b)
        per_update = _per_update(meta_b["sources"]) if layers == 1 else float(meta_b["write_context"])
        pool = meta_b["stats"]["tokens"] if layers == 1 else meta_b["pool_size"]
        for row in rows.values():
            for k in ("added", "dropped", "held"):
                row[k] = round(row[k] / layers)
            row["retained"] = round(row["held"] / row["written"], 4) if row["written"] else 0.0
            row["long_term"] = max(0, row["written"] - row["held"]) if row["sha256"] else 0
            for t in (10, 100):
                row[f"pool_after_{t}"] = round(recall.forecast(row["held"], pool, meta_b["pool_size"], per_update, t))
        totals = {k: sum(r[k] for r in rows.values()) for k in ("added", "dropped", "held")}
        return {"from": a, "to": b, "sources": sorted(rows.values(), key=lambda r: r["source"]), "totals": totals,
                "unit": "tokens" if layers == 1 else "rows per layer"}

    def forget(self, sources: list[str], *, purge: bool = False) -> dict:
        """A new version without these documents' tokens (by path as ingested, or content hash).

        With `purge`, also rewrite every version without them and delete their blocks, so
        that no byte they wrote stays on disk (their names stay in the journal)."""
        name = self.memory_name
        with self.store.lock(name, self.settings.lock_timeout):
            self._open(name, locked=True)
            memory = self._load_memory(name, states=False)
            if memory is None:
                raise MemoryNotFound(f"memory {name!r} is empty")
            chosen = _match_sources(memory.sources, sources, include_forgotten=purge)
            shas = {memory.sources[i]["sha256"] for i in chosen}
            held = memory.forget(set(chosen))
            names = [memory.sources[i]["name"] for i in chosen]
            version = self._commit(name, memory, "forget", "forget " + ", ".join(names), forgotten=names)
            result = {"version": version, "forgotten": names, "tokens_removed": held, "tokens": len(memory),
                      "unit": "rows per layer" if isinstance(memory, TrainedMemory) else "tokens"}
            if purge:
                result.update(self._purge(name, shas))
                result["version"] = self.store.head(name)
        return result

    def _purge(self, name: str, shas: set[str]) -> dict:
        """Rewrite every version without the blocks of these sources, parents first, then
        move the refs and delete the old versions and the blocks."""
        store = self.store
        versions = store.versions(name)
        metas = {v: store.version_meta(name, v) for v in versions}
        order: list[str] = []
        done: set[str] = set()
        for start in versions:  # parents before children
            chain = []
            v = start
            while v and v not in done and v in metas:
                chain.append(v)
                v = metas[v].get("parent")
            for v in reversed(chain):
                done.add(v)
                order.append(v)
        purged_blocks = {
            b for b in store.blocks(name) if store.block_meta(name, b).get("source_sha256") in shas
        }
        mapping: dict[str, str] = {}
        for v in order:
            tensors, meta = store.read_version(name, v)
            blocks = meta.get("blocks", [])
            kept = [i for i, b in enumerate(blocks) if b not in purged_blocks]
            remap = torch.full((len(blocks),), -1, dtype=torch.int64)
            remap[kept] = torch.arange(len(kept))
            if meta.get("kind") == "trained":  # rows go back to the checkpoint's; then renumber
                gone = [i for i, b in enumerate(blocks) if b in purged_blocks]
                new_tensors = drop_blocks(tensors, gone, meta["layers"])
                for key in block_tensors(new_tensors):
                    new_tensors[key] = remap[new_tensors[key].to(torch.int64)].to(torch.int32)
                extra = {k: [meta[k][i] for i in kept] for k in ("block_sources", "block_chunks")}
            else:
                block = tensors["block"].to(torch.int64)
                keep = remap[block] >= 0 if len(blocks) else torch.ones(len(block), dtype=torch.bool)
                new_tensors = {k: t[keep] for k, t in tensors.items()}
                new_tensors["block"] = remap[block[keep]].to(torch.int32)
                extra = {}
            secret = [src["name"] for src in meta.get("sources", []) if src["sha256"] in shas]
            message = meta.get("message", "")
            for hidden in secret:
                message = message.replace(hidden, "<purged>")
            new_meta = {
                **meta, "blocks": [blocks[i] for i in kept], "message": message,
                "parent": mapping.get(meta.get("parent"), meta.get("parent")),
                "sources": [{**src, "name": "<purged>", "forgotten": True, "purged": True}
                            if src["sha256"] in shas else src for src in meta.get("sources", [])],
                "updates": [u for u in meta.get("updates", []) if meta["sources"][u["source"]]["sha256"] not in shas],
                "forgotten": [n for n in meta.get("forgotten", []) if n not in secret],
                **extra,
            }
            mapping[v] = store.write_version(name, new_tensors, new_meta)
        head = store.head(name)
        for tag, version in store.tags(name).items():
            store.set_tag(name, tag, mapping.get(version, version))
        if head:
            store.set_head(name, mapping.get(head, head))
        shutil.rmtree(store.path(name) / "cache", ignore_errors=True)  # the recall index holds their text
        stale = [v for v in versions if mapping.get(v, v) != v]
        store.delete_objects(name, "versions", stale)
        freed = sum((store.path(name) / "blocks" / f"{b}.safetensors").stat().st_size for b in purged_blocks)
        store.delete_objects(name, "blocks", sorted(purged_blocks))
        store.log_operation(name, {"time": now(), "op": "purge", "versions_rewritten": len(stale),
                                   "blocks_deleted": len(purged_blocks), "bytes": freed})
        return {"purged_blocks": len(purged_blocks), "versions_rewritten": len(stale), "bytes_freed": freed}

    def verify(self) -> dict:
        name = self.memory_name
        self.store.info(name)
        report = self.store.verify(name)
        return {"memory": name, "ok": report.ok, "damaged": report.damaged, "checked": report.checked,
                "head": self.store.head(name) if report.ok else None}

    def gc(self, *, dry_run: bool = False, keep_versions: int | None = None,
           keep_long_term: int | None = None) -> dict:
        """Delete versions no ref reaches and blocks no kept version uses. With `keep_versions`
        (default: the config's gc_keep_versions, else all), keep only HEAD's and each
        snapshot's nearest that many versions of history. With `keep_long_term` (tokens;
        default: the config's gc_keep_long_term, else all), also delete the oldest blocks of
        the long-term tier (blocks none of whose tokens is in a kept version's pool) beyond
        that many tokens: this bounds the disk a memory takes, at the cost of what ask can
        still find."""
        name = self.memory_name
        keep_versions = keep_versions or self.settings.gc_keep_versions
        keep_long_term = keep_long_term if keep_long_term is not None else self.settings.gc_keep_long_term
        with self.store.lock(name, self.settings.lock_timeout):
            self._open(name, locked=True)
            keep = self.store.reachable(name, keep_versions)
            versions = [v for v in self.store.versions(name) if v not in keep]
            used = {b for v in keep for b in self.store.version_meta(name, v).get("blocks", [])}
            blocks = [b for b in self.store.blocks(name) if b not in used]
            long_term = self._long_term_beyond(name, keep, keep_long_term) if keep_long_term is not None else []
            freed = 0
            if not dry_run:
                freed += self.store.delete_objects(name, "versions", versions)
                freed += self.store.delete_objects(name, "blocks", blocks + long_term)
                freed += self.store.remove_temporaries(name)
                self.store.log_operation(name, {"time": now(), "op": "gc", "versions": len(versions),
                                                "blocks": len(blocks) + len(long_term), "bytes": freed,
                                                "pruned": versions, "pruned_blocks": long_term})
        return {"versions_deleted": len(versions), "blocks_deleted": len(blocks) + len(long_term),
                "long_term_blocks_deleted": len(long_term), "bytes_freed": freed, "dry_run": dry_run}

    def _long_term_beyond(self, name: str, keep: set[str], tokens: int) -> list[str]:
        """Blocks only the long-term tier holds, oldest first, past the newest `tokens` tokens."""
        in_pool: set[str] = set()
        listed: list[str] = []
        for version in keep:
            tensors, meta = self.store.read_version(name, version)
            blocks = meta.get("blocks", [])
            for key in block_tensors(tensors):  # the pool's, and M+'s long-term and waiting rows
                in_pool.update(blocks[i] for i in tensors[key].flatten().unique().tolist() if i >= 0)
            listed += [b for b in blocks if b not in listed]
        tier = [b for b in listed if b not in in_pool and not b.startswith("@") and self.store.has_block(name, b)]
        tier.sort(key=lambda b: -int(self.store.block_meta(name, b).get("update", 0)))  # newest first
        kept, out = 0, []
        for block in tier:
            size = int(self.store.block_meta(name, block).get("tokens", 0))
            if kept + size <= tokens:
                kept += size
            else:
                out.append(block)
        return out

    def export(self, path: Path) -> dict:
        """Write the whole memory (model fingerprint, blocks, versions, refs, journal) to one tar file."""
        name = self.memory_name
        with self.store.lock(name, self.settings.lock_timeout):
            self._open(name, locked=True)
            files = self.store.export(name, Path(path))
        return {"memory": name, "file": str(path), "files": files, "bytes": Path(path).stat().st_size}

    def import_(self, path: Path) -> dict:
        """Install a memory from an export under --memory's name (which must not exist yet)."""
        name = self.memory_name
        if self.store.exists(name):
            raise InputError(f"memory {name!r} exists", hint="import under another name with --memory NAME")
        try:
            with self.store.lock(name, self.settings.lock_timeout):
                report = self.store.import_(name, Path(path))
        finally:
            self.store.remove_if_empty(name)
        info = self.store.info(name)
        self.store.log_operation(name, {"time": now(), "op": "import", "file": str(path)})
        return {"memory": name, "model": info["model"]["name"], "versions": report.checked.get("versions", 0)}

    def memories(self) -> list[str]:
        return self.store.names()

    def list_memories(self) -> list[dict]:
        """Every memory under MEMLLM_HOME: model, tokens held, versions, snapshots, disk."""
        out = []
        for name in self.store.names():
            info = self.store.info(name)
            head = self.store.head(name)
            tokens = self.store.version_meta(name, head)["stats"]["tokens"] if head else 0
            out.append({"memory": name, "model": info["model"]["name"], "tokens": tokens,
                        "pool_size": info["pool_size"], "versions": len(self.store.versions(name)),
                        "snapshots": len(self.store.tags(name)), "disk_bytes": self.store.disk_bytes(name)})
        return out

    # -- internals ---------------------------------------------------------------------

    def _new_memory(self, lm: LoadedModel, *, pool_size: int | None = None,
                    write_context: int | None = None) -> Memory | TrainedMemory:
        if lm.trained:  # the checkpoint fixes N and K
            return TrainedMemory.empty(lm.engine)
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
            "kind": lm.kind,
            "model": {"name": lm.name, "fingerprint": lm.fingerprint},
            "pool_size": memory.pool_size,
            "write_context": memory.write_context,
            "dtype": memory.dtype,
            "sink": lm.prompt.sink_text,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "memllm": __version__,
        }
        self.store.create(name, info)
        self.store.log_operation(name, {"time": info["created"], "op": "create", "model": lm.name})
        return self.store.info(name)

    def _open(self, name: str, *, locked: bool = False) -> dict:
        """The memory's info, after migrating an older store format forward."""
        info = self.store.info(name)
        if info["format"] < FORMAT:
            if locked:
                migrate(self.store, name)
            else:
                with self.store.lock(name, self.settings.lock_timeout):
                    migrate(self.store, name)
            info = self.store.info(name)
        return info

    def _load_memory(self, name: str, version: str | None = None, *,
                     states: bool = True) -> Memory | TrainedMemory | None:
        """A version (default HEAD) in RAM; with `states`, its keys and values too."""
        version = version or self.store.head(name)
        if version is None:
            return None
        tensors, meta = self.store.read_version(name, version)
        if meta.get("dtype") not in DTYPES:
            raise StoreError(f"memory {name!r}: version {version[:12]} has an unknown dtype {meta.get('dtype')!r}")
        if meta.get("kind") == "trained":
            engine = self.model(self.store.info(name)).engine if states else None

            def read(block: str, rows: list[int], names: tuple[str, ...]) -> dict:
                return self.store.read_block_rows(name, block, rows, names)

            return TrainedMemory.from_version(version, tensors, meta, engine, read if states else None)
        pool = self._states(name, tensors, meta) if states else None
        return Memory.from_version(version, tensors, meta, pool)

    def _states(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> Pool:
        """Gather a version's keys and values from its blocks, reading only the rows it holds."""
        block, row = tensors["block"].to(torch.int64), tensors["row"].to(torch.int64)
        if len(block) == 0:
            lm = self.model(self.store.info(name))
            return Pool.empty(lm.engine.layers, lm.engine.kv_heads, lm.engine.head_dim, DTYPES[meta["dtype"]])
        keys = values = None
        for b in block.unique().tolist():
            positions = torch.nonzero(block == b).flatten()
            order = torch.argsort(row[positions])
            positions = positions[order]
            got = self.store.read_block_rows(name, meta["blocks"][b], row[positions].tolist(), ("keys", "values"))
            if keys is None:
                keys = torch.empty(len(block), *got["keys"].shape[1:], dtype=got["keys"].dtype)  # (n, L, Hkv, hd)
                values = torch.empty_like(keys)
            keys[positions] = got["keys"]
            values[positions] = got["values"]
        return Pool(keys.permute(1, 2, 0, 3).contiguous(), values.permute(1, 2, 0, 3).contiguous())  # (L, Hkv, n, hd)

    def _commit(self, name: str, memory: Memory, op: str, message: str = "", **extra) -> str:
        """Write pending blocks, then the version, then move HEAD: a crash leaves HEAD intact."""
        memory.settle([self.store.write_block(name, tensors, meta) for tensors, meta in memory.pending])
        tensors, meta = memory.version_record(op, message, **extra)
        version = self.store.write_version(name, tensors, meta)
        self.store.set_head(name, version)
        self.store.log_operation(name, {
            "time": meta["time"], "op": op, "version": version, "parent": meta["parent"], "message": message,
            **meta["stats"],
        })
        memory.committed(version)
        return version


def _match_sources(sources: list[dict], wanted: list[str], *, include_forgotten: bool = False) -> list[int]:
    """Indices of the sources named by path (as ingested or resolved) or a hash prefix."""
    chosen = []
    for want in wanted:
        resolved = str(Path(want).expanduser().resolve()) if want != "<stdin>" else want
        hits = [
            i for i, s in enumerate(sources)
            if (include_forgotten or not s.get("forgotten")) and not s.get("purged") and (
                s["name"] == want
                or (s["name"] != "<stdin>" and str(Path(s["name"]).resolve()) == resolved)
                or (len(want) >= 8 and s["sha256"].startswith(want.lower()))
            )
        ]
        if not hits:
            raise InputError(f"{want}: no such document in memory", hint="see memllm status for what it holds")
        chosen += [i for i in hits if i not in chosen]
    return chosen


def _cited(memory, selected: list, tokenizer) -> list[dict]:
    """The documents an answer read, best retrieval score first, with a short excerpt."""
    out = []
    for c in sorted(selected, key=lambda c: -c.score):
        out.append({"source": memory.sources[c.source]["name"], "chunk": c.chunk, "score": round(c.score, 3),
                    "tokens": c.tokens, "excerpt": _excerpt(tokenizer, c.ids)})
    return out


def _excerpt(tokenizer, ids: list[int] | None, length: int = 160) -> str:
    """The start of a block's text, on one line."""
    text = " ".join(tokenizer.decode(ids or [], skip_special_tokens=True).split())
    return text[:length] + ("..." if len(text) > length else "")


def _per_update(sources: list[dict]) -> float:
    """Mean tokens per update so far (the K of the forecast)."""
    chunks = sum(s["chunks"] for s in sources)
    return sum(s.get("rows", s["tokens"]) for s in sources) / chunks if chunks else float(CHUNK_TOKENS)


def _ingest_message(memory: Memory) -> str:
    names = list(dict.fromkeys(memory.sources[u["source"]]["name"] for u in memory.updates))
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"ingest {shown}"
