"""Reading what a question needs: the long-term tier, and retrieval within a token budget.

The pool holds the N most recent-ish tokens (MemoryLLM's random drops), but no token is
lost when the pool drops it: every update's tokens stay in their block in the store (the
*long-term tier*) until `forget` or `gc`. Reading the whole pool for every question drowns
a small model (one NQ passage in the prompt: 13 of 16 right; all 16: 3 of 16) and costs
time linear in N; so `ask` reads at most `read_budget` tokens: one block, from the pool or
the long-term tier alike, chosen among those BM25 ranks highest for the question over the text
that wrote them (each block keeps its token ids) by the model itself, as the block after which
the question is most likely (`shortlist`, `choose`); placed after the sink at fresh positions
(keys are stored before rotary, see engine.py).

The blocks are read one at a time, so RAM at ask time depends on the budget, not on how
much was ingested. A block the disk budget evicted (`max_disk`) kept its token ids: its keys
and values are recomputed when a question selects it (FreeMemory.block_states).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..errors import StoreError
from ..model.pool import Pool
from ..text.bm25 import TERMS, bm25_index, bm25_scores
from . import codec
from .base import BlockSource


@dataclass
class Candidate:
    """One update's tokens, wherever they are (a stored block, or a pending one in RAM)."""

    block: str  # block id, or "pending-K"
    update: int
    source: int  # index into the memory's sources
    chunk: int
    tokens: int
    load: Callable[[], dict]  # -> {"keys", "values"}: (T, L, Hkv, hd) token-major, decoded
    read_ids: Callable[[], list[int]]
    score: float = 0.0  # BM25's, for the question
    fit: float | None = None  # the model's log-likelihood of the question read after this block alone
    codec: dict | None = None  # how the block stores its keys and values (codec.py); None: float16
    _ids: list[int] | None = field(default=None, repr=False)

    @property
    def ids(self) -> list[int]:
        """The token ids the block was written from, read once (citing and judging both use them)."""
        if self._ids is None:
            self._ids = self.read_ids()
        return self._ids


class Index:
    """The candidates of a memory, as columns (block, update, source, chunk, tokens, codec),
    and a BM25 index over their text. Candidate objects are built only for the blocks a
    question selects (`candidate`), or all of them when asked for (`candidates`): a memory of
    a million tokens has thousands of blocks, and an answer reads a handful."""

    def __init__(self, columns: dict[str, list], retriever, make: Callable[[int], Candidate],
                 damaged: list[str] | None = None) -> None:
        self.columns = columns
        self.retriever = retriever  # bm25s.BM25; None when there is nothing to search
        self._make = make
        self._built: dict[int, Candidate] = {}
        self.damaged = damaged or []  # blocks the version names that could not be indexed: never read

    def __len__(self) -> int:
        return len(self.columns["block"])

    def candidate(self, k: int) -> Candidate:
        if k not in self._built:
            self._built[k] = self._make(k)
        return self._built[k]

    @property
    def candidates(self) -> list[Candidate]:
        return [self.candidate(k) for k in range(len(self))]


COLUMNS = ("block", "update", "source", "chunk", "tokens")


def index(memory, tokenizer) -> Index:
    """The index of a stored memory (cached per version in its library, see `_stored`), or
    one built in RAM from the memory's pending blocks (memories that are never stored)."""
    if memory.library is not None and memory.head is not None and not memory.pending:
        return _stored(memory, memory.library, tokenizer)
    found = []
    for k, (states, meta) in enumerate(memory.pending):
        source = meta.get("source_index")
        if source is None or memory.sources[source].get("forgotten") or "ids" not in states:
            continue
        found.append(Candidate(f"pending-{k}", meta.get("update", 0), source, meta.get("chunk", 0),
                               len(states["ids"]), _decoder(lambda s=states: s, codec.of(meta)),
                               lambda s=states: s["ids"].tolist()))
    columns = {name: [getattr(c, name) for c in found] for name in COLUMNS}
    return Index(columns, bm25_index([tokenizer.decode(c.ids, skip_special_tokens=True) for c in found]),
                 found.__getitem__)


def _decoder(load: Callable[[], dict], found: dict | None) -> Callable[[], dict]:
    """`load` returning keys and values decoded from the block's codec."""
    return load if found is None else lambda: codec.decode(load(), found)


