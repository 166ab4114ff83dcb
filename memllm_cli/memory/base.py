"""The one interface every kind of memory implements, and the ledger they share.

A memory is a pool of what a model has read, the documents that wrote it, and the log of
updates since it was last committed. Two kinds exist: `free.FreeMemory` (training-free,
any Hugging Face decoder: pre-rotary keys and values per token) and `trained.TrainedMemory`
(the official MemoryLLM / M+ checkpoints: hidden-state rows per layer). Callers hold a
`Memory` and never ask which kind it is: each kind answers for itself how it writes,
forgets, reads within a budget, counts what it holds, and what its stored versions mean.

The memory knows tensors, not files: blocks it has stored are read through a
`BlockSource` (the store's handle of the memory satisfies it), and the service commits
what `version_record` returns.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from ..clock import now
from ..errors import ModelError

if TYPE_CHECKING:
    from ..model.loading import LoadedModel
    from ..text.chunking import Chunk

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHUNK_TOKENS = 512  # tokens per update at most (the MemoryLLM setting)


class BlockSource(Protocol):
    """The stored blocks of one memory, and a cache folder for what is derived from them."""

    name: str  # the memory's, for messages

    def blocks(self) -> list[str]: ...
    def block_count(self) -> int: ...
    def has_block(self, block: str) -> bool: ...
    def block_meta(self, block: str) -> dict: ...
    def read_block_rows(self, block: str, rows: list[int] | None, keys: tuple[str, ...]) -> dict: ...
    def read_block_ids(self, block: str) -> list[int] | None: ...
    def read_block_checked(self, block: str, keys: tuple[str, ...]) -> dict: ...
    def is_evicted(self, block: str) -> bool: ...
    def read_kept(self, block: str) -> tuple | None: ...
    def read_recomputed(self, block: str) -> tuple[dict, dict] | None: ...
    def write_recomputed(self, block: str, tensors: dict, meta: dict, max_disk: int) -> bool: ...
    def note_reads(self, blocks: list[str]) -> None: ...
    def pruned_blocks(self) -> set[str]: ...
    def cached(self, key: str) -> Path | None: ...
    def write_cache(self, key: str, fill: Callable[[Path], None]) -> None: ...
    def drop_cache(self, key: str | None = None) -> None: ...


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class Reading:
    """What an answer is generated from: the token stream, and what was read (`info`:
    read_tokens, and `sources` with citations where the kind can tell). `info` may gain
    entries while the stream runs (M+ cites once its retriever has chosen)."""

    tokens: Iterator[int]
    info: dict = field(default_factory=dict)
    judge: Callable[[str], dict] | None = None  # the answer's text -> {grounded, ...}; None: not judged


class Memory(ABC):
    """The interface. Subclasses are dataclasses holding the ledger fields below."""

    kind: ClassVar[str]  # recorded in memory.json and in every version the kind writes
    unit: ClassVar[str]  # what the counts count: "tokens", or "rows per layer"
    # whether reading within a budget checks each block as it reads it; otherwise (and for
    # reading the whole pool) the service checks every block the version holds first
    checks_reads: ClassVar[bool] = False
    block_format: ClassVar[str | None] = None  # how blocks store keys and values, where the kind chooses
    write_scope: ClassVar[str | None] = None  # what a chunk is written after, where the kind chooses
    recomputes: ClassVar[bool] = False  # whether a block's keys and values can be recomputed from its ids (max_disk)

    # Ledger fields, declared by each dataclass subclass:
    pool_size: int
    write_context: int
    dtype: str
    sources: list[dict]
    blocks: list[str]
    seed: int
    update_count: int
    head: str | None
    pending: list[tuple[dict, dict]]
    updates: list[dict]
    dropped: int
    keep_blocks: bool
    lm: LoadedModel | None  # None: loaded as an index only (status, diff, forget)
    library: BlockSource | None  # where its committed blocks are; None: never stored

    # -- create, load, fork ------------------------------------------------------------

    @classmethod
    @abstractmethod
    def create(cls, lm: LoadedModel, *, pool_size: int | None = None, write_context: int | None = None,
               dtype: str | None = None, seed: int | None = None, block_format: str | None = None,
               write_scope: str | None = None) -> Memory:
        """An empty memory for this model (settings the kind does not choose are ignored)."""

    @classmethod
    @abstractmethod
    def load(cls, version: str, tensors: dict[str, torch.Tensor], meta: dict, lm: LoadedModel | None,
             library: BlockSource | None, *, states: bool = True) -> Memory:
        """A stored version; with `states` (and a model), ready to write and read."""

    def fork(self) -> Memory:
        """An independent copy that is never stored (evaluation). Tensors are shared: every
        update replaces them rather than writing into them."""
        return dataclasses.replace(
            self, sources=copy.deepcopy(self.sources), blocks=list(self.blocks), pending=[],
            updates=list(self.updates), keep_blocks=False, **self._forked(),
        )

    def _forked(self) -> dict:
        return {}

    def archive_in_ram(self, keep: bool) -> None:
        """For a memory that is never stored: whether to keep each update's tokens in RAM
        (its long-term tier) for reading within a budget."""
        self.keep_blocks = keep

    def use_block_format(self, name: str) -> None:
        """Write new blocks in this format (codec.FORMATS), where the kind has a choice."""
        return None

    def settings(self) -> dict:
        """What memory.json records about this memory when it is created."""
        return {"kind": self.kind, "pool_size": self.pool_size, "write_context": self.write_context,
                "dtype": self.dtype}

    @classmethod
    def create_for(cls, lm: LoadedModel, config) -> Memory:
        """An empty memory from the settings (`config.Settings`)."""
        return cls.create(lm, pool_size=config.pool_size, write_context=config.write_context,
                          block_format=config.block_format, write_scope=config.write_scope)

    # -- writing -----------------------------------------------------------------------

    def add_source(self, name: str, sha256: str) -> int:
        self.sources.append({"name": name, "sha256": sha256, "chunks": 0, "tokens": 0, "ingested": now()})
        return len(self.sources) - 1

    def live_source(self, identity: str | None) -> int | None:
        """The source that holds document `identity` now (the newest live one), if any."""
        if identity is None:
            return None
        found = [i for i, s in enumerate(self.sources) if s["name"] == identity and not s.get("forgotten")]
        return found[-1] if found else None

    def has_content(self, sha256: str) -> bool:
        return any(s["sha256"] == sha256 and not s.get("forgotten") and not s.get("partial") for s in self.sources)

    def chunk_blocks(self, source: int) -> list[tuple[str, list[int]]]:
        """The stored chunks of a document that a new revision of it may keep: (block id,
        the token ids it was written from), in chunk order. Empty where the kind cannot keep
        chunks (then an edited document is written again in full)."""
        return []

    def carry(self, old: int, new: int, kept: list[tuple[str, int, int]]) -> None:
        """Document `new` replaces `old`, keeping these blocks of it (block id, chunk index in
        the new text, tokens) with what the pool holds of them; the rest of `old` is forgotten.
        Only called with blocks `chunk_blocks` offered."""
        raise NotImplementedError(f"a {self.kind} memory cannot keep chunks")

    def check_chunks(self, name: str, chunks: list[Chunk]) -> list[str]:
        """Warnings about chunks this kind may not take well."""
        return []

    # where what the pool drops goes, for the warning about a document larger than the pool
    dropped_note: ClassVar[str] = "the rest stays readable in the long-term tier (ask --budget reads it)"

    def larger_than_pool(self, source: int) -> str | None:
        """A warning when one document wrote more than the pool holds."""
        src = self.sources[source]
        if self.written(src) <= self.pool_size:
            return None
        return (f"{src['name']} is larger than the pool ({self.written(src)} {self.unit} written, the pool holds "
                f"{self.pool_size}): the pool keeps {self.held_per_source()[source]}; {self.dropped_note}")

    @abstractmethod
    def write(self, ids: list[int], *, source: int, chunk: int, span: tuple[int, int] = (0, 0)) -> dict:
        """One update; returns its log entry ({tokens, dropped, seed, ...})."""

    def replay(self, block: str, meta: dict, source: int) -> dict | None:
        """Take a stored block into the pool again as the update that wrote it (repair: the
        version that held it was lost), with the drops that update made; returns its log
        entry, or None where the kind cannot (then the block stays outside the pool)."""
        return None

    @abstractmethod
    def forget(self, sources: set[int]) -> int:
        """Remove these documents from the pool; returns how much of the pool they held."""

    @abstractmethod
    def settle(self, written: list[str]) -> None:
        """The pending blocks were stored under these ids: point the pool at them."""

    @abstractmethod
    def version_record(self, op: str, message: str = "", **extra) -> tuple[dict[str, torch.Tensor], dict]:
        """The tensors and metadata of a version holding this state."""

    def committed(self, version: str) -> None:
        self.head = version
        self.updates = []
        self.dropped = 0

    def prepare_reads(self) -> None:  # noqa: B027 - most kinds need nothing
        """Called after a commit: build what the next read needs (nothing by default)."""

    # -- the ledger --------------------------------------------------------------------

    def next_seed(self) -> int:
        """The seed of the next update's drops, derived from the memory's seed and the update
        number, so that any sequence of updates can be replayed bit for bit."""
        return (self.seed + self.update_count * 0x9E3779B97F4A7C15) % (1 << 62)

    def log_update(self, source: int, chunk: int, tokens: int, dropped: int, seed: int) -> dict:
        update = {"update": self.update_count, "source": source, "chunk": chunk, "tokens": tokens,
                  "dropped": dropped, "seed": seed}
        self.update_count += 1
        self.updates.append(update)
        self.dropped += dropped
        src = self.sources[source]
        src["chunks"] += 1
        src["tokens"] += tokens
        return update

    def block_meta(self, source: int, chunk: int, span: tuple[int, int], tokens: int) -> dict:
        src = self.sources[source]
        return {"source": src["name"], "source_sha256": src["sha256"], "source_index": source, "chunk": chunk,
                "start": span[0], "end": span[1], "tokens": tokens, "update": self.update_count}

    def ledger_meta(self, op: str, message: str, held: int) -> dict:
        return {
            "kind": self.kind, "parent": self.head, "op": op, "time": now(), "message": message,
            "pool_size": self.pool_size, "write_context": self.write_context, "dtype": self.dtype,
            "seed": self.seed, "update_count": self.update_count,
            "blocks": self.blocks, "sources": self.sources, "updates": self.updates,
            "stats": {"tokens": held, "added": sum(u["tokens"] for u in self.updates), "dropped": self.dropped},
        }

    # -- reading -----------------------------------------------------------------------

    @abstractmethod
    def read(self, question: str, budget: int, sampling: Sampling) -> Reading:
        """Generate an answer from memory, reading at most `budget` units where the kind
        reads within a budget (0: the whole pool)."""

    # -- counts ------------------------------------------------------------------------

    @abstractmethod
    def __len__(self) -> int:
        """How much of the pool holds ingested text, in `unit`."""

    @abstractmethod
    def held_per_source(self) -> list[int]:
        """Per source (by index): how much of the pool it holds, in `unit`."""

    @abstractmethod
    def long_term_per_source(self) -> list[int]:
        """Per source: what is kept outside the pool and can still be read, in `unit`."""

    def written(self, source: dict) -> int:
        """How much a source wrote, in `unit`."""
        return source["tokens"]

    def per_update(self) -> float:
        """Mean units one update adds (the K of the forecast)."""
        return mean_update(self.sources, self.written)

    def forecast_base(self) -> int:
        """The pool the forecast starts from (what is held, in `unit`)."""
        return len(self)

    def source_counts(self) -> list[dict]:
        """For status: every live source with its counts (the keys are kept from before the
        kinds shared this code, so --json stays the same)."""
        held, long_term = self.held_per_source(), self.long_term_per_source()
        out = []
        for i, s in enumerate(self.sources):
            if s.get("forgotten"):
                continue
            row = {"name": s["name"], "sha256": s["sha256"], "chunks": s["chunks"], "tokens_written": s["tokens"],
                   "tokens_held": held[i], **self._long_term_entry(s, long_term[i]),
                   "written": self.written(s), "held": held[i], "long_term": long_term[i],  # in `unit`
                   "revision": s.get("revision", 1),  # 2 and up: updated by re-ingesting an edited document
                   "partial": bool(s.get("partial"))}  # a stopped ingest wrote only its first chunks
            for t in (10, 100):
                row[f"pool_after_{t}"] = round(forecast(held[i], self.forecast_base(), self.pool_size,
                                                        self.per_update(), t))
            out.append(row)
        return out

    def _long_term_entry(self, source: dict, long_term: int) -> dict:
        return {"tokens_long_term": long_term}

    def dropped_total(self) -> int:
        held = self.held_per_source()
        return sum(self.written(s) - held[i] for i, s in enumerate(self.sources) if not s.get("forgotten"))

    # -- stored versions ---------------------------------------------------------------

    @classmethod
    @abstractmethod
    def pool_keys(cls, tensors: dict[str, torch.Tensor], meta: dict) -> dict[tuple, tuple[str, str]]:
        """Every unit a version's pool holds, as a key that is equal across versions for the
        same stored unit, mapped to its document (sha256, name)."""

    @classmethod
    def held_in(cls, tensors: dict[str, torch.Tensor], meta: dict) -> int:
        """How much of a stored version's pool holds ingested text, in `unit`."""
        return len(tensors["block"])

    @classmethod
    def version_layers(cls, meta: dict) -> int:
        """How many keys of `pool_keys` make one unit."""
        return 1

    @classmethod
    def version_forecast(cls, meta: dict) -> tuple[float, int]:
        """(units per update, pool the forecast starts from) of a stored version."""
        return mean_update(meta["sources"], lambda s: s["tokens"]), meta["stats"]["tokens"]

    @classmethod
    def version_written(cls, source: dict) -> int:
        return source["tokens"]

    @classmethod
    @abstractmethod
    def without_blocks(cls, tensors: dict[str, torch.Tensor], meta: dict,
                       gone: list[int]) -> tuple[dict[str, torch.Tensor], dict]:
        """A version's tensors without the units of these blocks (indices into meta["blocks"]),
        blocks renumbered to the ones kept; and the metadata entries that change."""

    @classmethod
    @abstractmethod
    def held_blocks(cls, tensors: dict[str, torch.Tensor], meta: dict) -> set[str]:
        """The blocks a version holds rows of (in its pool or any tier the model reads itself)."""

    @classmethod
    def block_origins(cls, tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, dict]:
        """What a stored version tells of the blocks it names, without reading them: block id
        -> {source (the document's entry in meta["sources"]), chunk, tokens (where known),
        update}; for repair, when a block's own file is damaged. Empty where the kind keeps
        no such record."""
        return {}

    # -- evaluation (memllm bench) -----------------------------------------------------

    @abstractmethod
    def nll(self, ids: list[int]) -> tuple[float, int]:
        """Summed negative log-likelihood of `ids` read after the memory, and the count."""

    @abstractmethod
    def layer_stats(self) -> list[dict]:
        """Per layer: the mean and largest norm of what the pool stores."""

    def history(self) -> list[dict]:
        """Every update of an unsaved memory: {source, tokens, dropped, before} in `unit`,
        with the pool's size before it."""
        sizes = [u.get("rows", u["tokens"]) for u in self.updates]
        before = self.forecast_base() - sum(s - u["dropped"] for s, u in zip(sizes, self.updates, strict=True))
        out = []
        for size, u in zip(sizes, self.updates, strict=True):
            out.append({"source": self.sources[u["source"]]["name"], "tokens": size, "dropped": u["dropped"],
                        "before": before})
            before += size - u["dropped"]
        return out

    @classmethod
    def prompt_answer(cls, lm: LoadedModel, texts: list[str], question: str, sampling: Sampling) -> Iterator[int]:
        """The prompt baseline: the same texts in the prompt instead of memory."""
        raise ModelError(f"the prompt baseline needs a training-free model, not a {cls.kind} one")

    @classmethod
    def plain_forward(cls, lm: LoadedModel, ids: list[int]) -> None:
        """One forward pass of the model alone (the speed benchmark's reference)."""
        lm.engine.forward(torch.tensor(ids))

    @classmethod
    def window(cls, lm: LoadedModel) -> int:
        """Tokens a prompt may hold beside the question and the answer."""
        return lm.engine.max_positions - len(lm.prompt.sink_ids(lm.tokenizer)) - 1024

    @classmethod
    def baselines(cls) -> frozenset[str]:
        """The bench methods beside "memllm" that this kind can be compared with."""
        return frozenset()


def mean_update(sources: list[dict], written: Callable[[dict], int]) -> float:
    """Mean units per update so far (the K of the forecast)."""
    chunks = sum(s["chunks"] for s in sources)
    return sum(written(s) for s in sources) / chunks if chunks else float(CHUNK_TOKENS)


def forecast(held: float, pool: int, pool_size: int, per_update: float, updates: int) -> float:
    """Expected units of `held` still in the pool after `updates` more updates of
    `per_update` units each, from a pool of `pool`: while the pool fills nothing is dropped;
    once full, each update drops as many as it adds, uniformly: (1 - K/N) per update."""
    n = float(pool)
    for _ in range(updates):
        drop = max(0.0, n + per_update - pool_size)
        if n > 0:
            held *= 1 - min(drop, n) / n
        n = min(pool_size, n + per_update)
    return held
