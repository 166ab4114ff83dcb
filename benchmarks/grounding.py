"""Grounded answers: choosing the thresholds that flag answers memory does not support.

The first --rows NQ development passages are ingested into one stored memory, each as its
own document. Then the questions of those rows (their passage is in memory) and of the
next --rows rows (it is not) are asked with the default read budget. Each answer gets its
relevance and support (memllm_cli/memory/grounding.py) and whether it is correct; the
thresholds are swept, and the pair kept that flags the most not-ingested answers while
ingested questions lose under 5% of their correct answers.

    python benchmarks/grounding.py --rows 100 --out grounding.json
    python benchmarks/grounding.py --from-json a.json b.json   # choose on several runs together

The shipped thresholds were chosen on the runs at --first-row 0, 200 and 400 together
(--max-loss 0.04) and checked on --first-row 600 (docs/benchmarks.md, "Grounded answers").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from pathlib import Path

from memllm_cli.bench.qa import is_correct, load_items
from memllm_cli.memory import grounding
from memllm_cli.service import Memllm
from memllm_cli.text.sources import Document

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"


def measure(args) -> list[dict]:
    items = load_items(args.data, range(args.first_row, args.first_row + 2 * args.rows))
    ingested, absent = items[: args.rows], items[args.rows:]
    rows = []
    with tempfile.TemporaryDirectory() as home:
        os.environ["MEMLLM_HOME"] = home
        service = Memllm(model=args.model)
        service.ingest_documents([Document.of(f"nq-{it.row}.txt", it.passage) for it in ingested])
        for group, chosen in (("ingested", ingested), ("absent", absent)):
            for it in chosen:
                answer = service.ask(it.question, max_new_tokens=args.max_tokens)
                text = "".join(answer)
                rows.append({"row": it.row, "group": group, "question": it.question, "answer": text.strip(),
                             "correct": is_correct(text, it.answers), "relevance": answer.info["relevance"],
                             "support": answer.info["support"],
                             "read": [c["source"] for c in answer.info.get("sources", [])]})
    return rows


def rates(rows: list[dict], rel: float, sup: float) -> dict:
    """What thresholds (rel, sup) flag: the share of correct ingested answers (lost), of
    ingested answers and of absent answers."""
    def flagged(r):
        return r["relevance"] < rel or r["support"] < sup

    ingested = [r for r in rows if r["group"] == "ingested"]
    absent = [r for r in rows if r["group"] == "absent"]
    correct = [r for r in ingested if r["correct"]]
    return {"min_relevance": rel, "min_support": sup,
            "correct_lost": round(sum(map(flagged, correct)) / max(1, len(correct)), 3),
            "ingested_flagged": round(sum(map(flagged, ingested)) / max(1, len(ingested)), 3),
            "absent_flagged": round(sum(map(flagged, absent)) / max(1, len(absent)), 3)}


def sweep(rows: list[dict], max_loss: float) -> dict:
    """The thresholds that flag the most absent answers while losing under `max_loss` of the
    correct ingested ones (fewer lost on a tie), beside the shipped ones."""
    best = None
    for rel, sup in itertools.product([i / 20 for i in range(21)], [i / 20 for i in range(21)]):
        entry = rates(rows, rel, sup)
        if entry["correct_lost"] < max_loss and (best is None or (entry["absent_flagged"], -entry["correct_lost"])
                                                 > (best["absent_flagged"], -best["correct_lost"])):
            best = entry
    ingested = [r for r in rows if r["group"] == "ingested"]
    absent = [r for r in rows if r["group"] == "absent"]
    return {"ingested": len(ingested), "ingested_correct": sum(r["correct"] for r in ingested),
            "absent": len(absent), "absent_correct": sum(r["correct"] for r in absent), "best": best,
            "current": rates(rows, grounding.MIN_RELEVANCE, grounding.MIN_SUPPORT)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--first-row", type=int, default=0)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-loss", type=float, default=0.05)
    parser.add_argument("--from-json", type=Path, nargs="+", help="sweep the answers of earlier runs (--out files) "
                        "together instead of asking")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [r for f in args.from_json for r in json.loads(f.read_text())["answers"]] if args.from_json \
        else measure(args)
    result = {"rows": args.rows, "first_row": args.first_row, **sweep(rows, args.max_loss)}
    if args.out:
        args.out.write_text(json.dumps({**result, "answers": rows}, indent=1))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
