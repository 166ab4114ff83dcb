"""Figures of the versioned store on the embedded model.

    python benchmarks/store.py --fills 1024 2048 4096

Fills a memory with NQ development passages (one `ingest` per passage group) up to each
fill, and at each fill measures: the disk bytes one more ingest + snapshot adds against the
bytes of the tokens it wrote; `snapshot create` and `snapshot rollback` times (median of 5);
the time to load HEAD's pool (keys and values) from disk (median of 5).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from memllm_cli.bench.qa import load_items
from memllm_cli.service import Memllm
from memllm_cli.text.sources import Document

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"


def timed(fn, repeat=5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--fills", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    items = load_items(args.data, range(0, 400))
    docs = [Document(f"nq-{i.row}", i.passage, hashlib.sha256(i.passage.encode()).hexdigest()) for i in items]
    rows = []
    with tempfile.TemporaryDirectory() as home:
        os.environ["MEMLLM_HOME"] = home
        service = Memllm(memory="bench")
        name = "bench"
        it = iter(docs)
        for fill in args.fills:
            while service.store.open(name).head() is None or service.status()["tokens"] < fill:
                service.ingest_documents([next(it) for _ in range(4)])
            before = service.store.open(name).disk_bytes()
            report = service.ingest_documents([next(it) for _ in range(4)])
            service.snapshot_create(f"at-{fill}")
            added = service.store.open(name).disk_bytes() - before
            token_bytes = report.tokens * 30 * 2 * 3 * 64 * 2  # fp16 keys + values, 30 layers, 3 KV heads of 64
            snap = timed(lambda n=iter(range(100)), f=fill: service.snapshot_create(f"t{f}-{next(n)}"))
            roll = timed(lambda: service.rollback("HEAD~1"))
            load = timed(lambda: service.load(states=True))
            row = {"fill": service.status()["tokens"], "ingest_tokens": report.tokens, "disk_added": added,
                   "token_bytes": token_bytes, "overhead": round(added / token_bytes - 1, 5),
                   "snapshot_ms": round(snap * 1000, 1), "rollback_ms": round(roll * 1000, 1),
                   "load_head_s": round(load, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
