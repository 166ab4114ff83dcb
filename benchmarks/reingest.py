"""Re-ingesting an edited file: the cost of a one-line edit to a 100-chunk document.

A document of NQ development passages (one paragraph each) long enough for --chunks
chunks is ingested into a fresh stored memory; then one line in its middle is edited and
the file ingested again (only the changed chunks are written), and, for reference, the
same edit ingested with --force (every chunk written again).

    python benchmarks/reingest.py --chunks 100
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

from memllm_cli.service import Memllm

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"


def passages(path: Path, count: int) -> list[str]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            ctx = json.loads(line)["ctxs"][0]
            out.append(f"{ctx['title']}: {ctx['text']}")
            if len(out) == count:
                break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["MEMLLM_HOME"] = home
        service = Memllm(model=args.model)
        tokenizer = service.model().tokenizer
        rows = passages(args.data, 2000)
        # about 4 passages make a chunk of 512 tokens; take enough for the chunks asked
        text, k = "", 0
        while len(tokenizer(text)["input_ids"]) < args.chunks * 470 and k < len(rows):
            text += rows[k] + "\n\n"
            k += 1
        path = Path(home) / "notes.txt"
        path.write_text(text)
        t = time.perf_counter()
        first = service.ingest([str(path)])
        first_s = time.perf_counter() - t
        lines = text.split("\n\n")
        middle = len(lines) // 2
        lines[middle] = lines[middle] + " This line was edited."
        path.write_text("\n\n".join(lines))
        t = time.perf_counter()
        edit = service.ingest([str(path)])
        edit_s = time.perf_counter() - t
        lines[middle] += " Again."
        path.write_text("\n\n".join(lines))
        t = time.perf_counter()
        forced = service.ingest([str(path)], force=True)
        forced_s = time.perf_counter() - t
        print(json.dumps({
            "model": service.model().name, "chunks": first.chunks, "tokens": first.tokens,
            "first_ingest_s": round(first_s, 2),
            "edited": {"chunks_written": edit.chunks, "chunks_kept": edit.reused, "seconds": round(edit_s, 2)},
            "forced": {"chunks_written": forced.chunks, "seconds": round(forced_s, 2)},
        }, indent=2))


if __name__ == "__main__":
    main()