def _stored(memory, library: BlockSource, tokenizer) -> Index:
    """Every block of the memory's live documents listed by its version (blocks gc pruned
    and blocks written before blocks kept their token ids are left out).

    Building it reads every block's metadata and ids and indexes their text: O(what was
    ingested). So it is cached in the library, keyed by the version and the number of
    blocks on disk, and each ask after the first loads it (memory-mapped) instead."""
    import bm25s

    key = f"recall-{TERMS}-{memory.head}-{library.block_count()}"

    def make(columns: dict[str, list], codecs: list[dict | None]) -> Callable[[int], Candidate]:
        def build(k: int) -> Candidate:
            block, found = columns["block"][k], codecs[columns["codec"][k]]
            return Candidate(block, columns["update"][k], columns["source"][k], columns["chunk"][k],
                             columns["tokens"][k], partial(memory.block_states, block, found),
                             partial(_ids, library, block), codec=found)
        return build

    folder = library.cached(key)
    if folder is not None and (folder / "candidates.json").is_file():
        try:
            saved = json.loads((folder / "candidates.json").read_text())
            columns, codecs = {name: saved[name] for name in (*COLUMNS, "codec")}, saved["codecs"]
            retriever = bm25s.BM25.load(str(folder), mmap=True, show_progress=False) if columns["block"] else None
            return Index(columns, retriever, make(columns, codecs), saved.get("damaged", []))
        except (OSError, ValueError, KeyError, TypeError):
            library.drop_cache(key)  # a damaged (or older) cache is rebuilt below
    live = {s["sha256"]: i for i, s in enumerate(memory.sources) if not s.get("forgotten")}
    columns: dict[str, list] = {name: [] for name in (*COLUMNS, "codec")}
    codecs: list[dict | None] = []
    texts, damaged = [], []
    pruned = library.pruned_blocks()
    for digest in memory.blocks:
        if digest.startswith("@") or digest in pruned:
            continue  # a checkpoint's rows, or a block gc pruned from the long-term tier
        try:
            if not (library.has_block(digest) or library.is_evicted(digest)):
                raise StoreError(f"block {digest[:12]} is missing")
            meta = library.block_meta(digest)
            source, chunk = memory.owner(digest, meta, live)
            if source is not None and memory.sources[source].get("forgotten"):
                source = None
            ids = library.read_block_ids(digest) if source is not None else None
        except StoreError:
            damaged.append(digest)  # reported by every answer until repaired (memllm verify lists it)
            continue
        if source is None or ids is None:
            continue  # forgotten, or written before blocks kept their token ids (read through the pool only)
        found = codec.of(meta)
        if found not in codecs:
            codecs.append(found)
        for name, value in zip((*COLUMNS, "codec"), (digest, meta.get("update", 0), source, chunk, len(ids),
                                                     codecs.index(found)), strict=True):
            columns[name].append(value)
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    retriever = bm25_index(texts)

    def fill(tmp: Path) -> None:
        if retriever is not None:
            retriever.save(str(tmp), show_progress=False)
        (tmp / "candidates.json").write_text(json.dumps({**columns, "codecs": codecs, "damaged": damaged}))

    library.write_cache(key, fill)
    return Index(columns, retriever, make(columns, codecs), damaged)


def _ids(library: BlockSource, block: str) -> list[int]:
    return library.read_block_ids(block) or []


# blocks scoring below this share of the best score are not read: 1.0 reads the best block alone
# (and any that ties it); a 135M model answers from one note about as well as from its prompt,
# and from a note among others far worse (docs/design.md, "Reading within a budget")
MIN_RELATIVE_SCORE = 1.0


def select(idx: Index, question: str, budget: int, *, scores: list[float] | None = None) -> list[Candidate]:
    """The blocks BM25 ranks highest for the question, up to `budget` tokens, in the order
    they were written. A block larger than what is left of the budget is skipped, not cut;
    blocks scoring under MIN_RELATIVE_SCORE of the best are not read (by default: all but the
    best and its ties); if no block shares a term with the question, the most recent blocks
    are (the pool's own bias)."""
    count = len(idx)
    if not count:
        return []
    scores = scores if scores is not None else bm25_scores(idx.retriever, question, count)
    best = max(scores)
    ranked = sorted((k for k in range(count) if scores[k] > 0 and scores[k] >= MIN_RELATIVE_SCORE * best),
                    key=lambda k: -scores[k])
    if not ranked:
        updates = idx.columns["update"]
        ranked = sorted(range(count), key=lambda k: -updates[k])
    tokens = idx.columns["tokens"]
    picked, used = [], 0
    for k in ranked:
        if used + tokens[k] <= budget:
            picked.append(k)
            used += tokens[k]
    out = []
    for k in picked:
        candidate = idx.candidate(k)
        candidate.score = float(scores[k])
        out.append(candidate)
    return sorted(out, key=lambda c: c.update)


