"""A memory in RAM: the token pool, where each token came from, and the update log.

The MemoryLLM update rule, training-free: an update writes every token of one chunk (at
most 512), computed by one forward pass after the pinned sink and the most recent
`write_context` pool tokens. When the pool would exceed `pool_size` tokens, as many old
tokens as overflow are dropped uniformly at random first (the same tokens in every
layer), from a generator whose seed is recorded with the update, so that any sequence of
updates can be replayed bit for bit. Kept tokens keep their order; new ones go at the end.

On disk (store.py) each update's tokens become one immutable *block*, and the pool is a
*version*: the list of (block, row) pairs it holds, in order. Tokens written since the
last commit point at pending blocks (negative block indices) until the commit writes them.
"""

from __future__ import annotations

import copy
import dataclasses
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch

from .engine import MemoryModel, Pool, drop_uniform
from .errors import StoreError

# Per token: source id, chunk index, row in its block (= offset in the chunk), block index.
TAGS = ("source", "chunk", "row", "block")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Ledger:
    """What every kind of memory keeps besides its tensors: the documents written, the
    blocks stored, the updates since the last commit, the seed every drop derives from."""

    def add_source(self, name: str, sha256: str) -> int:
        self.sources.append({"name": name, "sha256": sha256, "chunks": 0, "tokens": 0, "ingested": now()})
        return len(self.sources) - 1

    def has_content(self, sha256: str) -> bool:
        return any(s["sha256"] == sha256 and not s.get("forgotten") for s in self.sources)

    def next_seed(self) -> int:
        """The seed of the next update's drops, derived from the memory's seed and the update
        number, so that any sequence of updates can be replayed bit for bit."""
        return (self.seed + self.update_count * 0x9E3779B97F4A7C15) % (1 << 62)

    def log_update(self, source: int, chunk: int, tokens: int, dropped: int, seed: int) -> dict:
        update = {"update": self.update_count, "source": source, "chunk": chunk, "tokens": tokens,
                  "dropped": dropped, "seed": seed}
        self.update_count += 1
        self.updates.append(update)
        self.dropped += dropped
        src = self.sources[source]
        src["chunks"] += 1
        src["tokens"] += tokens
        return update

    def block_meta(self, source: int, chunk: int, span: tuple[int, int], tokens: int) -> dict:
        src = self.sources[source]
        return {"source": src["name"], "source_sha256": src["sha256"], "source_index": source, "chunk": chunk,
                "start": span[0], "end": span[1], "tokens": tokens, "update": self.update_count}

    def fork(self):
        """An independent copy that is never stored (evaluation). Tensors are shared: every
        update replaces them rather than writing into them."""
        return dataclasses.replace(
            self, sources=copy.deepcopy(self.sources), blocks=list(self.blocks), pending=[],
            updates=list(self.updates), keep_blocks=False, **self._forked(),
        )

    def _forked(self) -> dict:
        return {}

    def committed(self, version: str) -> None:
        self.head = version
        self.updates = []
        self.dropped = 0

    def ledger_meta(self, op: str, message: str, tokens: int) -> dict:
        return {
            "parent": self.head, "op": op, "time": now(), "message": message,
            "pool_size": self.pool_size, "write_context": self.write_context, "dtype": self.dtype,
            "seed": self.seed, "update_count": self.update_count,
            "blocks": self.blocks, "sources": self.sources, "updates": self.updates,
            "stats": {"tokens": tokens, "added": sum(u["tokens"] for u in self.updates), "dropped": self.dropped},
        }


