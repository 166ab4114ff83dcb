"""Store formats, migrated forward in order. Each migration takes a memory from format
N to N + 1 and runs under the memory's write lock; its name is recorded in the journal.

    1 -> 2  one pool file rewritten on every commit -> content-addressed blocks and versions
    2 -> 3  blocks may store quantized keys and values (compact blocks); every format 2 block
            is a float16 block of format 3, so nothing is rewritten: the number only makes an
            older memllm refuse a memory it could not read
"""

from __future__ import annotations

import torch

from ..clock import now
from .repo import FORMAT, Repo


def pool_file_to_blocks(repo: Repo) -> None:
    """Format 1 kept the whole pool in pool.safetensors: keys and values (L, Hkv, n, hd) and
    per-token source, chunk and offset. Each (source, chunk) group becomes one block (the
    tokens of that chunk still held), and the pool becomes the first version."""
    info = repo.info()
    legacy = repo.read_legacy_pool()
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
            digest = repo.write_block(
                {"keys": keys[positions], "values": values[positions]},
                {"source": src["name"], "source_sha256": src["sha256"], "chunk": c, "start": 0, "end": 0,
                 "tokens": len(positions), "update": -1},
            )
            block[positions] = len(blocks)
            row[positions] = torch.arange(len(positions))
            blocks.append(digest)
        version = repo.write_version(
            {"block": block.to(torch.int32), "row": row.to(torch.int32),
             "source": source.to(torch.int32), "chunk": chunk.to(torch.int32)},
            {"parent": None, "op": "migrate", "time": now(), "message": "from a format 1 pool file",
             "pool_size": meta["pool_size"], "write_context": meta["write_context"], "dtype": meta["dtype"],
             "seed": meta["seed"], "update_count": len(meta["updates"]), "blocks": blocks,
             "sources": meta["sources"], "updates": meta["updates"],
             "stats": {"tokens": len(source), "added": 0, "dropped": 0}},
        )
        repo.set_head(version)
    repo.set_format(info, 2)
    repo.remove_legacy_pool()


def block_formats(repo: Repo) -> None:
    repo.set_format(repo.info(), 3)


MIGRATIONS = [(1, "0001-pool-file-to-blocks", pool_file_to_blocks), (2, "0002-block-formats", block_formats)]
assert [n for n, _, _ in MIGRATIONS] == list(range(1, FORMAT))


def migrate(repo: Repo) -> list[str]:
    """Run every migration the memory needs, in order; returns their names."""
    done = []
    for number, title, step in MIGRATIONS:
        if repo.info()["format"] == number:
            step(repo)
            repo.log_operation({"time": now(), "op": "migrate", "migration": title})
            done.append(title)
    return done
