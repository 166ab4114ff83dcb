"""What entropy coding the 4-bit codes saves and costs (block format int4-s8-zstd).

    python benchmarks/entropy_coding.py --home HOME --memory NAME --blocks 200 \
        --json docs/benchmarks/entropy-coding.json

Reads up to `--blocks` stored blocks of a memory (any quantized format: their codes are taken
as int4-s8 stores them) and reports, for the key and value codes apart: their order-0 byte
entropy (the bound of a coder that sees one byte at a time), and for each zstd level the
compressed share and compress / decompress speed (one thread); then the time to decode the
blocks whole (`codec.decode`) as int4-s8 and as int4-s8-zstd, per 1,024 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
import zstandard
from safetensors import safe_open

from memllm_cli.memory import codec

LEVELS = (1, 3, 9, 19)


def plain_blocks(folder: Path, count: int) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """Up to `count` quantized blocks as int4-s8 tensors (codes plain) with their codec."""
    out = []
    for path in sorted((folder / "blocks").glob("*.safetensors"))[:count]:
        with safe_open(path, framework="pt") as f:
            found = codec.of(json.loads((f.metadata() or {}).get("memllm", "{}")))
            if found is None or found.get("bits") != 4:
                continue
            tensors = {name: f.get_tensor(name) for name in codec.names(found)}
        tensors = codec.plain_codes(tensors, found)
        out.append((tensors, {k: v for k, v in found.items() if k != "entropy"}))
    return out


def entropy(data: bytes) -> float:
    counts = Counter(data)
    return -sum(c / len(data) * math.log2(c / len(data)) for c in counts.values()) / 8


def timed(fn, repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _level(raws: list[bytes], level: int) -> dict:
    """One zstd level on these code tensors: the compressed share, compress and decompress MB/s."""
    size = sum(map(len, raws))
    compressor, decompressor = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
    frames = [compressor.compress(r) for r in raws]
    write = timed(lambda: [compressor.compress(r) for r in raws], 1 if level > 9 else 3)
    read = timed(lambda: [decompressor.decompress(f) for f in frames])
    return {"share": round(sum(map(len, frames)) / size, 4),
            "compress_MB_s": round(size / write / 1e6), "decompress_MB_s": round(size / read / 1e6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="MEMLLM_HOME of the memory")
    parser.add_argument("--memory", default="default")
    parser.add_argument("--blocks", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    blocks = plain_blocks(args.home / "memories" / args.memory, args.blocks)
    if not blocks:
        raise SystemExit("no 4-bit blocks in that memory")
    tokens = sum(t["values.scale"].shape[0] for t, _ in blocks)
    result = {"blocks": len(blocks), "tokens": tokens, "codes": {}}
    for kv in ("keys", "values"):
        raws = [t[f"{kv}.codes"].contiguous().numpy().tobytes() for t, _ in blocks]
        size = sum(map(len, raws))
        row = {"bytes": size, "order0_entropy": round(entropy(b"".join(raws)), 4), "zstd": {}}
        for level in LEVELS:
            row["zstd"][level] = _level(raws, level)
        result["codes"][kv] = row
        print(kv, json.dumps(row))
    coded = [(codec.entropy_coded(t), {**found, "entropy": "zstd"}) for t, found in blocks]
    for name, stored in (("int4-s8", blocks), ("int4-s8-zstd", coded)):
        seconds = timed(lambda s=stored: [codec.decode(t, found) for t, found in s])
        per_token = sum(sum(x.numel() * x.element_size() for x in t.values()) for t, _ in stored) / tokens
        result[name] = {"decode_ms_per_1024_tokens": round(seconds / tokens * 1024 * 1000, 2),
                        "keys_values_bytes_per_token": round(per_token, 1)}
        print(name, json.dumps(result[name]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
