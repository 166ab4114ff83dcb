"""memllm serve against in-process: ask wall time from the CLI, concurrent clients during an
ingest, and ingest speed.

    python benchmarks/serve.py --json docs/benchmarks/serve.json

In a temporary home, with the embedded model: `memllm serve` is started on a socket of its
own; 40 NQ development passages are ingested through it (one document each) and the same 40
into a second memory in this process. Then:
- `memllm ask --max-tokens 16 QUESTION` run as a command, 5 times through the warm server and 5
  times with --no-server (each a new process: import, model load, memory load, answer);
- 8 clients asking 5 questions each (the JSON API, 16 tokens) while a 9th ingests 20 more
  passages: every request's latency, failures, throughput, and which version the answers read;
- ingest tokens/s as each ingest reports it (the time spent writing, not loading).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from memllm_cli.bench.qa import load_items
from memllm_cli.service import Memllm
from memllm_cli.text.sources import Document

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nq-open-oracle.jsonl.gz"


def quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 3),
            "p95": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 3),
            "max": round(ordered[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    items = load_items(args.data, range(0, 80))
    docs = [{"name": f"nq-{it.row}.txt", "text": it.passage} for it in items]
    with tempfile.TemporaryDirectory(prefix="memllm-serve-bench-") as tmp:
        home, sock = Path(tmp) / "home", Path(tmp) / "serve.sock"
        env = {**os.environ, "MEMLLM_HOME": str(home), "MEMLLM_SOCKET": str(sock), "MEMLLM_MEMORY": "bench"}
        env.pop("MEMLLM_MODEL", None)
        server = subprocess.Popen([sys.executable, "-m", "memllm_cli", "serve"], env=env, stderr=subprocess.PIPE,
                                  text=True)
        server.stderr.readline()
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        http = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://memllm", timeout=600)
        try:
            result = run(http, env, docs, items, home)
        finally:
            server.terminate()
            server.wait(timeout=120)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def run(http: httpx.Client, env: dict, docs: list[dict], items, home: Path) -> dict:
    out: dict = {"threads": os.cpu_count()}
    served = http.post("/api/memories/bench/ingest", json={"documents": docs[:40]}).json()
    os.environ["MEMLLM_HOME"] = str(home)
    local = Memllm(memory="local").ingest_documents([Document.of(d["name"], d["text"]) for d in docs[:40]])
    out["ingest_tokens_per_s"] = {"server": round(served["tokens"] / served["seconds"], 1),
                                  "in_process": round(local.tokens / local.seconds, 1)}
    question = items[0].question
    walls = {}
    for label, extra in (("server", []), ("in_process", ["--no-server"])):
        times = []
        for _ in range(5):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "memllm_cli", *extra, "ask", "--max-tokens", "16", question],
                                  env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - started)
            assert done.returncode == 0, done.stderr
        walls[label] = quantiles(times)
    out["ask_wall_s"] = walls

    latencies, failures, versions = [], [], set()
    lock = threading.Lock()
    heads_before = {e["version"] for e in http.get("/api/memories/bench/log").json()}

    def client(k: int) -> None:
        for q in items[k * 5:(k + 1) * 5]:
            started = time.perf_counter()
            try:
                got = http.post("/api/memories/bench/ask", json={"question": q.question, "max_tokens": 16})
                ok = got.status_code == 200
            except httpx.HTTPError as err:
                ok, got = False, err
            with lock:
                latencies.append(time.perf_counter() - started)
                if not ok:
                    failures.append(str(got))
                else:
                    versions.update(s["source"] for s in got.json().get("sources", []))

    def ingester() -> None:
        got = http.post("/api/memories/bench/ingest", json={"documents": docs[40:60]})
        if got.status_code != 200:
            failures.append(got.text)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)] + [threading.Thread(target=ingester)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    committed = {e["version"] for e in http.get("/api/memories/bench/log").json()}
    out["concurrent"] = {"clients": 8, "questions": len(latencies), "failed": len(failures),
                         "latency_s": quantiles(latencies), "answers_per_s": round(len(latencies) / wall, 2),
                         "wall_s": round(wall, 1), "versions_during": len(committed - heads_before),
                         "documents_read": len(versions), "failures": failures[:3]}
    return out


if __name__ == "__main__":
    main()
