"""How often ask's reader picks the question's own note: BM25's first against the model's
choice among BM25's first K (the question's log-likelihood after each block alone, plus
SCORE_WEIGHT times its BM25 score), on a memory kept by `memllm bench scale --keep`.

    python benchmarks/shortlist.py --home /tmp/memllm-bench-XXXX --questions 600 --offset 0
    python benchmarks/shortlist.py --home ... --questions 600 --offset 600  # a held-out set

The memory's gold notes are named nq/ROW.txt; questions are drawn from them in a fixed
shuffle (seed 1), `--offset` on. Prints, and writes with --out, the count of questions whose
own note each rule picks, for K = 2..6, weights 0 / 0.5 / 1 / 2, and shares of the best score.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from memllm_cli.bench.qa import load_items
from memllm_cli.memory import recall
from memllm_cli.memory.base import DTYPES
from memllm_cli.memory.free import sink
from memllm_cli.service import Memllm
from memllm_cli.text.bm25 import bm25_scores

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"


def judged(service: Memllm, questions: int, offset: int, most: int) -> list[dict]:
    """Per question: BM25's first `most` blocks, their scores and the model's fits."""
    memory, lm = service.load(), service.model()
    engine, tokenizer = lm.engine, lm.tokenizer
    shape = (engine.layers, engine.kv_heads, engine.head_dim)
    idx = recall.index(memory, tokenizer)
    where = {memory.sources[s]["name"]: k for k, s in enumerate(idx.columns["source"])
             if idx.columns["chunk"][k] == 0}
    items = [it for it in load_items(DATA, range(2000)) if f"nq/{it.row}.txt" in where]
    random.Random(1).shuffle(items)
    out = []
    for it in items[offset:offset + questions]:
        scores = bm25_scores(idx.retriever, it.question, len(idx))
        top = sorted(range(len(idx)), key=lambda k: -scores[k])[:most]
        top = [k for k in top if scores[k] > 0]
        ids = torch.tensor(lm.prompt.question_ids(tokenizer, it.question))
        start, end = lm.prompt.question_span(tokenizer, it.question)
        loaded, _ = recall.load_each([idx.candidate(k) for k in top], DTYPES[memory.dtype], shape)
        fits, _ = engine.judge(ids, [sink(lm) + pool for _, pool in loaded], start, end) if loaded else ([], None)
        gold = where[f"nq/{it.row}.txt"]
        out.append({"row": it.row, "top": top, "bm25": [scores[k] for k in top], "fit": fits,
                    "gold": gold, "gold_rank": sum(1 for x in scores if x > scores[gold])})
    return out


def picks(records: list[dict], k: int, weight: float, share: float = 0.0) -> int:
    right = 0
    for r in records:
        if not r["top"]:
            continue
        shortlisted = [i for i in range(min(k, len(r["top"]))) if r["bm25"][i] >= share * r["bm25"][0]]
        best = max(shortlisted, key=lambda i: r["fit"][i] + weight * r["bm25"][i])
        right += r["top"][best] == r["gold"]
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="MEMLLM_HOME of a kept bench scale memory")
    parser.add_argument("--memory", default="scale")
    parser.add_argument("--questions", type=int, default=600)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    service = Memllm(home=args.home, memory=args.memory)
    started = time.perf_counter()
    records = judged(service, args.questions, args.offset, 6)
    n = len(records)
    result = {
        "questions": n, "offset": args.offset, "seconds": round(time.perf_counter() - started, 1),
        "bm25_first": sum(r["top"][:1] == [r["gold"]] for r in records),
        "in_first_k": {k: sum(r["gold"] in r["top"][:k] for r in records) for k in range(1, 7)},
        "judged": {f"k={k} weight={w}": picks(records, k, w) for k in range(2, 7) for w in (0.0, 0.5, 1.0, 2.0)},
        "shared": {f"k=4 weight=1 share={s}": picks(records, 4, 1.0, s) for s in (0.5, 0.6, 0.7, 0.8)},
        "default": picks(records, recall.SHORTLIST, recall.SCORE_WEIGHT, recall.SHORTLIST_SHARE),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps({**result, "records": records}))


if __name__ == "__main__":
    main()
