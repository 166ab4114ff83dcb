"""The training-free memory: a token pool for any Hugging Face decoder, where each token came
from, and the update log.

The MemoryLLM update rule, training-free: an update writes every token of one chunk (at
most 512), computed by one forward pass after the pinned sink and the most recent
`write_context` pool tokens. When the pool would exceed `pool_size` tokens, as many old
tokens as overflow are dropped uniformly at random first (the same tokens in every
layer), from a generator whose seed is recorded with the update, so that any sequence of
updates can be replayed bit for bit. Kept tokens keep their order; new ones go at the end.

On disk each update's tokens become one immutable *block*, and the pool is a *version*:
the list of (block, row) pairs it holds, in order. Tokens written since the last commit
point at pending blocks (negative block indices) until the commit writes them.

Writing never copies the pool: it is held as that list of (block, row) pairs, and an update
gathers only its write context (the last `write_context` tokens) from the blocks, in RAM for
the blocks written in this process and through memory maps for the rest; dropping tokens
selects rows of the list. The pool's keys and values are gathered whole only to read it
whole (`context`), and kept until the next update.

Reading within a budget (recall.py) puts only the blocks most relevant to the question
after the sink; a budget of 0 reads the whole pool, as MemoryLLM does.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from ..errors import ModelError, StoreError
from ..model.pool import Pool, drop_uniform
from ..text.bm25 import bm25_scores, rarity
from ..text.chunking import chunk_document
from . import codec, grounding, recall
from .base import CHUNK_TOKENS, DTYPES, BlockSource, Memory, Reading, Sampling

if TYPE_CHECKING:
    from ..model.loading import LoadedModel

# Per token: source id, chunk index, row in its block (= offset in the chunk), block index.
TAGS = ("source", "chunk", "row", "block")
DEFAULT_POOL_SIZE = 4096  # see docs/design.md, "Choosing N"
DEFAULT_WRITE_CONTEXT = 256  # see docs/design.md, "Choosing N and the write context"
# what a chunk is written after: "document", its own document's preceding tokens in the pool
# (a document's first chunk: the sink alone); "pool", the pool's last tokens, whatever wrote
# them (memories created before "document" existed). docs/design.md, "The write scope"
WRITE_SCOPES = ("document", "pool")
DEFAULT_WRITE_SCOPE = "document"
ANSWER_RESERVE = 1024  # positions kept free after the pool for the question and the answer


def index_pool(tags: dict[str, torch.Tensor]) -> Pool:
    """A pool of these tokens without their keys and values (gathered from blocks when needed)."""
    empty = torch.empty(0, 0, len(tags["block"]), 0)
    return Pool(empty, empty, tags)


def sink(lm: LoadedModel) -> Pool:
    """The pinned prefix every chunk is written after and every question read after,
    encoded once per loaded model."""
    if "sink" not in lm.cache:
        lm.cache["sink"] = lm.engine.encode(torch.tensor(lm.prompt.sink_ids(lm.tokenizer)))
    return lm.cache["sink"]


@dataclass
class FreeMemory(Memory):
    kind: ClassVar[str] = "training-free"
    unit: ClassVar[str] = "tokens"
    checks_reads: ClassVar[bool] = True  # reading within a budget checks each block it reads (recall.read)
    recomputes: ClassVar[bool] = True  # an evicted block is written again from its ids when read (max_disk)

    pool_size: int  # N: tokens per layer at most
    write_context: int  # pool tokens a chunk is written after, at most (see write_scope)
    dtype: str  # storage dtype of keys and values in RAM
    pool: Pool  # (L, Hkv, n, hd) with TAGS; keys empty when loaded as an index only
    sources: list[dict] = field(default_factory=list)  # id = index
    blocks: list[str] = field(default_factory=list)  # committed block ids; tag "block" indexes it
    seed: int = field(default_factory=lambda: secrets.randbits(62))
    update_count: int = 0  # updates since the memory was created
    head: str | None = None  # the version this state was loaded from or last committed as
    pending: list[tuple[dict, dict]] = field(default_factory=list)  # blocks not yet written
    updates: list[dict] = field(default_factory=list)  # updates since the last commit
    dropped: int = 0  # tokens dropped since the last commit
    keep_blocks: bool = True  # False for memories that are never stored (evaluation): no pending copies
    has_states: bool = True  # False while only the pool's index is held (loaded as one, or after a write)
    carried: dict[str, list[int]] = field(default_factory=dict)  # block id -> [source, chunk] a later revision kept
    ram_blocks: dict[int, dict] = field(default_factory=dict, repr=False)  # tag -> keys, values (T, L, Hkv, hd)
    block_format: str = "float16"  # how new blocks store keys and values (codec.FORMATS)
    write_scope: str = "pool"  # WRITE_SCOPES; "pool" for memories created before scopes were recorded
    scratch_tag: int = -(1 << 40)  # the next block tag of a memory that keeps no pending blocks
    max_disk: int | None = None  # bytes: evicted blocks' recomputed keys are cached only within it
    lm: LoadedModel | None = None
    library: BlockSource | None = None

    # -- create, load ------------------------------------------------------------------

    @classmethod
    def create(cls, lm: LoadedModel, *, pool_size: int | None = None, write_context: int | None = None,
               dtype: str | None = None, seed: int | None = None, block_format: str | None = None,
               write_scope: str | None = None) -> FreeMemory:
        engine = lm.engine
        header = len(lm.prompt.sink_ids(lm.tokenizer))
        window = engine.pool_window - header - ANSWER_RESERVE
        if window < CHUNK_TOKENS:  # no pool size fits: say so in the model's terms
            slides = " (every layer attends through a sliding window that long)" \
                if engine.pool_window == engine.sliding_window else ""
            raise ModelError(
                f"{lm.name} sees {engine.pool_window} tokens at a time{slides}; a memory needs at least "
                f"{CHUNK_TOKENS + header + ANSWER_RESERVE}: one chunk ({CHUNK_TOKENS} tokens), the prompt's "
                f"{header}-token header, and {ANSWER_RESERVE} for the question and its answer",
                hint="no setting makes it fit: use a model with a longer window (docs/models.md lists families)",
            )
        pool_size = pool_size if pool_size is not None else min(DEFAULT_POOL_SIZE, window)
        if not CHUNK_TOKENS <= pool_size <= window:
            raise ModelError(
                f"a pool of {pool_size} tokens does not fit: it must hold one chunk ({CHUNK_TOKENS}) "
                f"and leave room for a question in the model's window ({engine.pool_window})",
                hint=f"choose a pool_size between {CHUNK_TOKENS} and {window}",
            )
        if write_context is None:
            write_context = min(DEFAULT_WRITE_CONTEXT, pool_size)
        if write_context < 0:
            raise ModelError(f"write_context must be >= 0, got {write_context}")
        write_scope = write_scope or DEFAULT_WRITE_SCOPE
        if write_scope not in WRITE_SCOPES:
            raise ModelError(f"write_scope must be one of {', '.join(WRITE_SCOPES)}, got {write_scope!r}")
        dtype = dtype or ("float16" if engine.dtype == torch.float32 else str(engine.dtype).removeprefix("torch."))
        pool = Pool.empty(engine.layers, engine.kv_heads, engine.head_dim, DTYPES[dtype], TAGS)
        memory = cls(pool_size, write_context, dtype, pool, lm=lm)
        memory.block_format = block_format or codec.DEFAULT_FORMAT
        memory.write_scope = write_scope
        codec.spec(memory.block_format)  # refuses an unknown format
        if seed is not None:
            memory.seed = seed
        return memory

    @classmethod
    def load(cls, version: str, tensors: dict[str, torch.Tensor], meta: dict, lm: LoadedModel | None,
             library: BlockSource | None, *, states: bool = True) -> FreeMemory:
        if meta.get("dtype") not in DTYPES:
            raise StoreError(f"version {version[:12]} has an unknown dtype {meta.get('dtype')!r}")
        try:
            tags = {name: tensors[name].to(torch.int64) for name in ("block", "row", "source", "chunk")}
            memory = cls(
                meta["pool_size"], meta["write_context"], meta["dtype"], index_pool(tags), meta["sources"],
                meta["blocks"], meta["seed"], meta["update_count"], version, has_states=False, lm=lm, library=library,
                carried={k: list(v) for k, v in meta.get("carried", {}).items()},
                block_format=meta.get("block_format", "float16"), write_scope=meta.get("write_scope", "pool"),
            )
            codec.spec(memory.block_format)
        except (KeyError, ValueError, TypeError) as err:
            raise StoreError(f"version {version[:12]} is damaged: {err}") from None
        if states:
            memory.load_states()
        return memory

    def load_states(self) -> None:
        """Gather the whole pool's keys and values from its blocks (to read it whole)."""
        if self.has_states:
            return
        keys, values = self._gather(torch.arange(len(self.pool)))
        self.pool, self.has_states = Pool(keys.contiguous(), values.contiguous(), self.pool.tags), True

    def _gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (L, Hkv, len, hd) of the pool tokens at `positions`, in that order,
        from the blocks in RAM or else through the library, reading only those rows."""
        engine = self.lm.engine
        tags = self.pool.tags
        block, row = tags["block"][positions], tags["row"][positions]
        shape = (len(positions), engine.layers, engine.kv_heads, engine.head_dim)
        keys = torch.empty(shape, dtype=DTYPES[self.dtype])  # (len, L, Hkv, hd)
        values = torch.empty_like(keys)
        for b in block.unique().tolist():
            where = torch.nonzero(block == b).flatten()
            where = where[torch.argsort(row[where])]
            rows = row[where]
            if b in self.ram_blocks:
                entry = self.ram_blocks[b]
                at = rows if "rows" not in entry else torch.searchsorted(entry["rows"], rows)
                got = {name: entry[name][at] for name in ("keys", "values")}
            elif b >= 0 and self.library is not None:
                got = self._stored_rows(self.blocks[b], rows)
            else:
                raise StoreError(f"the pool holds tokens of block {b}, which is neither in RAM nor stored")
            keys[where] = got["keys"].to(keys.dtype)
            values[where] = got["values"].to(keys.dtype)
        return keys.permute(1, 2, 0, 3), values.permute(1, 2, 0, 3)  # (L, Hkv, len, hd)

    def block_states(self, digest: str, found: dict | None) -> dict[str, torch.Tensor]:
        """A stored block's keys and values (T, L, Hkv, hd), checked as read (DamagedBlock), or
        an evicted block's, recomputed (or read from where they were cached)."""
        library = self.library
        try:
            return _decoded(lambda names: library.read_block_checked(digest, names), found, library, digest)
        except StoreError:
            if library.has_block(digest) or not library.is_evicted(digest):
                raise  # damaged, or missing: not evicted (eviction writes what it keeps first)
        return self._recomputed(digest)

    def _recomputed(self, digest: str) -> dict[str, torch.Tensor]:
        """An evicted block's keys and values: its tokens written again after the sink alone
        (the pool they were first written after is not kept), cached within `max_disk`."""
        cached = self.library.read_recomputed(digest)
        if cached is not None:
            tensors, meta = cached
            found = codec.of(meta)
            try:
                states = codec.decode(tensors, found) if all(name in tensors for name in codec.names(found)) else {}
            except codec.Undecodable:
                states = {}
            if states and all(bool(torch.isfinite(t).all()) for t in states.values()):
                return states  # else damaged: computed again below
        ids = self.library.read_block_ids(digest)
        if not ids:
            raise StoreError(f"evicted block {digest[:12]} keeps no token ids to recompute it from")
        new = self.lm.engine.encode(torch.tensor(ids, dtype=torch.int64), sink(self.lm)).to(DTYPES[self.dtype])
        keys, values = new.keys.permute(2, 0, 1, 3), new.values.permute(2, 0, 1, 3)  # (T, L, Hkv, hd)
        found = codec.block_codec(self.block_format, values)
        stored = codec.encode(keys, values, found)
        if self.max_disk is not None:
            self.library.write_recomputed(digest, stored, {"codec": found} if found else {}, self.max_disk)
        return codec.decode(stored, found)

    def _stored_rows(self, digest: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of a stored block's keys and values: float16 blocks read only those rows,
        quantized ones are decoded whole (their key scales span groups of rows); an evicted
        block's are recomputed."""
        if not self.library.has_block(digest) and self.library.is_evicted(digest):
            kept = self.library.read_kept(digest)
            if kept is not None and bool(torch.isin(rows, kept[0]).all()):  # the rows a pool held when evicted
                at = torch.searchsorted(kept[0], rows)
                states = codec.decode_rows(kept[1], kept[2], kept[0])
                return {name: t[at] for name, t in states.items()}
            return {name: t[rows] for name, t in self._recomputed(digest).items()}
        found = codec.of(self.library.block_meta(digest))
        if found is None:
            return self.library.read_block_rows(digest, rows.tolist(), ("keys", "values"))
        states = _decoded(lambda names: self.library.read_block_rows(digest, None, names), found, self.library, digest)
        return {name: t[rows] for name, t in states.items()}

    def _trim_ram(self) -> None:
        """Keep in RAM only the rows the pool still holds, so RAM stays about the pool's size:
        a block the pool holds none of leaves, one it holds under half of keeps those rows."""
        block, row = self.pool.tags["block"], self.pool.tags["row"]
        held, counts = block.unique(return_counts=True)
        counts = dict(zip(held.tolist(), counts.tolist(), strict=True))
        for b in list(self.ram_blocks):
            entry = self.ram_blocks[b]
            if b not in counts:
                del self.ram_blocks[b]
            elif counts[b] * 2 < len(entry["keys"]):
                rows = row[block == b].sort().values
                at = rows if "rows" not in entry else torch.searchsorted(entry["rows"], rows)
                self.ram_blocks[b] = {"rows": rows, "keys": entry["keys"][at], "values": entry["values"][at]}

    def recent(self, count: int) -> Pool:
        """The last `count` pool tokens with their keys and values (the write context)."""
        if self.has_states:
            return self.pool.tail(count)
        positions = torch.arange(max(0, len(self.pool) - count), len(self.pool))
        keys, values = self._gather(positions)
        return Pool(keys, values)

    def context_for(self, source: int) -> int:
        """The pool tokens the next chunk of `source` is written after: the last write_context
        of the pool, or with write_scope "document" of the pool's trailing run of that
        document's own tokens (none for its first chunk: it is written after the sink alone, so
        that read alone it is exactly the prompt with its text)."""
        if self.write_scope == "pool":
            return self.write_context
        tags = self.pool.tags["source"]
        other = torch.nonzero(tags != source).flatten()
        run = len(tags) - (int(other[-1]) + 1 if len(other) else 0)
        return min(self.write_context, run)

    def __len__(self) -> int:
        return len(self.pool)

    # -- writing -----------------------------------------------------------------------

    def write(self, ids: list[int], *, source: int, chunk: int, span: tuple[int, int] = (0, 0)) -> dict:
        """One update: encode the chunk after sink + recent memory, drop overflow, append."""
        engine = self.lm.engine
        context = sink(self.lm) + self.recent(self.context_for(source))  # (L, Hkv, s + w, hd)
        new = engine.encode(torch.tensor(ids, dtype=torch.int64), context).to(DTYPES[self.dtype])  # (L, Hkv, T, hd)
        count = len(ids)
        if self.keep_blocks:
            tag = -1 - len(self.pending)
        else:
            tag, self.scratch_tag = self.scratch_tag, self.scratch_tag - 1
        tags = {
            "source": torch.full((count,), source, dtype=torch.int64),
            "chunk": torch.full((count,), chunk, dtype=torch.int64),
            "row": torch.arange(count, dtype=torch.int64),
            "block": torch.full((count,), tag, dtype=torch.int64),
        }
        seed = self.next_seed()
        overflow = max(0, len(self.pool) + count - self.pool_size)
        kept = drop_uniform(len(self.pool), overflow, seed) if overflow else torch.arange(len(self.pool))
        self.pool = index_pool({name: torch.cat([t[kept], tags[name]]) for name, t in self.pool.tags.items()})
        self.has_states = False
        keys, values = new.keys.permute(2, 0, 1, 3), new.values.permute(2, 0, 1, 3)  # (T, L, Hkv, hd)
        found = codec.block_codec(self.block_format, values)
        stored = codec.encode(keys, values, found)
        # RAM holds what the block will read back as, so a memory continues alike in any process
        self.ram_blocks[tag] = codec.decode(stored, found)
        if overflow:
            self._trim_ram()
        if self.keep_blocks:
            meta = self.block_meta(source, chunk, span, count)
            # the ids keep the text, for retrieval and excerpts
            self.pending.append(({**stored, "ids": torch.tensor(ids, dtype=torch.int32)},
                                 {**meta, "codec": found} if found else meta))
        return self.log_update(source, chunk, count, overflow, seed)

    def replay(self, block: str, meta: dict, source: int) -> dict:
        """The update that wrote `block`, again: the same drops (its seed follows from the
        update number), its tokens appended; nothing is computed, the block is stored."""
        count = int(meta["tokens"])
        tags = {"source": torch.full((count,), source, dtype=torch.int64),
                "chunk": torch.full((count,), int(meta.get("chunk", 0)), dtype=torch.int64),
                "row": torch.arange(count, dtype=torch.int64),
                "block": torch.full((count,), len(self.blocks), dtype=torch.int64)}
        self.blocks.append(block)
        seed = self.next_seed()
        overflow = max(0, len(self.pool) + count - self.pool_size)
        kept = drop_uniform(len(self.pool), overflow, seed) if overflow else torch.arange(len(self.pool))
        self.pool = index_pool({name: torch.cat([t[kept], tags[name]]) for name, t in self.pool.tags.items()})
        self.has_states = False
        if overflow:
            self._trim_ram()
        return self.log_update(source, int(meta.get("chunk", 0)), count, overflow, seed)

    def settings(self) -> dict:
        return {**super().settings(), "block_format": self.block_format, "write_scope": self.write_scope}

    def use_block_format(self, name: str) -> None:
        codec.spec(name)
        self.block_format = name

    def settle(self, written: list[str]) -> None:
        block = self.pool.tags["block"]
        for k, digest in enumerate(written):
            block[block == -1 - k] = len(self.blocks)
            if -1 - k in self.ram_blocks:
                self.ram_blocks[len(self.blocks)] = self.ram_blocks.pop(-1 - k)
            self.blocks.append(digest)
        self.pending.clear()

    def _forked(self) -> dict:
        """The fork keeps no pending blocks: the pool's tokens of this memory's pending blocks
        get tags of their own, so that blocks the fork writes can never be mistaken for them."""
        ram, block, tag = dict(self.ram_blocks), self.pool.tags["block"].clone(), self.scratch_tag
        for k in range(len(self.pending)):
            block[block == -1 - k] = tag
            if -1 - k in ram:
                ram[tag] = ram.pop(-1 - k)
            tag -= 1
        pool = Pool(self.pool.keys, self.pool.values, {**self.pool.tags, "block": block})
        return {"carried": dict(self.carried), "ram_blocks": ram, "scratch_tag": tag, "pool": pool}

    def owner(self, digest: str, meta: dict, live: dict[str, int]) -> tuple[int | None, int]:
        """The document a stored block belongs to now, and its chunk index there: the revision
        that kept it, else the one that wrote it (by content hash for blocks written before
        blocks recorded their source's index; `live`: sha256 -> live source)."""
        if digest in self.carried:
            source, chunk = self.carried[digest]
            return source, chunk
        source = meta.get("source_index")
        if not isinstance(source, int) or not 0 <= source < len(self.sources) or \
                self.sources[source]["sha256"] != meta.get("source_sha256"):
            source = live.get(meta.get("source_sha256"))
        return source, meta.get("chunk", 0)

    def chunk_blocks(self, source: int) -> list[tuple[str, list[int]]]:
        if self.library is None or self.head is None or self.pending:
            return []
        idx = recall.index(self, self.lm.tokenizer)
        mine = sorted((c for c in idx.candidates if c.source == source), key=lambda c: c.chunk)
        return [(c.block, c.ids) for c in mine]

    def carry(self, old: int, new: int, kept: list[tuple[str, int, int]]) -> None:
        number = {digest: i for i, digest in enumerate(self.blocks)}
        tags = dict(self.pool.tags)
        source, chunk = tags["source"].clone(), tags["chunk"].clone()
        for digest, index, tokens in kept:
            rows = (tags["source"] == old) & (tags["block"] == number[digest])
            source[rows] = new
            chunk[rows] = index
            self.carried[digest] = [new, index]
            self.sources[new]["chunks"] += 1
            self.sources[new]["tokens"] += tokens
        tags.update(source=source, chunk=chunk)
        self.pool = Pool(self.pool.keys, self.pool.values, tags)
        self.forget({old})

    def forget(self, sources: set[int]) -> int:
        """Drop every token of these sources; returns how many were held."""
        drop = torch.isin(self.pool.tags["source"], torch.tensor(sorted(sources), dtype=torch.int64))
        self.pool = self.pool.select(torch.nonzero(~drop).flatten())
        for s in sources:
            self.sources[s]["forgotten"] = True
        self.dropped += int(drop.sum())
        return int(drop.sum())

    def version_record(self, op: str, message: str = "", **extra) -> tuple[dict[str, torch.Tensor], dict]:
        if self.pending:
            raise RuntimeError("settle pending blocks before recording a version")
        tags = self.pool.tags
        tensors = {name: tags[name].to(torch.int32) for name in ("block", "row", "source", "chunk")}
        carried = {"carried": self.carried} if self.carried else {}
        return tensors, {**self.ledger_meta(op, message, len(self)), "block_format": self.block_format,
                         "write_scope": self.write_scope, **carried, **extra}

    def prepare_reads(self) -> None:
        """Build the recall index now, so the next ask finds it ready."""
        recall.index(self, self.lm.tokenizer)

    # -- reading -----------------------------------------------------------------------

    def read(self, question: str, budget: int, sampling: Sampling) -> Reading:
        """Within a budget: the blocks most relevant to the question (stored ones, or the
        pending ones of a memory in RAM) after the sink; 0: the whole pool. The reading
        judges its answer against the text of the blocks read (grounding.py)."""
        lm = self.lm
        ids = torch.tensor(lm.prompt.question_ids(lm.tokenizer, question))
        info: dict = {}
        context, prefilled = None, None
        idx = recall.index(self, lm.tokenizer)
        read: list[recall.Candidate] = []
        if budget and (window := lm.engine.sliding_window):
            # sliding-window layers see only the last `window` positions: read what fits, so that
            # every layer sees all of it when the answer starts
            cap = max(1, window - len(lm.prompt.sink_ids(lm.tokenizer)) - len(ids))
            if cap < budget:
                info["read_cap"] = {"tokens": cap, "why": f"the model's sliding window of {window} tokens"}
                budget = cap
        if budget and len(idx):
            engine = lm.engine
            dtype, shape = DTYPES[self.dtype], (engine.layers, engine.kv_heads, engine.head_dim)
            scores = bm25_scores(idx.retriever, question, len(idx))  # once, for the shortlist or the plain read
            shortlisted = recall.shortlist(idx, question, budget, scores=scores)
            if len(shortlisted) > 1:  # the model chooses the block that best predicts the question
                loaded, damaged = recall.load_each(shortlisted, dtype, shape)
                read, pool = [], Pool.empty(*shape, dtype)
                if loaded:
                    start, end = lm.prompt.question_span(lm.tokenizer, question)
                    fits, resume = engine.judge(ids, [sink(lm) + p for _, p in loaded], start, end)
                    for (candidate, _), fit in zip(loaded, fits, strict=True):
                        candidate.fit = fit
                    best = recall.choose([c for c, _ in loaded])
                    read, pool = [loaded[best][0]], loaded[best][1]
                    prefilled = resume(best, sampling.max_new_tokens)
                info["judged"] = len(shortlisted)
            else:
                read = recall.select(idx, question, budget, scores=scores)
                pool, damaged = recall.read(read, dtype, shape)
            context = sink(lm) + pool
            read = [c for c in read if c not in damaged]
            damaged = [{"source": self.sources[c.source]["name"], "chunk": c.chunk, "block": c.block}
                       for c in damaged] + [{"source": None, "chunk": None, "block": b} for b in idx.damaged]
            if damaged:
                info["damaged"] = damaged
            info["read_tokens"] = sum(c.tokens for c in read)
            info["sources"] = recall.cited(self, read, lm.tokenizer)
            if self.library is not None:
                self.library.note_reads([c.block for c in read if not c.block.startswith("pending-")])
        if context is None:
            held = {self.blocks[b] if b >= 0 else f"pending-{-1 - b}"
                    for b in self.pool.tags["block"].unique().tolist()}
            context = self.context()
            info["read_tokens"] = len(self)
            read = [c for c in idx.candidates if c.block in held]
        texts = [lm.tokenizer.decode(c.ids, skip_special_tokens=True) for c in read]
        # a whole pool whose blocks keep no text (written before blocks kept their ids) cannot be judged
        judged = bool(read) or "sources" in info
        verdict = grounding.judge(question, texts, rarity(idx.retriever)) if judged else None
        tokens = lm.engine.generate(ids, context, stop_ids=lm.stop_ids(), draft_from=[c.ids for c in read],
                                    prefilled=prefilled, **vars(sampling))
        return Reading(tokens, info, verdict)

    def context(self) -> Pool:
        self.load_states()
        return sink(self.lm) + self.pool  # (L, Hkv, s + n, hd)

    # -- counts ------------------------------------------------------------------------

    def held_per_source(self) -> list[int]:
        return torch.bincount(self.pool.tags["source"], minlength=len(self.sources)).tolist()

    def long_term_per_source(self) -> list[int]:
        """Tokens per document in the blocks still stored (pool and long-term tier) beyond
        what the pool holds."""
        held = self.held_per_source()
        if self.library is None:
            return [0] * len(self.sources)
        by_sha = {s["sha256"]: i for i, s in enumerate(self.sources) if not s.get("forgotten")}
        stored = [0] * len(self.sources)
        for digest in self.blocks:
            if self.library.has_block(digest) or self.library.is_evicted(digest):
                meta = self.library.block_meta(digest)
                i, _ = self.owner(digest, meta, by_sha)
                if i is not None and not self.sources[i].get("forgotten"):
                    stored[i] += int(meta.get("tokens", 0))
        return [max(0, s - h) for s, h in zip(stored, held, strict=True)]

    # -- stored versions ---------------------------------------------------------------

    @classmethod
    def pool_keys(cls, tensors: dict[str, torch.Tensor], meta: dict) -> dict[tuple, tuple[str, str]]:
        blocks, sources = meta["blocks"], meta["sources"]
        out = {}
        for blk, row, src in zip(tensors["block"].tolist(), tensors["row"].tolist(), tensors["source"].tolist(),
                                 strict=True):
            out[(blocks[blk], row)] = (sources[src]["sha256"], sources[src]["name"])
        return out

    @classmethod
    def without_blocks(cls, tensors: dict[str, torch.Tensor], meta: dict,
                       gone: list[int]) -> tuple[dict[str, torch.Tensor], dict]:
        count = len(meta.get("blocks", []))
        kept = [i for i in range(count) if i not in set(gone)]
        remap = torch.full((count,), -1, dtype=torch.int64)
        remap[kept] = torch.arange(len(kept))
        block = tensors["block"].to(torch.int64)
        keep = remap[block] >= 0 if count else torch.ones(len(block), dtype=torch.bool)
        out = {k: t[keep] for k, t in tensors.items()}
        out["block"] = remap[block[keep]].to(torch.int32)
        if "carried" not in meta:
            return out, {}
        lost = {meta["blocks"][i] for i in gone}
        return out, {"carried": {d: v for d, v in meta["carried"].items() if d not in lost}}

    @classmethod
    def held_rows(cls, tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, set[int]]:
        """The rows of each block a stored version's pool holds."""
        blocks, out = meta.get("blocks", []), {}
        for blk, row in zip(tensors["block"].tolist(), tensors["row"].tolist(), strict=True):
            out.setdefault(blocks[blk], set()).add(row)
        return out

    @classmethod
    def held_blocks(cls, tensors: dict[str, torch.Tensor], meta: dict) -> set[str]:
        blocks = meta.get("blocks", [])
        return {blocks[i] for i in tensors["block"].unique().tolist() if i >= 0}

    @classmethod
    def block_origins(cls, tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, dict]:
        """The blocks this version's commit wrote are the last of its list, one per update of
        its log, in order; the pool's rows tell the document and chunk of the blocks it holds
        (for a chunk a later revision kept, that revision's: `held`)."""
        blocks, sources, updates = meta.get("blocks", []), meta.get("sources", []), meta.get("updates", [])
        out: dict[str, dict] = {}
        for blk, src, chunk in zip(tensors["block"].tolist(), tensors["source"].tolist(), tensors["chunk"].tolist(),
                                   strict=True):
            if 0 <= blk < len(blocks) and 0 <= src < len(sources) and blocks[blk] not in out:
                held = {"source": sources[src], "chunk": chunk}
                out[blocks[blk]] = {**held, "tokens": None, "update": None, "held": held}
        written = blocks[len(blocks) - len(updates):] if len(updates) <= len(blocks) else []
        for blk, update in zip(written, updates, strict=False):
            if 0 <= update.get("source", -1) < len(sources):
                out[blk] = {"source": sources[update["source"]], "chunk": update.get("chunk", 0),
                            "tokens": update.get("tokens"), "update": update.get("update"),
                            "held": out.get(blk, {}).get("held")}
        return out

    # -- evaluation --------------------------------------------------------------------

    def nll(self, ids: list[int]) -> tuple[float, int]:
        x = torch.tensor(ids)
        logits = self.lm.engine.forward(x, self.context())
        return float(F.cross_entropy(logits[:-1].float().cpu(), x[1:], reduction="sum")), len(ids) - 1

    def layer_stats(self) -> list[dict]:
        self.load_states()
        keys, values = self.pool.keys.float(), self.pool.values.float()  # (L, Hkv, n, hd)
        out = []
        for i in range(keys.shape[0]):
            k = keys[i].norm(dim=-1)  # (Hkv, n)
            v = values[i].norm(dim=-1)
            out.append({"layer": i, "mean_norm": float(v.mean()), "max_norm": float(v.max()),
                        "key_mean_norm": float(k.mean()), "key_max_norm": float(k.max())})
        return out

    def stored_form(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The pool as one block's tensors and one version's tensors (for disk estimates)."""
        self.load_states()
        pool = self.pool
        keys, values = pool.keys.permute(2, 0, 1, 3), pool.values.permute(2, 0, 1, 3)  # (n, L, Hkv, hd)
        block = codec.encode(keys.contiguous(), values.contiguous(), codec.block_codec(self.block_format, values))
        return block, {name: pool.tags[name].to(torch.int32) for name in ("block", "row", "source", "chunk")}

    @classmethod
    def prompt_answer(cls, lm: LoadedModel, texts: list[str], question: str, sampling: Sampling) -> Iterator[int]:
        ids = lm.prompt.sink_ids(lm.tokenizer)
        for text in texts:
            ids += [i for c in chunk_document(text, lm.tokenizer, CHUNK_TOKENS) for i in c.ids]
        ids += lm.prompt.question_ids(lm.tokenizer, question)
        return lm.engine.generate(torch.tensor(ids), None, stop_ids=lm.stop_ids(), **vars(sampling))

    @classmethod
    def baselines(cls) -> frozenset[str]:
        return frozenset({"pool", "prompt", "bm25", "closed-book"})


def _decoded(read: Callable[[tuple[str, ...]], dict[str, torch.Tensor]], found: dict | None, library: BlockSource,
             digest: str) -> dict[str, torch.Tensor]:
    """A block's keys and values from the tensors `read` returns of those its codec names; a
    block that does not decode (or names a codec this version does not know) is damaged."""
    try:
        return codec.decode(read(codec.names(found)), found)
    except codec.Undecodable as err:
        raise StoreError(f"memory {library.name!r} is damaged: block {digest[:12]} cannot be decoded: {err}",
                         hint="see memllm verify") from None
