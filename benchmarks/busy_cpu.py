"""Ingest beside other busy processes (issue 25): the rate of `memllm ingest` of short notes
alone, and beside one and two CPU-bound processes, with memllm's thread sizing and with
PyTorch's default of one thread per core (MEMLLM_THREADS = the CPU count, as before).

    python benchmarks/busy_cpu.py --notes 200 --json docs/benchmarks/busy-cpu.json

Each run is `memllm ingest --json` of --notes NQ development passages (one file each, rows
0-199 by default) into a fresh home, in a subprocess, on the embedded model; its rate is notes
over the ingest's own seconds (the model's load included, alike in every run). The other
processes start first and run until the measured ingest ends: `yes > /dev/null` (single-
threaded hogs), or other memllm ingests of a long document into homes of their own (torch
processes, with the same thread policy as the one measured). Nothing else should run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memllm_cli.bench.qa import load_items

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"


def ingest(folder: Path, home: Path, threads: int | None) -> dict:
    env = {**os.environ, "MEMLLM_HOME": str(home), "MEMLLM_NO_SERVER": "1"}
    env.pop("MEMLLM_THREADS", None)
    if threads:
        env["MEMLLM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-m", "memllm_cli", "ingest", "--json", "-q", str(folder)], env=env,
                         capture_output=True, text=True, timeout=7200)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout)


def others(kind: str, count: int, work: Path, threads: int | None) -> list[subprocess.Popen]:
    procs = []
    for i in range(count):
        if kind == "yes":
            procs.append(subprocess.Popen(["yes"], stdout=subprocess.DEVNULL))
            continue
        env = {**os.environ, "MEMLLM_HOME": str(work / f"other-{i}"), "MEMLLM_NO_SERVER": "1"}
        env.pop("MEMLLM_THREADS", None)
        if threads:
            env["MEMLLM_THREADS"] = str(threads)
        procs.append(subprocess.Popen([sys.executable, "-m", "memllm_cli", "ingest", "-q", str(work / "long.md")],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(8 if kind == "memllm" else 1)  # past their model's load: computing when the measured one starts
    return procs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--notes", type=int, default=200)
    parser.add_argument("--others", nargs="+", default=["yes", "memllm"], choices=["yes", "memllm"])
    parser.add_argument("--counts", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=["auto", "per-core"], choices=["auto", "per-core"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    cpus = len(os.sched_getaffinity(0))
    items = load_items(args.data, range(0, args.notes))
    runs = []
    with tempfile.TemporaryDirectory(prefix="busy-cpu-") as tmp:
        work = Path(tmp)
        notes = work / "notes"
        notes.mkdir()
        for it in items:
            (notes / f"nq-{it.row}.md").write_text(it.passage + "\n")
        (work / "long.md").write_text("\n\n".join(it.passage for it in load_items(args.data, range(200, 1200))))
        for policy in args.policies:
            threads = None if policy == "auto" else cpus
            alone = None
            for kind in args.others:
                for count in args.counts:
                    if count == 0 and alone is not None:
                        continue
                    procs = others(kind, count, work, threads) if count else []
                    try:
                        report = ingest(notes, work / f"home-{len(runs)}", threads)  # a fresh home each run
                    finally:
                        for p in procs:
                            p.kill()
                            p.wait()
                    rate = report["files"] / report["seconds"] * 60
                    if count == 0:
                        alone = rate
                    run = {"policy": policy, "others": kind if count else "none", "count": count,
                           "notes": report["files"], "seconds": round(report["seconds"], 2),
                           "notes_per_minute": round(rate, 1), "of_alone": round(rate / alone, 3)}
                    runs.append(run)
                    print(json.dumps(run), flush=True)
    result = {"cpus": cpus, "notes": args.notes, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
