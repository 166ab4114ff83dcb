"""The Python API: everything a command does is one call here.

    from memllm_cli.service import Memllm
    m = Memllm(memory="notes")
    m.ingest(["notes.txt"])
    print("".join(m.ask("When is the meeting?")))

`Memllm` is the session (model, ingest, ask, status), its history (log, snapshots,
rollback, diff, forget, verify, gc, export, import) and the in-RAM memories the
benchmarks use, over one memory's store handle.
"""

from __future__ import annotations

from ..memory.base import CHUNK_TOKENS
from .evaluation import Evaluation
from .history import History
from .session import READ_BUDGET, Answer, IngestReport, sampling


class Memllm(History, Evaluation):
    pass


__all__ = ["CHUNK_TOKENS", "READ_BUDGET", "Answer", "IngestReport", "Memllm", "sampling"]
