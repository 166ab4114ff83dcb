"""A pool of stored tokens: pre-rotary keys and values per layer, with per-token tags, and
the MemoryLLM drop rule.

Legend for the shape comments:
    L    decoder layers                 Hkv  key/value heads        hd  head dim
    n    tokens in a pool
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Pool:
    """Stored tokens: pre-rotary keys and values per layer, plus per-token tags.

    Tags (provenance such as source id, chunk id, offset) are carried through every
    selection and concatenation untouched; the engine never reads them.
    """

    keys: torch.Tensor  # (L, Hkv, n, hd)
    values: torch.Tensor  # (L, Hkv, n, hd)
    tags: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (n,) int64

    def __post_init__(self) -> None:
        n = self.keys.shape[2]
        if self.values.shape != self.keys.shape:
            raise ValueError(f"keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)} differ")
        for name, tag in self.tags.items():
            if tag.shape != (n,):
                raise ValueError(f"tag {name!r} has shape {tuple(tag.shape)}, expected ({n},)")

    def __len__(self) -> int:
        return self.keys.shape[2]

    @classmethod
    def empty(cls, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, tag_names=()) -> Pool:
        kv = torch.empty(layers, kv_heads, 0, head_dim, dtype=dtype)
        return cls(kv, kv.clone(), {name: torch.empty(0, dtype=torch.int64) for name in tag_names})

    def select(self, index: torch.Tensor) -> Pool:
        """The tokens at `index` (1-D, int64), in that order."""
        return Pool(
            self.keys.index_select(2, index),  # (L, Hkv, len(index), hd)
            self.values.index_select(2, index),
            {name: tag.index_select(0, index) for name, tag in self.tags.items()},
        )

    def tail(self, count: int) -> Pool:
        """The last `count` tokens (all of them if the pool is shorter)."""
        start = max(0, len(self) - count)
        return Pool(
            self.keys[:, :, start:],
            self.values[:, :, start:],
            {name: tag[start:] for name, tag in self.tags.items()},
        )

    def __add__(self, other: Pool) -> Pool:
        """Concatenate along the token axis; tags missing on one side are filled with -1."""
        names = dict.fromkeys([*self.tags, *other.tags])

        def tag(pool: Pool, name: str) -> torch.Tensor:
            return pool.tags.get(name, torch.full((len(pool),), -1, dtype=torch.int64))

        dtype = self.keys.dtype
        return Pool(
            torch.cat([self.keys, other.keys.to(dtype)], dim=2),  # (L, Hkv, n1+n2, hd)
            torch.cat([self.values, other.values.to(dtype)], dim=2),
            {name: torch.cat([tag(self, name), tag(other, name)]) for name in names},
        )

    def to(self, dtype: torch.dtype) -> Pool:
        return Pool(self.keys.to(dtype), self.values.to(dtype), dict(self.tags))


def drop_uniform(n: int, drop: int, seed: int) -> torch.Tensor:
    """Indices of the n - drop tokens kept when `drop` of n are dropped uniformly at random.

    The MemoryLLM rule: `sort(randperm(n)[: n - drop])` from a generator seeded with `seed`,
    so kept tokens keep their order and any update can be replayed exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[: n - drop].sort().values  # (n - drop,)
