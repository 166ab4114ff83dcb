"""Memories of the trained checkpoints (MemoryLLM, M+) in the versioned store.

The official model keeps its memory as hidden-state rows: N per layer in the short-term
pool, and for M+ a long-term memory (LTM) per layer plus rows waiting to merge into it.
Every row the model writes comes from one injection, so, as for the training-free kind,
each injection's rows are stored once as an immutable block (K rows x L layers, with the
M+ retrieval keys), and a version lists, per layer, the (block, row) of every row it holds.
The checkpoint's own pool and long-term rows are two virtual blocks, "@checkpoint" and
"@checkpoint-ltm", read from the checkpoint itself: the store never copies gigabytes of
initial memory. A version is then a few int32 per row (plus M+ ages and recall
frequencies), and reloading it rebuilds the model's state bit for bit.

`forget` replaces a document's pool rows by the checkpoint's rows at the same positions
(the pool keeps its size, as the model expects) and removes its long-term rows. Counts are
rows per layer. The checkpoint reads its whole pool itself (M+ retrieves from its long-term
memory with its own trained retriever), so a read budget does not apply.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from ..errors import StoreError
from ..model.official import CHECKPOINT, CHECKPOINT_LTM, MPlus, OfficialMemoryLLM, row_ids, split_ids
from .base import BlockSource, Memory, Reading, Sampling
from .recall import excerpt

if TYPE_CHECKING:
    from ..model.loading import LoadedModel
    from ..text.chunking import Chunk

MIN_INJECTION = 16  # the official README: shorter injections disturb the trained memory
VIRTUAL = ("@checkpoint", "@checkpoint-ltm")  # blocks[CHECKPOINT], blocks[CHECKPOINT_LTM]
TIERS = ("ltm", "cached")  # M+: long-term rows, rows waiting to merge into them


@dataclass
class TrainedMemory(Memory):
    kind: ClassVar[str] = "trained"
    unit: ClassVar[str] = "rows per layer"

    pool_size: int  # N rows per layer
    write_context: int  # K: rows written per injection, and the pool tail an injection reads
    dtype: str
    layers: int
    index: dict[str, torch.Tensor]  # the version tensors (see index_from_state)
    meta: dict  # initialized, checkpoint_initialized, update_step, block_sources, block_chunks, mplus
    sources: list[dict] = field(default_factory=list)
    blocks: list[str] = field(default_factory=lambda: list(VIRTUAL))
    seed: int = field(default_factory=lambda: secrets.randbits(62))
    update_count: int = 0
    head: str | None = None
    pending: list[tuple[dict, dict]] = field(default_factory=list)
    updates: list[dict] = field(default_factory=list)
    dropped: int = 0
    keep_blocks: bool = True
    lm: LoadedModel | None = None  # None: index only (status, diff, forget)
    library: BlockSource | None = None
    state: dict | None = None  # the engine's memory state, when loaded

    @property
    def engine(self) -> OfficialMemoryLLM | None:
        return self.lm.engine if self.lm is not None else None

    @classmethod
    def create(cls, lm: LoadedModel, *, pool_size: int | None = None, write_context: int | None = None,
               dtype: str | None = None, seed: int | None = None, block_format: str | None = None,
               write_scope: str | None = None) -> TrainedMemory:
        """The checkpoint's own memory; the checkpoint fixes N and K (settings are ignored)."""
        engine = lm.engine
        state = engine.initial_state()
        memory = cls(
            pool_size=len(state["rows"][0]), write_context=engine.c.num_tokens,
            dtype=str(state["rows"][0].dtype).removeprefix("torch."), layers=engine.c.layers, index={},
            meta={"initialized": state["initialized"], "checkpoint_initialized": engine.checkpoint_initialized,
                  "update_step": 0, "block_sources": [-1, -1], "block_chunks": [-1, -1],
                  "mplus": isinstance(engine, MPlus)},
            lm=lm, state=state,
        )
        if seed is not None:
            memory.seed = seed
        memory.index = memory.index_from_state()
        return memory

    def __len__(self) -> int:
        """Pool rows per layer that hold ingested text (the rest are the checkpoint's)."""
        return round(int((self.index["source"] >= 0).sum()) / self.layers)

    def _forked(self) -> dict:
        state = {k: list(v) if isinstance(v, list) else v for k, v in self.state.items()} if self.state else None
        return {"state": state, "meta": copy.deepcopy(self.meta), "index": dict(self.index)}

    @property
    def mplus(self) -> bool:
        return bool(self.meta.get("mplus"))

    # -- writing ---------------------------------------------------------------------

    dropped_note: ClassVar[str] = ("rows the pool drops are gone for MemoryLLM (M+ keeps some in its long-term "
                                   "memory)")

    def archive_in_ram(self, keep: bool) -> None:
        self.keep_blocks = False  # the checkpoint reads its own pool; nothing reads a tier in RAM

    def check_chunks(self, name: str, chunks: list[Chunk]) -> list[str]:
        return [f"{name}: chunk {c.index} has {len(c.ids)} tokens; MemoryLLM checkpoints were "
                f"trained on injections of at least {MIN_INJECTION} and may be disturbed by shorter ones"
                for c in chunks if len(c.ids) < MIN_INJECTION]

    def write(self, ids: list[int], *, source: int, chunk: int, span: tuple[int, int] = (0, 0)) -> dict:
        """One update: inject the chunk, drop rows with the recorded seed, append its rows."""
        engine = self.engine
        seed = self.next_seed()
        state = engine.copy(self.ensure_state())  # the engine writes into it; this memory's alone
        before = len(state["rows"][0])
        delta = engine.inject(torch.tensor(ids, dtype=torch.int64), state)  # L x (n, d)
        n = len(delta[0])
        was_initialized = state["initialized"]
        engine.update(delta, torch.Generator().manual_seed(seed), row_ids(-1 - len(self.pending), torch.arange(n)),
                      state)
        self.state = state
        dropped = before + n - len(self.state["rows"][0]) if was_initialized else before
        if self.keep_blocks:
            tensors = {"rows": torch.stack([d.cpu() for d in delta], dim=1),  # (n, L, d)
                       "ids": torch.tensor(ids, dtype=torch.int32)}  # (T,): the text, for excerpts
            if self.mplus:
                tensors["keys"] = torch.stack([k[-n:].cpu() for k in self.state["row_keys"]], dim=1)  # (n, L, s)
            self.pending.append((tensors, {**self.block_meta(source, chunk, span, len(ids)), "rows": n}))
        self.sources[source]["rows"] = self.sources[source].get("rows", 0) + n
        self.meta["initialized"] = state["initialized"]
        self.meta["update_step"] = self.state.get("update_step", 0)
        if not self.keep_blocks:  # never stored: the pending block is only a name for the rows
            self._number_blocks([(source, chunk)], ["<unsaved>"])
        update = self.log_update(source, chunk, len(ids), dropped, seed)
        update["rows"] = n
        return update

    def settle(self, written: list[str]) -> None:
        """The pending blocks were stored under these ids: point their rows at them."""
        self._number_blocks([(m["source_index"], m["chunk"]) for _, m in self.pending], written)
        self.pending.clear()

    def _number_blocks(self, origins: list[tuple[int, int]], digests: list[str]) -> None:
        first = len(self.blocks)
        if self.state is not None:
            for name in ("row_ids", "cached_ids", "ltm_ids"):
                if name in self.state:
                    self.state[name] = [_renumber(ids, first) for ids in self.state[name]]
        for (source, chunk), digest in zip(origins, digests, strict=True):
            self.blocks.append(digest)
            self.meta["block_sources"].append(source)
            self.meta["block_chunks"].append(chunk)
        if self.state is not None:
            self.index = self.index_from_state()

    def forget(self, sources: set[int]) -> int:
        """Replace these documents' pool rows by the checkpoint's, remove their long-term
        rows; returns the pool rows per layer they held."""
        gone = [b for b, s in enumerate(self.meta["block_sources"]) if s in sources]
        held = round(int(torch.isin(self.index["source"], torch.tensor(sorted(sources))).sum()) / self.layers)
        self.index = drop_blocks(self.index, gone, self.layers)
        if not self.meta["checkpoint_initialized"] and bool((self.index["block"] == CHECKPOINT).all()):
            self.meta["initialized"] = False
        if self.state is not None and self.engine is not None:
            blocks = torch.tensor(gone, dtype=torch.int64)
            state = self.engine.copy(self.state)
            self.engine.forget(lambda ids: torch.isin(split_ids(ids)[0], blocks), state)
            self.state = state
        for s in sources:
            self.sources[s]["forgotten"] = True
        self.dropped += held
        return held

    # -- reading ---------------------------------------------------------------------

    def ensure_state(self) -> dict:
        """The engine state, rebuilt from the blocks the first time it is needed."""
        if self.state is None:
            self.state = self.rebuild(self.engine, self.library)
        return self.state

    def read(self, question: str, budget: int, sampling: Sampling) -> Reading:
        """The official generation over the whole pool (no budget: the checkpoint reads its
        pool itself); for M+, the documents its retriever chose are cited."""
        lm = self.lm
        self.ensure_state()
        ids = torch.tensor(lm.prompt.question_ids(lm.tokenizer, question))
        reading = Reading(iter(()), {})
        reading.tokens = self._stream(ids, sampling, reading)
        return reading

    def _stream(self, ids: torch.Tensor, sampling: Sampling, reading: Reading) -> Iterator[int]:
        """For M+, once its retriever has chosen (at the prompt's forward pass), the documents
        the chosen long-term rows came from go into the reading's info."""
        lm, state = self.lm, self.state
        options = {k: v for k, v in vars(sampling).items() if k != "max_new_tokens"}
        retrieved: list = [None] * self.layers  # what M+'s retriever chose, for this answer alone
        stream = lm.engine.stream(ids, sampling.max_new_tokens, stop_ids=lm.stop_ids(), state=state,
                                  retrieved=retrieved, **options)
        cited = not self.mplus
        for token, _ in stream:
            if not cited:
                reading.info["sources"], cited = self._retrieved(state, retrieved), True
            yield token
        if not cited:
            reading.info["sources"] = self._retrieved(state, retrieved)

    def _retrieved(self, state: dict, retrieved: list) -> list[dict]:
        """M+: documents by the share of long-term rows its retriever placed before the pool."""
        counts: dict[int, int] = {}
        for i, chosen in enumerate(retrieved):
            if chosen is None:
                continue
            block, _ = split_ids(torch.cat([state["ltm_ids"][i], state["cached_ids"][i]])[chosen])
            for b in block.tolist():
                counts[b] = counts.get(b, 0) + 1
        total = sum(counts.values()) or 1
        merged: dict[tuple[int, int], dict] = {}
        for b, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            source = self.meta["block_sources"][b] if 0 <= b < len(self.meta["block_sources"]) else -1
            if source < 0:
                continue  # the checkpoint's own long-term rows
            key = (source, self.meta["block_chunks"][b])
            row = merged.setdefault(key, {"source": self.sources[source]["name"], "chunk": key[1], "score": 0.0,
                                          "rows": 0, "excerpt": ""})
            row["score"] += n / total
            row["rows"] += n
            if not row["excerpt"] and self.library is not None and self.library.has_block(self.blocks[b]):
                row["excerpt"] = excerpt(self.lm.tokenizer, self.library.read_block_ids(self.blocks[b]))
        out = sorted(merged.values(), key=lambda r: -r["score"])
        for row in out:
            row["score"] = round(row["score"], 3)
        return out

    # -- counts ------------------------------------------------------------------------

    def held_per_source(self) -> list[int]:
        return self._per_source(self.index["source"])

    def written(self, source: dict) -> int:
        return source.get("rows", source["tokens"])

    def per_update(self) -> float:
        return float(self.write_context)  # K rows per injection

    def forecast_base(self) -> int:
        return self.pool_size  # the pool is always full: the checkpoint's rows fill the rest

    def _long_term_entry(self, source: dict, long_term: int) -> dict:
        return {"rows_written": source.get("rows", 0), "long_term_rows": long_term}

    def long_term_per_source(self) -> list[int]:
        """M+: long-term rows (and rows waiting to merge) per document, per layer."""
        if not self.mplus:
            return [0] * len(self.sources)
        table = torch.tensor(self.meta["block_sources"], dtype=torch.int64)
        blocks = [self.index[f"{tier}_block.{i}"].to(torch.int64) for tier in TIERS for i in range(self.layers)]
        return self._per_source(table[torch.cat(blocks)] if blocks else torch.empty(0, dtype=torch.int64))

    def _per_source(self, source: torch.Tensor) -> list[int]:
        source = source.flatten().to(torch.int64)
        counts = torch.bincount(source[source >= 0], minlength=len(self.sources))
        return [round(int(c) / self.layers) for c in counts]

    # -- stored versions ---------------------------------------------------------------

    @classmethod
    def pool_keys(cls, tensors: dict[str, torch.Tensor], meta: dict) -> dict[tuple, tuple[str, str]]:
        """Rows are dropped per layer: a key is (layer, block, row); the checkpoint's own
        rows count as one source."""
        blocks, sources = meta["blocks"], meta["sources"]
        block = tensors["block"]  # (L, N)
        layer = torch.arange(block.shape[0]).repeat_interleave(block.shape[-1])
        out = {}
        for k, (blk, row, src) in enumerate(zip(block.flatten().tolist(), tensors["row"].flatten().tolist(),
                                                tensors["source"].flatten().tolist(), strict=True)):
            source = sources[src] if src >= 0 else {"sha256": "", "name": "<checkpoint memory>"}
            out[(int(layer[k]), blocks[blk], row)] = (source["sha256"], source["name"])
        return out

    @classmethod
    def held_in(cls, tensors: dict[str, torch.Tensor], meta: dict) -> int:
        return round(int((tensors["source"] >= 0).sum()) / int(meta["layers"]))

    @classmethod
    def version_layers(cls, meta: dict) -> int:
        return int(meta["layers"])

    @classmethod
    def version_forecast(cls, meta: dict) -> tuple[float, int]:
        return float(meta["write_context"]), int(meta["pool_size"])

    @classmethod
    def version_written(cls, source: dict) -> int:
        return source.get("rows", source["tokens"])

    @classmethod
    def without_blocks(cls, tensors: dict[str, torch.Tensor], meta: dict,
                       gone: list[int]) -> tuple[dict[str, torch.Tensor], dict]:
        """Pool rows of these blocks go back to the checkpoint's; long-term rows go; then
        the blocks are renumbered."""
        blocks = meta.get("blocks", [])
        kept = [i for i in range(len(blocks)) if i not in set(gone)]
        remap = torch.full((len(blocks),), -1, dtype=torch.int64)
        remap[kept] = torch.arange(len(kept))
        out = drop_blocks(tensors, gone, meta["layers"])
        for key in block_tensors(out):
            out[key] = remap[out[key].to(torch.int64)].to(torch.int32)
        return out, {k: [meta[k][i] for i in kept] for k in ("block_sources", "block_chunks")}

    @classmethod
    def held_blocks(cls, tensors: dict[str, torch.Tensor], meta: dict) -> set[str]:
        blocks = meta.get("blocks", [])
        held = set()
        for key in block_tensors(tensors):  # the pool's, and M+'s long-term and waiting rows
            held.update(blocks[i] for i in tensors[key].flatten().unique().tolist() if i >= 0)
        return held

    # -- evaluation --------------------------------------------------------------------

    def nll(self, ids: list[int]) -> tuple[float, int]:
        x = torch.tensor(ids)
        logits = self.engine.forward(x, state=self.ensure_state())
        return float(F.cross_entropy(logits[:-1].float().cpu(), x[1:], reduction="sum")), len(ids) - 1

    def layer_stats(self) -> list[dict]:
        rows = self.ensure_state()["rows"]
        return [{"layer": i, "mean_norm": float(r.float().norm(dim=-1).mean()),
                 "max_norm": float(r.float().norm(dim=-1).max())} for i, r in enumerate(rows)]

    def stored_form(self) -> None:
        return None  # rows per layer refer to the checkpoint's own: no per-token disk figure

    @classmethod
    def plain_forward(cls, lm: LoadedModel, ids: list[int]) -> None:
        """The checkpoint without its memory."""
        lm.engine.forward(torch.tensor(ids), memory=False)

    @classmethod
    def window(cls, lm: LoadedModel) -> int:
        return lm.engine.c.raw.get("max_position_embeddings", 4096) - 1024

    # -- versions --------------------------------------------------------------------

    def index_from_state(self) -> dict[str, torch.Tensor]:
        """Version tensors from the engine state: per layer the (block, row) of every pool
        row with its document and chunk; for M+ also the pool ages and, per layer, the
        long-term and waiting rows with their ages and recall frequencies."""
        state = self.state
        sources = torch.tensor(self.meta["block_sources"], dtype=torch.int64)
        chunks = torch.tensor(self.meta["block_chunks"], dtype=torch.int64)
        block, row = split_ids(torch.stack(state["row_ids"]))  # (L, N)
        if (block < 0).any():
            raise RuntimeError("settle pending blocks before recording a version")
        index = {"block": block.to(torch.int32), "row": row.to(torch.int32),
                 "source": sources[block].to(torch.int32), "chunk": chunks[block].to(torch.int32)}
        if self.mplus:
            index["age"] = torch.stack(state["ages"])  # (L, N) int64
            for i in range(self.layers):
                for tier in TIERS:
                    b, r = split_ids(state[f"{tier}_ids"][i])
                    index[f"{tier}_block.{i}"], index[f"{tier}_row.{i}"] = b.to(torch.int32), r.to(torch.int32)
                    index[f"{tier}_age.{i}"] = state[f"{tier}_ages"][i]
                index[f"ltm_rf.{i}"] = state["ltm_rf"][i].float().cpu()
        return index

    def version_record(self, op: str, message: str = "", **extra) -> tuple[dict[str, torch.Tensor], dict]:
        if self.pending:
            raise RuntimeError("settle pending blocks before recording a version")
        meta = {**self.ledger_meta(op, message, len(self)), "layers": self.layers, **self.meta, **extra}
        meta["stats"]["added"] = sum(u.get("rows", 0) for u in self.updates)  # rows per layer, as the rest
        return dict(self.index), meta

    @classmethod
    def load(cls, version: str, tensors: dict[str, torch.Tensor], meta: dict, lm: LoadedModel | None,
             library: BlockSource | None, *, states: bool = True) -> TrainedMemory:
        try:
            memory = cls(
                pool_size=meta["pool_size"], write_context=meta["write_context"], dtype=meta["dtype"],
                layers=meta["layers"], index=tensors,
                meta={k: meta[k] for k in ("initialized", "checkpoint_initialized", "update_step", "block_sources",
                                           "block_chunks", "mplus")},
                sources=meta["sources"], blocks=meta["blocks"], seed=meta["seed"],
                update_count=meta["update_count"], head=version, lm=lm, library=library,
            )
        except (KeyError, TypeError) as err:
            raise StoreError(f"version {version[:12]} is damaged: {err}") from None
        if states and lm is not None and library is not None:
            memory.state = memory.rebuild(lm.engine, library)
        return memory

    def rebuild(self, engine: OfficialMemoryLLM, library: BlockSource) -> dict:
        """The engine state this version describes, reading only the block rows it holds."""
        if engine.c.layers != self.layers or isinstance(engine, MPlus) != self.mplus:
            raise StoreError("the memory was written by a different kind of checkpoint")
        index = self.index
        refs = [("block", "row")] + [(f"{t}_block.{{i}}", f"{t}_row.{{i}}") for t in TIERS if self.mplus]
        wanted: dict[int, set[int]] = {}
        for b_name, r_name in refs:
            for i in range(self.layers):
                block = index[b_name.format(i=i)].to(torch.int64)
                block = block[i] if block.dim() == 2 else block
                row = index[r_name.format(i=i)].to(torch.int64)
                row = row[i] if row.dim() == 2 else row
                for b in block.unique().tolist():
                    if b not in (CHECKPOINT, CHECKPOINT_LTM):
                        wanted.setdefault(b, set()).update(row[block == b].tolist())
        names = ("rows", "keys") if self.mplus else ("rows",)
        fetched = {}
        for b, rows in wanted.items():
            rows = sorted(rows)
            got = library.read_block_rows(self.blocks[b], rows, names)
            fetched[b] = (torch.tensor(rows), got)

        def gather(i: int, block: torch.Tensor, row: torch.Tensor, name: str, own: list, own_ltm: list | None):
            block, row = block.to(torch.int64), row.to(torch.int64)
            like = own[i]
            out = torch.empty(len(block), *like.shape[1:], dtype=like.dtype, device=like.device)
            for b in block.unique().tolist():
                at = torch.nonzero(block == b).flatten()
                if b == CHECKPOINT:
                    out[at.to(out.device)] = own[i][row[at].to(out.device)]
                elif b == CHECKPOINT_LTM:
                    out[at.to(out.device)] = own_ltm[i][row[at].to(out.device)]
                else:
                    rows, got = fetched[b]
                    pos = torch.searchsorted(rows, row[at])
                    out[at.to(out.device)] = got[name][pos, i].to(out.device, out.dtype)
            return out

        e = engine
        state: dict = {"initialized": bool(self.meta["initialized"])}
        state["rows"] = [gather(i, index["block"][i], index["row"][i], "rows", e.checkpoint_rows,
                                getattr(e, "checkpoint_ltm", None)) for i in range(self.layers)]
        state["row_ids"] = [index["block"][i].to(torch.int64) * (1 << 32) + index["row"][i].to(torch.int64)
                            for i in range(self.layers)]
        if self.mplus:
            L = range(self.layers)
            state["row_keys"] = [gather(i, index["block"][i], index["row"][i], "keys", e.checkpoint_keys,
                                        e.checkpoint_ltm_keys) for i in L]
            state["ages"] = [index["age"][i].to(torch.int64) for i in L]
            for tier, rows_name in (("ltm", "ltm"), ("cached", "cached")):
                b = [index[f"{tier}_block.{i}"] for i in L]
                r = [index[f"{tier}_row.{i}"] for i in L]
                state[rows_name] = [gather(i, b[i], r[i], "rows", e.checkpoint_rows, e.checkpoint_ltm) for i in L]
                state[f"{tier}_keys"] = [gather(i, b[i], r[i], "keys", e.checkpoint_keys, e.checkpoint_ltm_keys)
                                         for i in L]
                state[f"{tier}_ages"] = [index[f"{tier}_age.{i}"].to(torch.int64) for i in L]
                state[f"{tier}_ids"] = [b[i].to(torch.int64) * (1 << 32) + r[i].to(torch.int64) for i in L]
            state["ltm_rf"] = [index[f"ltm_rf.{i}"].to(e.checkpoint_ltm_rf[i].dtype).to(e.layer_devices[i])
                               for i in L]
            state["update_step"] = int(self.meta["update_step"])
        return state


