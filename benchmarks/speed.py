"""Ingest throughput and ask latency of the embedded model at several memory fills.

    python benchmarks/speed.py --fills 1024 2048 4096 7168 --write-context all 1024

For each write context: fill a pool to each target with NQ development passages (chunks
of at most 512 tokens) and report ingest tokens/s beside a plain forward pass over the
same chunks (no memory); at each fill, the time to first token and decode tokens/s of a
question (median of --repeat runs after one warm-up), and the pool's bytes per token as
the store writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from memllm_cli.bench.qa import load_items
from memllm_cli.service import CHUNK_TOKENS, Memllm
from memllm_cli.text.chunking import chunk_document

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"
WHOLE_POOL = 1 << 20  # a write context of at least the pool: each chunk written after the whole pool
QUESTION = "Who received the first Nobel Prize in Physics?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--fills", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--pool-size", type=int, default=None)
    parser.add_argument("--write-context", nargs="+", default=["all"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16 or float16")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    service = Memllm(memory="speed", dtype=args.dtype)
    lm = service.model()
    # Pack development passages into chunks of up to 512 tokens, as `memllm ingest` does.
    text = "\n\n".join(item.passage for item in load_items(args.data, range(0, 1500)))
    chunks = [c.ids for c in chunk_document(text, lm.tokenizer, CHUNK_TOKENS)]
    pool_size = args.pool_size or max(args.fills)
    results = {"threads": torch.get_num_threads(), "pool_size": pool_size, "dtype": args.dtype, "runs": []}

    plain_seconds, plain_tokens = 0.0, 0
    for ids in chunks[:8]:
        t0 = time.perf_counter()
        lm.engine.forward(torch.tensor(ids))
        plain_seconds += time.perf_counter() - t0
        plain_tokens += len(ids)
    plain_rate = plain_tokens / plain_seconds
    print(f"plain forward: {plain_rate:.0f} tokens/s (8 chunks, no memory)", flush=True)
    results["plain_forward_tokens_per_s"] = round(plain_rate, 1)

    for wc in args.write_context:
        write_context = WHOLE_POOL if wc == "all" else int(wc)
        memory = service.scratch_memory(pool_size=pool_size, write_context=write_context, seed=0)
        source = memory.add_source("bench", "")
        chunk_iter = iter(chunks)
        written, seconds = 0, 0.0
        for fill in sorted(args.fills):
            while len(memory) < fill:
                ids = next(chunk_iter)
                t0 = time.perf_counter()
                memory.write(ids, source=source, chunk=0)
                seconds += time.perf_counter() - t0
                written += len(ids)
            ttft, decode = [], []
            for i in range(args.repeat + 1):
                answer = service.ask_in(memory, QUESTION, max_new_tokens=args.new_tokens)
                for _ in answer:
                    pass
                if i:  # the first run warms up
                    ttft.append(answer.first_token_seconds)
                    rest = len(answer.ids) - 1
                    decode.append(rest / (answer.seconds - answer.first_token_seconds) if rest else 0.0)
            run = {
                "write_context": wc, "fill": len(memory), "ingest_tokens_per_s": round(written / seconds, 1),
                "ingest_ratio_to_plain": round((written / seconds) / plain_rate, 3),
                "ttft_s": round(statistics.median(ttft), 3), "ttft_spread_s": round(max(ttft) - min(ttft), 3),
                "decode_tokens_per_s": round(statistics.median(decode), 1),
                "disk_bytes_per_token": service.disk_bytes_per_token(memory),
            }
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
