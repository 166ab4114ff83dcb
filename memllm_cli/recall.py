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
from pathlib import Path

import torch

from .engine import Pool


@dataclass
class Candidate:
    """One update's tokens, wherever they are (a stored block, or a pending one in RAM)."""

    block: str  # block id, or "pending-K"
    update: int
    source: int  # index into the memory's sources
    chunk: int
    tokens: int
    load: Callable[[], dict]  # -> {"keys", "values"}: (T, L, Hkv, hd) token-major
    read_ids: Callable[[], list[int]]
    score: float = 0.0

    @property
    def ids(self) -> list[int]:
        return self.read_ids()


@dataclass
class Index:
    """The candidates of a memory and a BM25 index over their text."""

    candidates: list[Candidate]
    retriever: object | None  # bm25s.BM25; None when there is nothing to search


def index(memory, store=None, name: str | None = None, tokenizer=None) -> Index:
    """The stored memory's index (cached on disk per version, see `_stored`), or one built
    in RAM from the memory's pending blocks (memories that are never stored)."""
    if store is not None:
        return _stored(memory, store, name, tokenizer)
    found = []
    for k, (states, meta) in enumerate(memory.pending):
        source = meta.get("source_index")
        if source is None or memory.sources[source].get("forgotten") or "ids" not in states:
            continue
        found.append(Candidate(f"pending-{k}", meta.get("update", 0), source, meta.get("chunk", 0),
                               len(states["ids"]), lambda s=states: s, lambda s=states: s["ids"].tolist()))
    return Index(found, bm25_index([tokenizer.decode(c.ids, skip_special_tokens=True) for c in found]))


def _stored(memory, store, name: str, tokenizer) -> Index:
    """Every block of the memory's live documents listed by its version (blocks gc pruned
    and blocks written before blocks kept their token ids are left out).

    Building it reads every block's metadata and ids and indexes their text: O(what was
    ingested). So it is cached under the memory's folder, keyed by the version and the number
    of blocks on disk, and each ask after the first loads it (memory-mapped) instead."""
    import json
    import shutil
    import tempfile

    import bm25s

    key = f"recall-{memory.head}-{len(store.blocks(name))}"
    cache = store.path(name) / "cache"
    folder = cache / key

    def loader(digest: str):
        return lambda: store.read_block_rows(name, digest, None, ("keys", "values"))

    def ids_of(digest: str):
        return lambda: store.read_block_ids(name, digest) or []

    if (folder / "candidates.json").is_file():
        try:
            rows = json.loads((folder / "candidates.json").read_text())
            retriever = bm25s.BM25.load(str(folder), mmap=True, show_progress=False) if rows else None
            return Index([Candidate(r["block"], r["update"], r["source"], r["chunk"], r["tokens"], loader(r["block"]),
                                    ids_of(r["block"])) for r in rows], retriever)
        except (OSError, ValueError, KeyError):
            shutil.rmtree(folder, ignore_errors=True)  # a damaged cache is rebuilt
    live = {s["sha256"]: i for i, s in enumerate(memory.sources) if not s.get("forgotten")}
    found, texts = [], []
    for digest in memory.blocks:
        if digest.startswith("@") or not store.has_block(name, digest):
            continue  # a checkpoint's rows, or a block gc pruned from the long-term tier
        meta = store.block_meta(name, digest)
        source = live.get(meta.get("source_sha256"))
        ids = store.read_block_ids(name, digest) if source is not None else None
        if source is None or ids is None:
            continue  # forgotten, or written before blocks kept their token ids (read through the pool only)
        found.append(Candidate(digest, meta.get("update", 0), source, meta.get("chunk", 0), len(ids),
                               loader(digest), ids_of(digest)))
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    retriever = bm25_index(texts)
    cache.mkdir(mode=0o700, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".recall-", dir=cache))
    try:
        if retriever is not None:
            retriever.save(str(tmp), show_progress=False)
        rows = [{"block": c.block, "update": c.update, "source": c.source, "chunk": c.chunk, "tokens": c.tokens}
                for c in found]
        (tmp / "candidates.json").write_text(json.dumps(rows))
        for file in tmp.iterdir():
            file.chmod(0o600)
        try:
            tmp.rename(folder)
        except OSError:
            pass  # another ask built it meanwhile
        for old in cache.glob("recall-*"):
            if old.name != key:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Index(found, retriever)


def bm25_index(texts: list[str]):
    """A BM25 index (bm25s) over texts; None when there is nothing to index (no texts, or
    no word in them that is not a stop word)."""
    if not texts:
        return None
    import bm25s

    retriever = bm25s.BM25()
    try:
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    except ValueError:  # an empty vocabulary
        return None
    return retriever


def bm25_scores(retriever, question: str, count: int) -> list[float]:
    """The BM25 score of each of the `count` indexed texts for the question (0 for all when
    the question has no searchable word or there is no index)."""
    scores = [0.0] * count
    if retriever is None:
        return scores
    import bm25s

    query = bm25s.tokenize([question], stopwords="en", show_progress=False, return_ids=False)
    if query and query[0]:
        order, values = retriever.retrieve(query, k=count, show_progress=False)
        for i, score in zip(order[0].tolist(), values[0].tolist(), strict=True):
            scores[i] = float(score)
    return scores


MIN_RELATIVE_SCORE = 0.7  # blocks scoring below this share of the best score are not read (measured)


def select(idx: Index, question: str, budget: int) -> list[Candidate]:
    """The blocks BM25 ranks highest for the question, up to `budget` tokens, in the order
    they were written. A block larger than what is left of the budget is skipped, not cut;
    blocks scoring under MIN_RELATIVE_SCORE of the best are not read; if no block shares a
    term with the question, the most recent blocks are (the pool's own bias)."""
    found = idx.candidates
    if not found:
        return []
    for c, score in zip(found, bm25_scores(idx.retriever, question, len(found)), strict=True):
        c.score = score
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