@dataclass
class Memory(Ledger):
    pool_size: int  # N: tokens per layer at most
    write_context: int  # pool tokens a chunk is written after
    dtype: str  # storage dtype of keys and values
    pool: Pool
    sources: list[dict] = field(default_factory=list)  # id = index
    blocks: list[str] = field(default_factory=list)  # committed block ids; tag "block" indexes it
    seed: int = field(default_factory=lambda: secrets.randbits(62))
    update_count: int = 0  # updates since the memory was created
    head: str | None = None  # the version this state was loaded from or last committed as
    pending: list[tuple[dict, dict]] = field(default_factory=list)  # blocks not yet written
    updates: list[dict] = field(default_factory=list)  # updates since the last commit
    dropped: int = 0  # tokens dropped since the last commit
    keep_blocks: bool = True  # False for memories that are never stored (evaluation): no pending copies
    has_states: bool = True  # False when loaded as an index only (status, diff, forget, reading within a budget)

    @classmethod
    def empty(cls, engine: MemoryModel, *, pool_size: int, write_context: int, dtype: str, seed=None) -> Memory:
        pool = Pool.empty(engine.layers, engine.kv_heads, engine.head_dim, DTYPES[dtype], TAGS)
        memory = cls(pool_size, write_context, dtype, pool)
        if seed is not None:
            memory.seed = seed
        return memory

    def __len__(self) -> int:
        return len(self.pool)

    # -- writing ---------------------------------------------------------------------

    def write(self, engine: MemoryModel, sink: Pool, ids: list[int], *, source: int, chunk: int,
              span: tuple[int, int] = (0, 0)) -> dict:
        """One update: encode the chunk after sink + recent memory, drop overflow, append."""
        context = sink + self.pool.tail(self.write_context)  # (L, Hkv, s + w, hd)
        new = engine.encode(torch.tensor(ids, dtype=torch.int64), context).to(DTYPES[self.dtype])  # (L, Hkv, T, hd)
        count = len(ids)
        new.tags = {
            "source": torch.full((count,), source, dtype=torch.int64),
            "chunk": torch.full((count,), chunk, dtype=torch.int64),
            "row": torch.arange(count, dtype=torch.int64),
            "block": torch.full((count,), -1 - len(self.pending), dtype=torch.int64),
        }
        seed = self.next_seed()
        overflow = max(0, len(self.pool) + count - self.pool_size)
        if overflow:
            self.pool = self.pool.select(drop_uniform(len(self.pool), overflow, seed))  # (L, Hkv, N - T, hd)
        self.pool = self.pool + new  # (L, Hkv, <= N, hd)
        if self.keep_blocks:
            states = {"keys": new.keys.permute(2, 0, 1, 3), "values": new.values.permute(2, 0, 1, 3),  # (T, L, Hkv, hd)
                      "ids": torch.tensor(ids, dtype=torch.int32)}  # (T,): the text, for retrieval and excerpts
            self.pending.append((states, self.block_meta(source, chunk, span, count)))
        return self.log_update(source, chunk, count, overflow, seed)

    def settle(self, written: list[str]) -> None:
        """The pending blocks were stored under these ids: point their tokens at them."""
        block = self.pool.tags["block"]
        for k, digest in enumerate(written):
            block[block == -1 - k] = len(self.blocks)
            self.blocks.append(digest)
        self.pending.clear()

    def forget(self, sources: set[int]) -> int:
        """Drop every token of these sources; returns how many were held."""
        drop = torch.isin(self.pool.tags["source"], torch.tensor(sorted(sources), dtype=torch.int64))
        self.pool = self.pool.select(torch.nonzero(~drop).flatten())
        for s in sources:
            self.sources[s]["forgotten"] = True
        self.dropped += int(drop.sum())
        return int(drop.sum())

    # -- reading ---------------------------------------------------------------------

    def context(self, sink: Pool) -> Pool:
        return sink + self.pool  # (L, Hkv, s + n, hd)

    def held_per_source(self) -> list[int]:
        return torch.bincount(self.pool.tags["source"], minlength=len(self.sources)).tolist()

    # -- versions --------------------------------------------------------------------

    def version_record(self, op: str, message: str = "", **extra) -> tuple[dict[str, torch.Tensor], dict]:
        if self.pending:
            raise RuntimeError("settle pending blocks before recording a version")
        tags = self.pool.tags
        tensors = {name: tags[name].to(torch.int32) for name in ("block", "row", "source", "chunk")}
        return tensors, {**self.ledger_meta(op, message, len(self)), **extra}

    @classmethod
    def from_version(cls, version: str, tensors: dict[str, torch.Tensor], meta: dict, states: Pool | None) -> Memory:
        """A memory from a stored version; `states` holds its keys and values (None: index only)."""
        try:
            tags = {name: tensors[name].to(torch.int64) for name in ("block", "row", "source", "chunk")}
            loaded = states is not None
            if states is None:
                empty = torch.empty(0, 0, len(tags["block"]), 0)
                states = Pool(empty, empty)
            pool = Pool(states.keys, states.values, tags)
            return cls(
                meta["pool_size"], meta["write_context"], meta["dtype"], pool, meta["sources"], meta["blocks"],
                meta["seed"], meta["update_count"], version, has_states=loaded,
            )
        except (KeyError, ValueError, TypeError) as err:
            raise StoreError(f"version {version[:12]} is damaged: {err}") from None