# the model judges up to SHORTLIST of the blocks BM25 ranks highest, those scoring at least
# SHORTLIST_SHARE of the best, each read alone, by how well it predicts the question; the best
# is read (docs/design.md, "Reading within a budget")
SHORTLIST = 4
SHORTLIST_SHARE = 0.5


def shortlist(idx: Index, question: str, budget: int, count: int = SHORTLIST, *,
              scores: list[float] | None = None) -> list[Candidate]:
    """Up to `count` blocks that share a term with the question and score at least
    SHORTLIST_SHARE of the best, BM25's best first, each no larger than the budget: the
    candidates the model chooses one from (`choose`). `scores`: BM25's for the question,
    where the caller has them already."""
    if not len(idx):
        return []
    scores = scores if scores is not None else bm25_scores(idx.retriever, question, len(idx))
    tokens = idx.columns["tokens"]
    fitting = [k for k in range(len(idx)) if scores[k] > 0 and tokens[k] <= budget]
    best = max((scores[k] for k in fitting), default=0.0)
    ranked = sorted((k for k in fitting if scores[k] >= SHORTLIST_SHARE * best), key=lambda k: -scores[k])
    out = []
    for k in ranked[:count]:
        candidate = idx.candidate(k)
        candidate.score = float(scores[k])
        out.append(candidate)
    return out


def load_each(shortlisted: list[Candidate], dtype: torch.dtype, shape: tuple[int, int, int]
              ) -> tuple[list[tuple[Candidate, Pool]], list[Candidate]]:
    """Each shortlisted block's tokens as a pool of its own, and the damaged blocks (`read`)."""
    loaded, damaged = [], []
    for candidate in shortlisted:
        pool, bad = read([candidate], dtype, shape)
        if bad:
            damaged += bad
        else:
            loaded.append((candidate, pool))
    return loaded, damaged


# the model's log-likelihood of the question (nats) plus this many times BM25's score: the
# shortlisted block read is the one with the highest sum (docs/design.md, "Reading within a budget")
SCORE_WEIGHT = 1.0


def choose(judged: list[Candidate]) -> int:
    """Which of the judged blocks (each with its `fit`) to read: the index of the best."""
    return max(range(len(judged)), key=lambda i: judged[i].fit + SCORE_WEIGHT * judged[i].score)


def read(selected: list[Candidate], dtype: torch.dtype, shape: tuple[int, int, int]) -> tuple[Pool, list[Candidate]]:
    """The selected blocks' tokens as one pool (L, Hkv, n, hd), in the given order, and the
    blocks left out because they are damaged (their bytes no longer match their id, NaNs,
    or not the model's shape (L, Hkv, hd)): never read silently."""
    keys, values, damaged = [], [], []
    for c in selected:
        try:
            states = c.load()
        except StoreError:
            damaged.append(c)
            continue
        k, v = states["keys"], states["values"]
        if tuple(k.shape[1:]) != shape or k.shape != v.shape or k.shape[0] != c.tokens:
            damaged.append(c)
            continue
        keys.append(k.to(dtype))
        values.append(v.to(dtype))
    if not keys:
        return Pool.empty(*shape, dtype), damaged
    k = torch.cat(keys).permute(1, 2, 0, 3).contiguous()  # (L, Hkv, n, hd)
    v = torch.cat(values).permute(1, 2, 0, 3).contiguous()
    return Pool(k, v), damaged


def cited(memory, selected: list[Candidate], tokenizer) -> list[dict]:
    """The documents an answer read, best retrieval score first, with a short excerpt."""
    out = []
    for c in sorted(selected, key=lambda c: -c.score):
        out.append({"source": memory.sources[c.source]["name"], "chunk": c.chunk, "score": round(c.score, 3),
                    **({} if c.fit is None else {"fit": round(c.fit, 3)}),
                    "tokens": c.tokens, "excerpt": excerpt(tokenizer, c.ids)})
    return out


def excerpt(tokenizer, ids: list[int] | None, length: int = 160) -> str:
    """The start of a block's text, on one line."""
    text = " ".join(tokenizer.decode(ids or [], skip_special_tokens=True).split())
    return text[:length] + ("..." if len(text) > length else "")