def drop_blocks(index: dict[str, torch.Tensor], gone: list[int], layers: int) -> dict[str, torch.Tensor]:
    """A version index without the rows of these blocks: pool rows become the checkpoint's
    rows at the same positions, long-term and waiting rows are removed."""
    if not gone:
        return dict(index)
    gone_t = torch.tensor(gone, dtype=torch.int64)
    out = dict(index)
    block = index["block"].to(torch.int64)
    hit = torch.isin(block, gone_t)  # (L, N)
    positions = torch.arange(block.shape[1]).expand_as(block)
    out["block"] = torch.where(hit, CHECKPOINT, block).to(torch.int32)
    out["row"] = torch.where(hit, positions, index["row"].to(torch.int64)).to(torch.int32)
    out["source"] = torch.where(hit, -1, index["source"].to(torch.int64)).to(torch.int32)
    out["chunk"] = torch.where(hit, -1, index["chunk"].to(torch.int64)).to(torch.int32)
    for tier in TIERS:
        for i in range(layers):
            if f"{tier}_block.{i}" not in index:
                continue
            keep = ~torch.isin(index[f"{tier}_block.{i}"].to(torch.int64), gone_t)
            for name in [k for k in index if k.startswith(f"{tier}_") and k.endswith(f".{i}")]:
                out[name] = index[name][keep]
    return out


def block_tensors(index: dict[str, torch.Tensor]) -> list[str]:
    """Names of the index tensors that hold block indices (each has a "row" partner)."""
    return [k for k in index if k == "block" or k.split(".")[0].endswith("_block")]


def _renumber(ids: torch.Tensor, first: int) -> torch.Tensor:
    """Pending block -1 - k becomes block first + k."""
    block, row = split_ids(ids)
    block = torch.where(block < 0, first - 1 - block, block)
    return block * (1 << 32) + row
