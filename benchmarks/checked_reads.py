"""The cost of checking what ask reads: each block read for an answer is hashed (its bytes
must match its id) and checked for NaNs and shape. Measured against reading the same
blocks unchecked (memory-mapped), beside the whole ask.

    python benchmarks/checked_reads.py --passages 200 --questions 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from memllm_cli.bench.qa import load_items
from memllm_cli.memory import recall
from memllm_cli.memory.base import DTYPES
from memllm_cli.service import Memllm
from memllm_cli.text.sources import Document

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--passages", type=int, default=200)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    items = load_items(args.data, range(args.passages))
    with tempfile.TemporaryDirectory() as home:
        os.environ["MEMLLM_HOME"] = home
        service = Memllm(model=args.model)
        service.ingest_documents([Document.of(f"nq-{it.row}.txt", it.passage) for it in items])
        mem = service.load()
        lm = service.model()
        engine = lm.engine
        shape = (engine.layers, engine.kv_heads, engine.head_dim)
        idx = recall.index(mem, lm.tokenizer)
        checked, unchecked, asks, blocks = [], [], [], []
        for it in items[: args.questions]:
            selected = recall.select(idx, it.question, service.budget())
            blocks.append(len(selected))
            t = time.perf_counter()
            recall.read(selected, DTYPES[mem.dtype], shape)
            checked.append(time.perf_counter() - t)
            t = time.perf_counter()
            for c in selected:
                service.repo.read_block_rows(c.block, None, ("keys", "values"))
            unchecked.append(time.perf_counter() - t)
            t = time.perf_counter()
            answer = service.ask(it.question, max_new_tokens=32)
            "".join(answer)
            asks.append(time.perf_counter() - t)
        cost = statistics.median(c - u for c, u in zip(checked, unchecked, strict=True))
        print(json.dumps({
            "model": lm.name, "passages": args.passages, "questions": args.questions,
            "blocks_read_median": statistics.median(blocks),
            "checked_read_ms_median": round(1000 * statistics.median(checked), 2),
            "unchecked_read_ms_median": round(1000 * statistics.median(unchecked), 2),
            "check_cost_ms_median": round(1000 * cost, 2),
            "ask_s_median": round(statistics.median(asks), 3),
            "check_share_of_ask": round(cost / statistics.median(asks), 4),
        }, indent=2))


if __name__ == "__main__":
    main()
