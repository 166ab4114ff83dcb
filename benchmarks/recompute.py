"""What an evicted block costs (max_disk): recomputing its keys and values against reading them.

    python benchmarks/recompute.py --notes 40 --json docs/benchmarks/recompute.json

A stored memory of the embedded model is written from NQ development passages (one short
note each, ~130 tokens) and 512-token chunks (passages packed), in the default block format.
For each block: the time to read and decode it from disk with the page cache dropped for
that file (posix_fadvise DONTNEED: a cold read from this machine's disk), from the page cache
(warm), and to recompute it from its token ids after eviction (a forward pass after the sink,
then the same encoding). The break-even disk speed is the block's bytes over the recompute
time: on a disk slower than that, recomputing wins.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from memllm_cli.bench.qa import load_items
from memllm_cli.service import Memllm
from memllm_cli.text.sources import Document

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"


def cold(path: Path) -> None:
    """Drop one file's pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--notes", type=int, default=40, help="blocks of each size")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    items = load_items(args.data, range(0, 400))
    with tempfile.TemporaryDirectory(prefix="memllm-recompute-") as home:
        service = Memllm(memory="recompute")
        service = service.elsewhere(Path(home), "recompute")
        tokenizer = service.model().tokenizer
        short = [Document.of(f"note-{i}.txt", it.passage) for i, it in enumerate(items[:args.notes])]
        flat = [i for it in items[args.notes:]
                for i in tokenizer(it.passage + "\n", add_special_tokens=False)["input_ids"]]
        long = [Document.of(f"chunk-{k}.txt", tokenizer.decode(flat[k * 500:(k + 1) * 500]))
                for k in range(args.notes)]
        warmup = [Document.of(f"fill-{i}.txt", it.passage) for i, it in enumerate(items[300:340])]
        service.ingest_documents(warmup)  # the pool is full before the timed blocks are written
        service.ingest_documents(short + long)
        mem = service.load()
        repo = service.repo
        by_name = {}
        for block in mem.blocks:
            meta = repo.block_meta(block)
            by_name[meta["source"].rsplit("/", 1)[-1]] = (block, meta)
        rows = {"note": [], "chunk": []}
        for label, docs in (("note", short), ("chunk", long)):
            for doc in docs:
                block, meta = by_name[doc.name]
                path = repo.folder / "blocks" / f"{block}.safetensors"
                found = meta.get("codec")
                cold(path)
                cold_s = timed(lambda b=block, f=found: mem.block_states(b, f))
                warm_s = min(timed(lambda b=block, f=found: mem.block_states(b, f)) for _ in range(3))
                rows[label].append({"block": block, "tokens": meta["tokens"], "bytes": path.stat().st_size,
                                    "cold_s": cold_s, "warm_s": warm_s})
        for label in rows:  # evicted here whether or not the pool holds them: only the time is measured
            for row in rows[label]:
                repo.evict_block(row["block"])
                mem.block_states(row["block"], None)  # warm-up of the code path for the first one
                row["recompute_s"] = min(timed(lambda b=row["block"]: mem.block_states(b, None)) for _ in range(2))
        summary = {"threads": torch.get_num_threads(), "block_format": mem.block_format, "sizes": {}}
        for label, found in rows.items():
            done = found
            med = {k: statistics.median(r[k] for r in done) for k in ("tokens", "bytes", "cold_s", "warm_s",
                                                                       "recompute_s")}
            med["break_even_MB_s"] = med["bytes"] / med["recompute_s"] / 1e6
            med["blocks"] = len(done)
            summary["sizes"][label] = med
            print(f"{label}: {len(done)} blocks, median {med['tokens']:.0f} tokens, {med['bytes'] / 1e3:.0f} kB: "
                  f"cold read {med['cold_s'] * 1e3:.1f} ms, warm {med['warm_s'] * 1e3:.1f} ms, recompute "
                  f"{med['recompute_s'] * 1e3:.1f} ms; recomputing wins below {med['break_even_MB_s']:.1f} MB/s")
    if args.json:
        args.json.write_text(json.dumps({**summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
