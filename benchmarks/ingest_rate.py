"""Ingest speed against a plain forward pass at a full pool, for short notes and full chunks.

    python benchmarks/ingest_rate.py --write-context 256 512 all --notes 40

A memory of the embedded model (pool 4,096 tokens) is filled with NQ development passages
(one update each), then each timed update is a note of --short tokens (NQ passages cut to
that length) or of 512 tokens (passages packed), written with `FreeMemory.write` as ingest
does (blocks kept for the commit). Each write is timed beside a plain forward pass of the
same tokens (no memory), alternately, so both see the same machine; the ratio is
tokens/s of the writes over tokens/s of the plain passes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memllm_cli.bench.qa import load_items
from memllm_cli.service import Memllm

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"
WHOLE_POOL = 1 << 20  # a write context of at least the pool: each chunk written after the whole pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--write-context", nargs="+", default=["256", "all"])
    parser.add_argument("--notes", type=int, default=40, help="timed updates of each size")
    parser.add_argument("--short", type=int, default=120, help="tokens of a short note")
    parser.add_argument("--block-format", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    service = Memllm(memory="rate")
    lm = service.model()
    items = load_items(args.data, range(0, 600))
    passages = [lm.tokenizer(it.passage, add_special_tokens=False)["input_ids"] for it in items]
    short = [p[:args.short] for p in passages if len(p) >= args.short]
    flat = [i for p in passages for i in p]
    full = [flat[i:i + 512] for i in range(0, len(flat) - 512, 512)]
    fill, timed_short, timed_full = short[:80], short[80:80 + args.notes], full[:args.notes]
    results = {"threads": torch.get_num_threads(), "short_tokens": args.short, "runs": []}
    for wc in args.write_context:
        memory = service.scratch_memory(pool_size=4096, write_context=WHOLE_POOL if wc == "all" else int(wc),
                                        seed=0, keep_blocks=True, block_format=args.block_format)
        source = memory.add_source("rate", "")
        at = 0
        while len(memory) < memory.pool_size:
            memory.write(fill[at % len(fill)], source=source, chunk=at)
            memory.settle([f"fill-{at}"])  # as a commit does: the block is then stored, not pending
            at += 1
        run = {"write_context": wc, "block_format": memory.block_format}
        for label, notes in (("short", timed_short), ("512", timed_full)):
            lm.engine.forward(torch.tensor(notes[0]))  # warm-up
            plain = written = 0.0
            tokens = 0
            for k, ids in enumerate(notes):
                t0 = time.perf_counter()
                lm.engine.forward(torch.tensor(ids))
                plain += time.perf_counter() - t0
                t0 = time.perf_counter()
                memory.write(ids, source=source, chunk=at + k)
                written += time.perf_counter() - t0
                memory.settle([f"{label}-{at + k}"])
                tokens += len(ids)
            run[label] = {"plain_tokens_per_s": round(tokens / plain, 1),
                          "ingest_tokens_per_s": round(tokens / written, 1), "ratio": round(plain / written, 3)}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
