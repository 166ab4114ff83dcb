"""The disk budget (`max_disk`): a memory that would take more keeps the token ids of its
least recently read long-term blocks and drops their keys and values, which are recomputed
when a question needs them (memory/free.py, `block_states`).

What never goes: the rows a pool holds (HEAD's and each snapshot's: writing and reading the
whole pool need them as written), the versions, the journal and what eviction leaves of a
block (its ids and metadata: about 1% of it). A block the pool holds a few rows of keeps just
those rows, exactly (trimmed, after every other block is evicted). So a budget below what
those take is met as far as it can be, and the result says by how much it was missed.
"""

from __future__ import annotations

import logging

from .. import memory
from ..errors import StoreError
from ..memory import codec

log = logging.getLogger("memllm")

ROOM = 0.1  # of the budget freed below it when evicting: room for the blocks answers recompute


def fit(repo, max_disk: int) -> dict:
    """Over `max_disk` bytes, evict until the memory takes at most (1 - ROOM) of it: cached
    recomputed blocks and stored ones alike, least recently used first (read by an answer,
    else written). Hold the memory's lock."""
    used = repo.disk_bytes()
    report = {"max_disk": max_disk, "disk_bytes": used, "evicted_blocks": 0, "dropped_recomputed": 0,
              "bytes_freed": 0}
    if used <= max_disk:
        return report
    head = repo.head()
    if head is None:
        return report
    held: dict[str, set[int]] = {}  # block -> the rows HEAD's and the snapshots' pools hold
    for version in {head, *repo.tags().values()}:
        tensors, meta = repo.read_version(version)
        kind = memory.for_version(meta)
        if not kind.recomputes:
            report["note"] = f"a {kind.kind} memory cannot recompute blocks: nothing is evicted"
            return report
        for block, rows in kind.held_rows(tensors, meta).items():
            held.setdefault(block, set()).update(rows)
    pinned = set(held)
    last = repo.last_reads()

    def used_at(block: str) -> float:
        return max(last.get(block, 0.0), repo.block_time(block))

    recomputed = repo.recomputed()
    stored = [b for b in repo.blocks() if b not in pinned]
    order = sorted([(used_at(b), 0, b) for b in recomputed] + [(used_at(b), 1, b) for b in stored])
    freed, target = 0, int(max_disk * (1 - ROOM))
    for _, is_block, block in order:
        if used - freed <= target:
            break
        if is_block:
            try:
                freed += repo.evict_block(block)
            except (StoreError, OSError) as err:  # a block that cannot be evicted stays, the rest go
                log.warning("block %s is not evicted: %s", block[:12], err)
                continue
            report["evicted_blocks"] += 1
        else:
            freed += repo.drop_recomputed(block)
            report["dropped_recomputed"] += 1
    # Still over: the pool's blocks keep only the rows a pool holds (they read back exactly),
    # those holding the fewest of their rows first.
    stored = [b for b in repo.blocks() if b in pinned]
    tokens = {b: int(repo.block_meta(b).get("tokens", 0)) for b in stored}
    for block in sorted(stored, key=lambda b: len(held[b]) / max(1, tokens[b])):
        if used - freed <= target or 2 * len(held[block]) > tokens[block]:
            break
        try:
            freed += repo.evict_block(block, keep_rows=sorted(held[block]), keep=codec.kept_rows)
        except (StoreError, OSError) as err:
            log.warning("block %s is not trimmed: %s", block[:12], err)
            continue
        report["trimmed_blocks"] = report.get("trimmed_blocks", 0) + 1
    kept = set(repo.blocks()) | set(repo.evicted())
    repo.keep_reads({b: t for b, t in last.items() if b in kept})
    report["bytes_freed"] = freed
    report["disk_bytes"] = repo.disk_bytes()
    if report["disk_bytes"] > max_disk:
        report["note"] = (f"the rows the pool holds, the history and what evicted blocks keep take "
                          f"{report['disk_bytes']} bytes, over the budget of {max_disk}")
    return report
