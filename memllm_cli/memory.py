"""A memory in RAM: the token pool, where each token came from, and the update log.

The MemoryLLM update rule, training-free: an update writes every token of one chunk (at
most 512), computed by one forward pass after the pinned sink and the most recent
`write_context` pool tokens. When the pool would exceed `pool_size` tokens, as many old
tokens as overflow are dropped uniformly at random first (the same tokens in every
layer), from a generator whose seed is recorded with the update, so that any sequence of
updates can be replayed bit for bit. Kept tokens keep their order; new ones go at the end.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch

from .engine import MemoryModel, Pool, drop_uniform
from .errors import StoreError

TAGS = ("source", "chunk", "offset")  # per token: source id, chunk index, token offset in the chunk
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Memory:
    pool_size: int  # N: tokens per layer at most
    write_context: int  # pool tokens a chunk is written after
    dtype: str  # storage dtype of keys and values
    pool: Pool
    sources: list[dict] = field(default_factory=list)  # id = index
    updates: list[dict] = field(default_factory=list)
    seed: int = field(default_factory=lambda: secrets.randbits(62))

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

    def add_source(self, name: str, sha256: str) -> int:
        self.sources.append({
            "name": name, "sha256": sha256, "chunks": 0, "tokens": 0,
            "ingested": datetime.now(UTC).isoformat(timespec="seconds"),
        })
        return len(self.sources) - 1

    def has_content(self, sha256: str) -> bool:
        return any(s["sha256"] == sha256 for s in self.sources)

    def write(self, engine: MemoryModel, sink: Pool, ids: list[int], *, source: int, chunk: int) -> dict:
        """One update: encode the chunk after sink + recent memory, drop overflow, append."""
        context = sink + self.pool.tail(self.write_context)  # (L, Hkv, s + w, hd)
        new = engine.encode(torch.tensor(ids, dtype=torch.int64), context)  # (L, Hkv, T, hd)
        count = len(ids)
        new.tags = {
            "source": torch.full((count,), source, dtype=torch.int64),
            "chunk": torch.full((count,), chunk, dtype=torch.int64),
            "offset": torch.arange(count, dtype=torch.int64),
        }
        seed = (self.seed + len(self.updates) * 0x9E3779B97F4A7C15) % (1 << 62)
        overflow = max(0, len(self.pool) + count - self.pool_size)
        if overflow:
            self.pool = self.pool.select(drop_uniform(len(self.pool), overflow, seed))  # (L, Hkv, N - T, hd)
        self.pool = self.pool + new.to(DTYPES[self.dtype])  # (L, Hkv, <= N, hd)
        self.sources[source]["chunks"] += 1
        self.sources[source]["tokens"] += count
        update = {"source": source, "chunk": chunk, "tokens": count, "dropped": overflow, "seed": seed}
        self.updates.append(update)
        return update

    # -- reading ---------------------------------------------------------------------

    def context(self, sink: Pool) -> Pool:
        return sink + self.pool  # (L, Hkv, s + n, hd)

    def held_per_source(self) -> list[int]:
        counts = torch.bincount(self.pool.tags["source"], minlength=len(self.sources))
        return counts.tolist()

    # -- persistence -----------------------------------------------------------------

    def record(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"keys": self.pool.keys, "values": self.pool.values}
        tensors.update({f"tag.{name}": tag for name, tag in self.pool.tags.items()})
        meta = {
            "pool_size": self.pool_size, "write_context": self.write_context, "dtype": self.dtype,
            "seed": self.seed, "sources": self.sources, "updates": self.updates,
        }
        return tensors, meta

    @classmethod
    def from_record(cls, tensors: dict[str, torch.Tensor], meta: dict) -> Memory:
        try:
            pool = Pool(
                tensors["keys"], tensors["values"], {name: tensors[f"tag.{name}"] for name in TAGS}
            )
            return cls(
                meta["pool_size"], meta["write_context"], meta["dtype"], pool,
                meta["sources"], meta["updates"], meta["seed"],
            )
        except (KeyError, ValueError, TypeError) as err:
            raise StoreError(f"the stored pool is damaged: {err}") from None
