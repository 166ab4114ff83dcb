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
(the pool keeps its size, as the model expects) and removes its long-term rows.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import StoreError
from .memory import Ledger
from .official import CHECKPOINT, CHECKPOINT_LTM, MPlus, OfficialMemoryLLM, row_ids, split_ids

KIND = "trained"
VIRTUAL = ("@checkpoint", "@checkpoint-ltm")  # blocks[CHECKPOINT], blocks[CHECKPOINT_LTM]
TIERS = ("ltm", "cached")  # M+: long-term rows, rows waiting to merge into them

BlockReader = Callable[[str, list[int], tuple[str, ...]], dict]  # (block, rows, names) -> tensors (r, L, ...)


@dataclass
class TrainedMemory(Ledger):
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
    engine: OfficialMemoryLLM | None = None  # None: index only (status, diff, forget)
    state: dict | None = None  # the engine's memory state, when loaded

    @classmethod
    def empty(cls, engine: OfficialMemoryLLM, *, seed: int | None = None) -> TrainedMemory:
        state = engine.initial_state()
        memory = cls(
            pool_size=len(state["rows"][0]), write_context=engine.c.num_tokens,
            dtype=str(state["rows"][0].dtype).removeprefix("torch."), layers=engine.c.layers, index={},
            meta={"initialized": state["initialized"], "checkpoint_initialized": engine.checkpoint_initialized,
                  "update_step": 0, "block_sources": [-1, -1], "block_chunks": [-1, -1],
                  "mplus": isinstance(engine, MPlus)},
            engine=engine, state=state,
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

    def write(self, engine: OfficialMemoryLLM, sink, ids: list[int], *, source: int, chunk: int,
              span: tuple[int, int] = (0, 0)) -> dict:
        """One update: inject the chunk, drop rows with the recorded seed, append its rows."""
        if self.state is None:
            raise RuntimeError("load the memory's state before writing")
        seed = self.next_seed()
        engine.set_state(self.state)
        before = len(self.state["rows"][0])
        delta = engine.inject(torch.tensor(ids, dtype=torch.int64))  # L x (n, d)
        n = len(delta[0])
        was_initialized = engine.initialized
        engine.update(delta, torch.Generator().manual_seed(seed), row_ids(-1 - len(self.pending), torch.arange(n)))
        self.state = engine.state()
        dropped = before + n - len(self.state["rows"][0]) if was_initialized else before
        if self.keep_blocks:
            tensors = {"rows": torch.stack([d.cpu() for d in delta], dim=1),  # (n, L, d)
                       "ids": torch.tensor(ids, dtype=torch.int32)}  # (T,): the text, for excerpts
            if self.mplus:
                tensors["keys"] = torch.stack([k[-n:].cpu() for k in self.state["row_keys"]], dim=1)  # (n, L, s)
            self.pending.append((tensors, {**self.block_meta(source, chunk, span, len(ids)), "rows": n}))
        self.sources[source]["rows"] = self.sources[source].get("rows", 0) + n
        self.meta["initialized"] = engine.initialized
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
            self.engine.set_state(self.state)
            self.engine.forget(lambda ids: torch.isin(split_ids(ids)[0], blocks))
            self.state = self.engine.state()
        for s in sources:
            self.sources[s]["forgotten"] = True
        self.dropped += held
        return held

    # -- reading ---------------------------------------------------------------------

    def held_per_source(self) -> list[int]:
        return self._per_source(self.index["source"])

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
        meta = {**self.ledger_meta(op, message, len(self)), "kind": KIND, "layers": self.layers, **self.meta, **extra}
        meta["stats"]["added"] = sum(u.get("rows", 0) for u in self.updates)  # rows per layer, as the rest
        return dict(self.index), meta

    @classmethod
    def from_version(cls, version: str, tensors: dict[str, torch.Tensor], meta: dict,
                     engine: OfficialMemoryLLM | None = None, read: BlockReader | None = None) -> TrainedMemory:
        """A memory from a stored version; with an engine and a block reader, its state too."""
        try:
            memory = cls(
                pool_size=meta["pool_size"], write_context=meta["write_context"], dtype=meta["dtype"],
                layers=meta["layers"], index=tensors,
                meta={k: meta[k] for k in ("initialized", "checkpoint_initialized", "update_step", "block_sources",
                                           "block_chunks", "mplus")},
                sources=meta["sources"], blocks=meta["blocks"], seed=meta["seed"],
                update_count=meta["update_count"], head=version, engine=engine,
            )
        except (KeyError, TypeError) as err:
            raise StoreError(f"version {version[:12]} is damaged: {err}") from None
        if engine is not None and read is not None:
            memory.state = memory.rebuild(engine, read)
        return memory

    def rebuild(self, engine: OfficialMemoryLLM, read: BlockReader) -> dict:
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
            got = read(self.blocks[b], rows, names)
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
