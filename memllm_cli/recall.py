"""Reading what a question needs: the long-term tier, and retrieval within a token budget.

The pool holds the N most recent-ish tokens (MemoryLLM's random drops), but no token is
lost when the pool drops it: every update's tokens stay in their block in the store (the
*long-term tier*) until `forget` or `gc`. Reading the whole pool for every question drowns
a small model (one NQ passage in the prompt: 13 of 16 right; all 16: 3 of 16) and costs
time linear in N; so `ask` reads at most `read_budget` tokens: the blocks, from the pool
and the long-term tier alike, that BM25 ranks highest for the question over the text that
wrote them (each block keeps its token ids), placed after the sink in the order they were
written, at fresh positions (keys are stored before rotary, see engine.py).

The blocks are read through memory maps, one at a time, so RAM at ask time depends on the
budget, not on how much was ingested.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .engine import Pool


@dataclass
class Candidate:
    """One update's tokens, wherever they are (a stored block, or a pending one in RAM)."""

    block: str  # block id, or "pending-K"
    update: int
    source: int  # index into the memory's sources
    chunk: int
    ids: list[int]
    load: Callable[[], dict]  # -> {"keys", "values"}: (T, L, Hkv, hd) token-major
    score: float = 0.0

    @property
    def tokens(self) -> int:
        return len(self.ids)


def candidates(memory, store=None, name: str | None = None) -> list[Candidate]:
    """Every block of the memory's live (not forgotten) documents that has its token ids:
    the committed ones listed by the memory's version, then those not yet committed."""
    live: dict[str, int] = {}
    for i, source in enumerate(memory.sources):
        if not source.get("forgotten"):
            live[source["sha256"]] = i
    out = []
    if store is not None:
        for digest in memory.blocks:
            if digest.startswith("@") or not store.has_block(name, digest):
                continue  # a checkpoint's rows, or a block gc pruned from the long-term tier
            meta = store.block_meta(name, digest)
            source = live.get(meta.get("source_sha256"))
            if source is None:
                continue
            ids = store.read_block_ids(name, digest)
            if ids is None:
                continue  # written before blocks kept their token ids: reachable through the pool only
            out.append(Candidate(digest, meta.get("update", 0), source, meta.get("chunk", 0), ids,
                                 lambda d=digest: store.read_block_rows(name, d, None, ("keys", "values"))))
    for k, (states, meta) in enumerate(memory.pending):
        source = meta.get("source_index")
        if source is None or memory.sources[source].get("forgotten") or "ids" not in states:
            continue
        out.append(Candidate(f"pending-{k}", meta.get("update", 0), source, meta.get("chunk", 0),
                             states["ids"].tolist(), lambda s=states: s))
    return out


MIN_RELATIVE_SCORE = 0.7  # blocks scoring below this share of the best score are not read (measured)


def select(found: list[Candidate], question: str, tokenizer, budget: int) -> list[Candidate]:
    """The blocks BM25 ranks highest for the question, up to `budget` tokens, in the order
    they were written. A block larger than what is left of the budget is skipped, not cut;
    blocks sharing no term with the question are not read, unless none does: then the most
    recent blocks are (the pool's own bias)."""
    if not found:
        return []
    import bm25s

    texts = [tokenizer.decode(c.ids, skip_special_tokens=True) for c in found]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    query = bm25s.tokenize([question], stopwords="en", show_progress=False)
    order, scores = retriever.retrieve(query, k=len(found), show_progress=False)
    for i, score in zip(order[0].tolist(), scores[0].tolist(), strict=True):
        found[i].score = float(score)
    best = max(c.score for c in found)
    ranked = [c for c in sorted(found, key=lambda c: -c.score) if c.score > 0 and c.score >= MIN_RELATIVE_SCORE * best]
    if not ranked:
        ranked = sorted(found, key=lambda c: -c.update)
    picked, used = [], 0
    for candidate in ranked:
        if used + candidate.tokens <= budget:
            picked.append(candidate)
            used += candidate.tokens
    return sorted(picked, key=lambda c: c.update)


def read(selected: list[Candidate], dtype: torch.dtype) -> Pool:
    """The selected blocks' tokens as one pool (L, Hkv, n, hd), in the given order."""
    keys, values = [], []
    for c in selected:
        states = c.load()
        keys.append(states["keys"].to(dtype))
        values.append(states["values"].to(dtype))
    k = torch.cat(keys).permute(1, 2, 0, 3).contiguous()  # (L, Hkv, n, hd)
    v = torch.cat(values).permute(1, 2, 0, 3).contiguous()
    return Pool(k, v)


def forecast(held: float, pool: int, pool_size: int, per_update: float, updates: int) -> float:
    """Expected tokens of `held` still in the pool after `updates` more updates of
    `per_update` tokens each, from a pool of `pool` tokens: while the pool fills nothing is
    dropped; once full, each update drops as many as it adds, uniformly: (1 - K/N) per update."""
    n = float(pool)
    for _ in range(updates):
        drop = max(0.0, n + per_update - pool_size)
        if n > 0:
            held *= 1 - min(drop, n) / n
        n = min(pool_size, n + per_update)
    return held
