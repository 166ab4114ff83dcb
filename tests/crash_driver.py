"""Kill memllm with SIGKILL at random points of its write operations, then check the store.

Run by tests/test_crash.py in a fresh process:  python tests/crash_driver.py HOME MODEL KILLS SEED
Each round forks a child that loops over random ingests, snapshots, rollbacks, forgets and
gcs on one memory, and kills it after a random delay. After every kill: `verify` must pass,
and HEAD must be the last version the child saw committed (or one it committed but had not
yet reported, which then counts as seen). At the end, re-running the ingest of every document must complete the work.
Prints one JSON object.
"""

import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # fork-safe: the parent never starts an OpenMP pool

from memllm_cli.errors import MemllmError  # noqa: E402
from memllm_cli.memory.free import sink  # noqa: E402
from memllm_cli.service import Memllm  # noqa: E402
from memllm_cli.text.sources import Document  # noqa: E402

home, model, kills, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.environ["MEMLLM_HOME"] = home
WORDS = "garden shed water compost volunteer harvest pumpkin Tuesday evening library".split()
rng = random.Random(seed)
DOCS = []
for i in range(10):
    text = " ".join(rng.choice(WORDS) for _ in range(40 + 15 * i)) + f". Document {i}."
    DOCS.append(Document(f"doc{i}.txt", text, hashlib.sha256(text.encode()).hexdigest()))
SEEN = Path(home) / "heads.log"
SERVICE = Memllm(model=model, pool_size=512, write_context=256)
sink(SERVICE.model())  # load the model and its sink before forking, so each child starts at once


def child(round_seed: int) -> None:
    service = SERVICE
    r = random.Random(round_seed)
    while True:
        op = r.choice(["ingest", "ingest", "ingest", "snapshot", "rollback", "forget", "gc"])
        try:
            if op == "ingest":
                service.ingest_documents(r.sample(DOCS, 2), force=r.random() < 0.3)
            elif op == "snapshot":
                service.snapshot_create(f"s{r.randrange(10**9)}")
            elif op == "rollback":
                service.rollback("HEAD~1")
            elif op == "forget":
                live = [s["name"] for s in service.status()["sources"]]
                if live:
                    service.forget([r.choice(live)])
            else:
                service.gc()
        except MemllmError:
            pass  # e.g. HEAD~1 before the second version
        head = service.repo.head() if service.repo.exists() else None
        with open(SEEN, "a") as f:
            f.write(f"{head}\n")
            f.flush()
            os.fsync(f.fileno())


def last_seen() -> str | None:
    lines = SEEN.read_text().split("\n")[:-1] if SEEN.exists() else []
    return lines[-1] if lines and lines[-1] != "None" else None


failures, landed = [], 0
for k in range(kills):
    before = last_seen()
    pid = os.fork()
    if pid == 0:
        try:
            child(seed * 1000 + k)
        finally:
            os._exit(0)
    time.sleep(rng.uniform(0.05, 0.8))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    service = Memllm(model=model)
    if not service.repo.exists():
        continue
    report = service.repo.verify()
    if not report.ok:
        failures.append({"kill": k, "damaged": report.damaged})
        break
    head, seen = service.repo.head(), last_seen()
    landed += seen != before
    if head != seen and (head is None or service.repo.version_meta(head).get("parent") != seen):
        failures.append({"kill": k, "head": head, "last_seen": seen})
    elif head != seen:  # a commit the child made but did not live to report: the next round starts from it
        with open(SEEN, "a") as f:
            f.write(f"{head}\n")

service = Memllm(model=model)
service.ingest_documents(DOCS)
live = {s["sha256"] for s in service.status()["sources"]}
missing = [d.name for d in DOCS if d.sha256 not in live]
print(json.dumps({
    "kills": kills, "kills_after_progress": landed, "failures": failures, "missing_after_rerun": missing,
    "verify_after_rerun": service.verify()["ok"], "versions": len(service.repo.versions()),
}))
