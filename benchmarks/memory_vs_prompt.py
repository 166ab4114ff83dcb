"""Accuracy of answers from memory against the same passages in the prompt.

Groups of G consecutive development rows of NQ-open-oracle: the G gold passages are written
into a fresh memory (one update per passage, in order), then each of the G questions is
asked; the prompt baseline puts the same G passages in the prompt. Rows 2000+ are reserved
for acceptance evaluation and refused here.

    python benchmarks/memory_vs_prompt.py --group 8 --groups 5 --write-context 0 512 all
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from memllm_cli.bench.qa import Score, load_items
from memllm_cli.memory import free
from memllm_cli.model.pool import Pool
from memllm_cli.service import Memllm
from memllm_cli.text import prompts

DEV_ROWS = 2000
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"
WHOLE_POOL = 1 << 20  # a write context of at least the pool: each chunk written after the whole pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--group", type=int, default=8, help="passages per memory")
    parser.add_argument("--groups", type=int, default=5)
    parser.add_argument("--write-context", nargs="+", default=["all"], help="pool tokens each chunk is written after")
    parser.add_argument("--template", default=None, help="question template, {question} is replaced")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-prompt", action="store_true", help="skip the prompt baseline")
    parser.add_argument("--closed-book", action="store_true", help="also ask with no passages")
    parser.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16 or float16")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    end = args.start + args.group * args.groups
    if end > DEV_ROWS:
        sys.exit(f"rows {args.start}..{end - 1} reach past the development split (0..{DEV_ROWS - 1})")
    if args.template:
        prompts.QUESTION = args.template
    items = load_items(args.data, range(args.start, end))
    service = Memllm(memory="eval", dtype=args.dtype)
    groups = [items[i : i + args.group] for i in range(0, len(items), args.group)]

    results: dict[str, dict] = {}

    def run(label: str, answer) -> None:
        score, t0 = Score(), time.perf_counter()
        for group in groups:
            for item, text in answer(group):
                score.add(item, text)
        results[label] = {"correct": score.correct, "total": score.total, "accuracy": round(score.accuracy, 4),
                          "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{label:28s} {score.correct:3d}/{score.total} = {score.accuracy:.1%}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def answers_prompt(group):
        passages = [i.passage for i in group]
        for item in group:
            answer = service.ask_with_text(item.question, passages, max_new_tokens=args.max_new_tokens)
            yield item, "".join(answer)

    def answers_closed(group):
        for item in group:
            yield item, "".join(service.ask_with_text(item.question, [], max_new_tokens=args.max_new_tokens))

    def answers_memory(spec):
        # spec: "all" or a number of pool tokens each chunk is written after, optionally with
        # "-nosink" (no pinned prefix at all) or "-truepos" (each chunk rotated at the position
        # it will be read at, instead of right after its write context).
        wc, _, variant = spec.partition("-")
        write_context = WHOLE_POOL if wc == "all" else int(wc)

        def answer(group):
            lm = service.model()
            lm.cache.pop("sink", None)  # the pinned prefix, encoded again on first use
            if variant == "nosink":
                lm.cache["sink"] = Pool.empty(lm.engine.layers, lm.engine.kv_heads, lm.engine.head_dim, torch.float32)
            memory = service.scratch_memory(write_context=write_context, seed=0)
            original = lm.engine.encode
            if variant == "truepos":
                sink = len(free.sink(lm))
                lm.engine.encode = lambda ids, context=None, start=None: original(
                    ids, context, start=sink + len(memory)
                )
            try:
                for item in group:
                    service.write_text(memory, item.passage)
            finally:
                lm.engine.encode = original
            for item in group:
                yield item, "".join(service.ask_in(memory, item.question, max_new_tokens=args.max_new_tokens))
            lm.cache.pop("sink", None)

        return answer

    if args.closed_book:
        run("closed book", answers_closed)
    if not args.no_prompt:
        run(f"prompt, {args.group} passages", answers_prompt)
    for spec in args.write_context:
        run(f"memory, write context {spec}", answers_memory(spec))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
