"""Choosing ask's read budget, and whether answers and latency hold as a memory grows.

1. Sixteen NQ development passages, each ingested as its own document into one memory
   (a stored memory, as `memllm ingest` makes it); their sixteen questions asked with each
   read budget (0 = the whole pool, MemoryLLM's reading), beside the one-passage prompt.
2. Latency: the same memory grown with unrelated development passages to each of
   --sizes tokens ingested; ask time (first token, total for --max-tokens) with the budget.

    python benchmarks/budget.py --budgets 0 256 512 1024 2048 --sizes 4000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from memllm_cli.bench.qa import is_correct, load_items
from memllm_cli.service import Memllm
from memllm_cli.text.sources import Document

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"


def doc(name: str, text: str) -> Document:
    import hashlib

    return Document(name, text, hashlib.sha256(text.encode()).hexdigest())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--first-row", type=int, default=0)
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 256, 512, 1024, 2048])
    parser.add_argument("--sizes", type=int, nargs="*", default=[4000, 100000])
    parser.add_argument("--latency-budget", type=int, default=None, help="default: the configured read budget")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("MEMLLM_HOME", tempfile.mkdtemp(prefix="memllm-budget-"))

    items = load_items(args.data, range(args.first_row, args.first_row + 16))
    service = Memllm(memory="budget16")
    service.ingest_documents([doc(f"nq-{i.row}", i.passage) for i in items])
    results = {"rows": [i.row for i in items], "budgets": {}, "latency": []}
    prompt = sum(is_correct("".join(service.ask_with_text(i.question, [i.passage], max_new_tokens=args.max_tokens)),
                            i.answers) for i in items)
    results["one_passage_prompt"] = prompt
    print(f"one passage in the prompt: {prompt}/16", flush=True)
    for budget in args.budgets:
        correct, read = 0, []
        for item in items:
            answer = service.ask(item.question, max_new_tokens=args.max_tokens, budget=budget)
            correct += is_correct("".join(answer), item.answers)
            read.append(answer.info["read_tokens"])
        results["budgets"][budget] = {"correct": correct, "read_tokens": statistics.median(read)}
        print(f"budget {budget or 'whole pool'}: {correct}/16 (median {statistics.median(read)} tokens read)",
              flush=True)

    if args.sizes:
        grow = Memllm(memory="grow")
        pool = load_items(args.data, range(100, 2000))
        question = items[0].question
        ingested, at = 0, 0
        for size in sorted(args.sizes):
            batch = []
            while ingested < size and at < len(pool):
                batch.append(doc(f"nq-{pool[at].row}", pool[at].passage))
                ingested += len(pool[at].passage) // 4  # rough; the report below gives the real count
                at += 1
            t0 = time.perf_counter()
            report = grow.ingest_documents(batch)
            seconds = time.perf_counter() - t0
            total = sum(s["tokens_written"] for s in grow.status()["sources"])
            ingested = total
            runs = []
            for _ in range(4):
                t0 = time.perf_counter()
                answer = grow.ask(question, max_new_tokens=args.max_tokens, budget=args.latency_budget)
                "".join(answer)
                runs.append((answer.first_token_seconds, time.perf_counter() - t0, answer.info["read_tokens"]))
            runs = runs[1:]  # the first warms up
            row = {"ingested_tokens": total, "ingest_tokens_per_s": round(report.tokens / seconds, 1),
                   "first_token_s": round(statistics.median(r[0] for r in runs), 3),
                   "ask_s": round(statistics.median(r[1] for r in runs), 3), "read_tokens": runs[0][2],
                   "disk_bytes": grow.status()["disk_bytes"]}
            results["latency"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
