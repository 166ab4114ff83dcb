"""The prototype's SQuAD retention experiment: does a paragraph survive k later ones?

For each item of shared/data/squad_v2_dev_5articles_retention_eval.json: write the question
paragraph, then its first k distractor paragraphs (one update each), then ask the item's two
questions. Compared: the same paragraphs in the prompt, and memories written with a write
context of 0 (each paragraph encoded on its own after the sink: the naive composition) and
of the whole pool (memllm's default).

    python benchmarks/squad_retention.py --items 30 --k 0 2 5 --write-context 0 all
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memllm_cli.bench.qa import is_correct
from memllm_cli.service import Memllm

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad_v2_dev_5articles_retention_eval.json"
WHOLE_POOL = 1 << 20  # a write context of at least the pool: each chunk written after the whole pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--items", type=int, default=30)
    parser.add_argument("--k", type=int, nargs="+", default=[0, 2, 5])
    parser.add_argument("--write-context", nargs="+", default=["0", "all"])
    parser.add_argument("--no-prompt", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    data = json.loads(args.data.read_text())
    paragraphs = {p["pid"]: f"{p['title']}\n{p['context']}" for p in data["paragraphs"]}
    items = data["items"][: args.items]
    service = Memllm(memory="squad")
    modes = ([] if args.no_prompt else ["prompt"]) + [f"memory-{wc}" for wc in args.write_context]
    results = []
    for k in args.k:
        for mode in modes:
            correct = total = 0
            t0 = time.perf_counter()
            for item in items:
                texts = [paragraphs[item["pid"]]] + [paragraphs[d] for d in item["distractors"][:k]]
                memory = None
                if mode != "prompt":
                    wc = mode.removeprefix("memory-")
                    memory = service.scratch_memory(write_context=WHOLE_POOL if wc == "all" else int(wc), seed=0)
                    for text in texts:
                        service.write_text(memory, text)
                for q in item["questions"]:
                    if memory is None:
                        answer = service.ask_with_text(q["question"], texts, max_new_tokens=args.max_new_tokens)
                    else:
                        answer = service.ask_in(memory, q["question"], max_new_tokens=args.max_new_tokens)
                    correct += is_correct("".join(answer), q["answers"])
                    total += 1
            row = {"k": k, "mode": mode, "correct": correct, "total": total,
                   "accuracy": round(correct / total, 4), "seconds": round(time.perf_counter() - t0, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
