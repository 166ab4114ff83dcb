"""Ask a memory kept by `memllm bench scale --keep` the run's questions again, at its largest
size, with today's reader; optionally after fitting a copy of it to a disk budget.

    python benchmarks/reask.py --home /tmp/memllm-bench-XXXX --result scale.json --out reask.json
    cp -a /tmp/memllm-bench-XXXX /tmp/copy && rm /tmp/copy/memories/scale/reads.jsonl
    python benchmarks/reask.py --home /tmp/copy --result scale.json --max-disk 1GB

Fitting evicts the least recently read blocks: remove the copy's reads.jsonl first, or the
blocks the run's own questions read are the ones kept. Reports, beside the run's answers,
how many answers are right, how many read the question's own note, and the first token
(median, p95): the same measures as the run's last row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memllm_cli.bench.qa import is_correct, load_items
from memllm_cli.bench.scale import quantiles
from memllm_cli.cli.render import disk_size
from memllm_cli.service import Memllm

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="MEMLLM_HOME of a kept bench scale memory")
    parser.add_argument("--result", type=Path, required=True, help="that run's JSON (bench scale --json/--out)")
    parser.add_argument("--max-disk", default=None, help="fit the memory to this budget first (it evicts!)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    run = json.loads(args.result.read_text())["runs"][-1]
    items = {it.row: it for it in load_items(DATA, range(2000))}
    budget = disk_size(args.max_disk) if args.max_disk else None
    service = Memllm(home=args.home, memory="scale", max_disk=budget)
    fitted = None
    if budget is not None:
        with service.repo.lock(60):
            fitted = service.fit_disk()
    rows, firsts = [], []
    for asked in run["asked"]:
        item = items[asked["row"]]
        answer = service.ask(item.question, max_new_tokens=32)
        text = "".join(answer)
        firsts.append(answer.first_token_seconds or answer.seconds)
        read = [s["source"] for s in answer.info.get("sources", [])]
        rows.append({"row": item.row, "memory": is_correct(text, item.answers), "run_memory": asked["memory"],
                     "prompt": asked["prompt"], "read_gold": f"nq/{item.row}.txt" in read,
                     "judged": answer.info.get("judged"), "first_token_s": round(firsts[-1], 4)})
    result = {
        "home": str(args.home), "max_disk": budget, "fit": fitted, "disk_bytes": service.repo.disk_bytes(),
        "tokens": run["tokens"], "questions": len(rows),
        "memory_correct": sum(r["memory"] for r in rows), "run_memory_correct": sum(r["run_memory"] for r in rows),
        "prompt_correct": sum(r["prompt"] for r in rows), "read_gold": sum(r["read_gold"] for r in rows),
        "first_token_s": quantiles(firsts),  # as bench scale reports them
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "asked": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "asked"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
