"""Speed of the official MemoryLLM computation (trained kind) on random weights.

With `--config 8b` the model has the real MemoryLLM-8B configuration (32 layers, d 4096,
N = 12,800 memory rows per layer, LoRA r 16, two adapters), built directly on the device,
so no checkpoint download is needed to time it. Reports, as medians over --repeat runs:
    ingest   tokens/s of inject + update for chunks of --chunk-tokens tokens, and the ratio
             to a plain forward pass of the same tokens through the same decoder (no memory)
    ask      time to the first token of a question read with the whole pool, and decode tokens/s
    memory   peak GPU memory (CUDA) or peak RSS (CPU)

    python benchmarks/trained_speed.py --config 8b --device cuda --dtype bfloat16
    python benchmarks/trained_speed.py --config tiny           # the CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memllm_cli.model.official import Config, MPlus, OfficialMemoryLLM  # noqa: E402
from memllm_cli.random_checkpoints import MEMORYLLM_8B, trained_config, trained_tensors  # noqa: E402

CONFIGS = {"tiny": {}, "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
                                 "num_attention_heads": 8, "num_key_value_heads": 4, "num_tokens": 256,
                                 "num_blocks": 10, "vocab_size": 32000}, "8b": MEMORYLLM_8B}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--variant", choices=["main", "mplus"], default="main")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--chunks", type=int, default=6, help="chunks ingested per repeat")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))

    raw = trained_config(args.variant, **CONFIGS[args.config])
    build = time.perf_counter()
    tensors = trained_tensors(raw, dtype=dtype, device=args.device)
    parts = {"model.embed_tokens": args.device, "model.norm": args.device, "lm_head": args.device,
             **{f"model.layers.{i}": args.device for i in range(raw["num_hidden_layers"])}}
    config = Config.from_dict(raw)
    model = (MPlus if config.variant == "mplus" else OfficialMemoryLLM)(config, tensors, parts)
    del tensors
    build = time.perf_counter() - build
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    vocab = raw["vocab_size"]

    def ids(n: int) -> torch.Tensor:
        return torch.randint(10, vocab, (n,), generator=g)

    chunk = ids(args.chunk_tokens)
    model.update(model.inject(chunk), torch.Generator().manual_seed(1))  # warm-up (and first write)
    plain, ingest, first, decode = [], [], [], []
    for r in range(args.repeat):
        plain.append(timed(lambda: model.forward(chunk, memory=False), args.device))  # the decoder, no memory rows
        chunks = [ids(args.chunk_tokens) for _ in range(args.chunks)]

        def write(chunks=chunks, r=r):
            for k, c in enumerate(chunks):
                model.update(model.inject(c), torch.Generator().manual_seed(100 * r + k))

        ingest.append(timed(write, args.device) / args.chunks)
        question = ids(args.question_tokens)
        stream = model.stream(question, args.answer_tokens, stop_ids=frozenset())
        sync(args.device)
        start = time.perf_counter()
        next(stream)
        sync(args.device)
        first.append(time.perf_counter() - start)
        rest = timed(lambda stream=stream: sum(1 for _ in stream), args.device)
        decode.append((args.answer_tokens - 1) / rest if rest > 0 else float("nan"))

    def spread(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    peak = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {
        "config": args.config, "variant": config.variant, "device": args.device, "dtype": str(dtype)[6:],
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "machine": platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
        "layers": config.layers, "hidden": config.hidden, "pool_rows": len(model.rows[0]), "K": config.num_tokens,
        "chunk_tokens": args.chunk_tokens, "chunks": args.chunks, "repeat": args.repeat,
        "build_seconds": round(build, 1),
        "plain_forward_tokens_per_s": spread([args.chunk_tokens / t for t in plain]),
        "ingest_tokens_per_s": spread([args.chunk_tokens / t for t in ingest]),
        "ingest_over_plain": statistics.median(plain) / statistics.median(ingest),
        "ask_first_token_s": spread(first),
        "decode_tokens_per_s": spread(decode),
        "peak_memory_bytes": peak,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
