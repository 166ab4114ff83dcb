"""Store formats, migrated forward in order. Each migration takes a memory from format
N to N + 1 and runs under the memory's write lock; its name is recorded in the journal.

    1 -> 2  one pool file rewritten on every commit -> content-addressed blocks and versions
"""

from __future__ import annotations

import torch

from .memory import now
from .store import FORMAT, Store


def pool_file_to_blocks(store: Store, name: str) -> None:
    """Format 1 kept the whole pool in pool.safetensors: keys and values (L, Hkv, n, hd) and
    per-token source, chunk and offset. Each (source, chunk) group becomes one block (the
    tokens of that chunk still held), and the pool becomes the first version."""
    info = store.info(name)
    legacy = store.read_legacy_pool(name)
    if legacy is not None:
        tensors, meta = legacy
        source, chunk = tensors["tag.source"], tensors["tag.chunk"]
        keys = tensors["keys"].permute(2, 0, 1, 3)  # (n, L, Hkv, hd)
        values = tensors["values"].permute(2, 0, 1, 3)
        block = torch.empty_like(source)
        row = torch.empty_like(source)
        blocks: list[str] = []
        groups = torch.stack([source, chunk], dim=1).unique(dim=0)
        for s, c in groups.tolist():
            positions = torch.nonzero((source == s) & (chunk == c)).flatten()
            src = meta["sources"][s]
            digest = store.write_block(
                name,
                {"keys": keys[positions], "values": values[positions]},
                {"source": src["name"], "source_sha256": src["sha256"], "chunk": c, "start": 0, "end": 0,
                 "tokens": len(positions), "update": -1},
            )
            block[positions] = len(blocks)
            row[positions] = torch.arange(len(positions))
            blocks.append(digest)
        version = store.write_version(
            name,
            {"block": block.to(torch.int32), "row": row.to(torch.int32),
             "source": source.to(torch.int32), "chunk": chunk.to(torch.int32)},
            {"parent": None, "op": "migrate", "time": now(), "message": "from a format 1 pool file",
             "pool_size": meta["pool_size"], "write_context": meta["write_context"], "dtype": meta["dtype"],
             "seed": meta["seed"], "update_count": len(meta["updates"]), "blocks": blocks,
             "sources": meta["sources"], "updates": meta["updates"],
             "stats": {"tokens": len(source), "added": 0, "dropped": 0}},
        )
        store.set_head(name, version)
    store.set_format(name, {**info, "format": 2})
    store.remove_legacy_pool(name)


MIGRATIONS = [(1, "0001-pool-file-to-blocks", pool_file_to_blocks)]
assert [n for n, _, _ in MIGRATIONS] == list(range(1, FORMAT))


def migrate(store: Store, name: str) -> list[str]:
    """Run every migration the memory needs, in order; returns their names."""
    done = []
    for number, title, step in MIGRATIONS:
        if store.info(name)["format"] == number:
            step(store, name)
            store.log_operation(name, {"time": now(), "op": "migrate", "migration": title})
            done.append(title)
    return done
