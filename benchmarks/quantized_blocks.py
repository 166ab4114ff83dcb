"""Compact blocks: how answers change when the blocks ask reads are stored quantized.

NQ development passages, each ingested as its own document into one stored memory (float16
blocks); each question's blocks (the default read within the budget) are read as
stored, and round-tripped through KIVI-style quantization (memllm_cli/model/quant.py: keys
per channel over groups of tokens, values per token over groups of channels) at 8 and 4
bits. Reported per format: correct answers (32 tokens, greedy), the largest absolute
difference of the first answer token's logits against fp16, and bytes per token of the
blocks as stored (keys and values, plus 4 bytes of token id; fp16: 2 bytes an element).

    python benchmarks/quantized_blocks.py --passages 16 --first-row 0
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from memllm_cli.bench.qa import is_correct, load_items
from memllm_cli.memory import codec, recall
from memllm_cli.memory.free import sink
from memllm_cli.model.pool import Pool
from memllm_cli.service import Memllm
from memllm_cli.text.sources import Document

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"
# memllm's block formats (memllm_cli/memory/codec.py), KIVI's own grouping of 32, and one value
# scale per token and layer (all heads' channels: 192 for SmolLM2) for comparison
FORMATS = {**codec.FORMATS, "int4-g32": {"bits": 4, "key_group": 32, "value_group": 32},
           "int4-layer": {"bits": 4, "key_group": 128, "value_group": 192},
           "int4-layer-k256": {"bits": 4, "key_group": 256, "value_group": 192}}


# 8-bit statistics with fewer value groups: two a layer (96 channels), one a layer (192)
FORMATS.update({"int4-s8-v96": {**codec.FORMATS["int4-s8"], "value_group": 96},
                "int4-s8-v192": {**codec.FORMATS["int4-s8"], "value_group": 192}})


def round_trip(states: dict, fmt: dict | None) -> tuple[dict, int]:
    """The block's keys and values as a block of this format reads them back, and its bytes
    (keys and values as stored, plus 4 bytes of token id a token, as on disk)."""
    keys, values = states["keys"], states["values"]  # (T, L, Hkv, hd)
    found = codec.resolved(fmt, values)
    stored = codec.encode(keys, values, found)
    size = sum(t.numel() * t.element_size() for t in stored.values()) + 4 * len(keys)
    return codec.decode(stored, found), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--first-row", type=int, default=0)
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    args = parser.parse_args()
    formats = {name: FORMATS[name] for name in ["float16", *args.formats]}  # float16 first: the reference
    items = load_items(args.data, range(args.first_row, args.first_row + args.passages))
    results = {name: {"correct": 0, "max_logit_error": 0.0, "bytes": 0, "tokens": 0} for name in formats}
    with tempfile.TemporaryDirectory() as home:
        os.environ["MEMLLM_HOME"] = home
        service = Memllm(model=args.model, block_format="float16")  # what is read is what was computed
        service.ingest_documents([Document.of(f"nq-{it.row}.txt", it.passage) for it in items])
        mem = service.load()
        lm = service.model()
        idx = recall.index(mem, lm.tokenizer)
        for it in items:
            selected = recall.select(idx, it.question, service.budget())
            ids = torch.tensor(lm.prompt.question_ids(lm.tokenizer, it.question))
            reference = None
            for name, fmt in formats.items():
                keys, values = [], []
                for c in selected:
                    states, size = round_trip(c.load(), fmt)
                    keys.append(states["keys"].to(torch.float16))
                    values.append(states["values"].to(torch.float16))
                    results[name]["bytes"] += size
                    results[name]["tokens"] += c.tokens
                context = sink(lm) + Pool(torch.cat(keys).permute(1, 2, 0, 3).contiguous(),
                                          torch.cat(values).permute(1, 2, 0, 3).contiguous())
                logits = lm.engine.forward(ids, context)[-1]
                reference = logits if reference is None else reference
                results[name]["max_logit_error"] = max(results[name]["max_logit_error"],
                                                       float((logits - reference).abs().max()))
                answer = lm.tokenizer.decode(list(lm.engine.generate(ids, context, max_new_tokens=args.max_tokens,
                                                                     stop_ids=lm.stop_ids())),
                                             skip_special_tokens=True)
                results[name]["correct"] += is_correct(answer, it.answers)
    for r in results.values():
        r["bytes_per_token"] = round(r.pop("bytes") / max(1, r.pop("tokens")))
        r["max_logit_error"] = round(r["max_logit_error"], 4)
    print(json.dumps({"model": lm.name, "passages": args.passages, "first_row": args.first_row,
                      "questions": len(items), "formats": results}, indent=2))


if __name__ == "__main__":
    main()
