"""memllm bench: the MemoryLLM paper's measurements on local data, baselines side by side.

    retention   the knowledge-retention protocol: write a question's gold passage, then k
                unrelated passages packed into updates of up to 512 tokens, then ask; for
                memllm, the same text in the prompt (cut from the left to the window), BM25
                over the same chunks (top chunks in the prompt up to a token budget), and
                closed book (what the model knew already)
    speed       ingest tokens/s against a plain forward pass, and ask latency at 25/50/100%
                of the pool, against the prompt holding the same tokens
    integrity   after U updates of unrelated text: fresh-fact retention, held-out perplexity
                and per-layer pool statistics, against their values at U = 0

The benchmarks talk to a `Subject` (the model with its memory), so their logic is tested
with a fake model that counts calls; `subject.ServiceSubject` is the real one, over the
service's public API.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import InputError
from ..progress import NoProgress, Progress
from .qa import SCORER_VERSION, Item, is_correct, load_items, normalise

DEFAULT_KS = (0, 1, 2, 5, 10, 20, 50)
DEV_ROWS = range(0, 2000)  # nq-open-oracle rows for development; 2000-2654 are reserved for acceptance
CHUNK_TOKENS = 512
METHODS = ("memllm", "pool", "prompt", "bm25", "closed-book")  # pool: MemoryLLM's reading of the whole pool
DEFAULTS = {"retention": 10, "speed": 3, "integrity": 20}  # --questions: each default run fits 15 min on 2 cores


class Subject(Protocol):
    """A model with memory, as the benchmarks see it."""

    name: str
    pool_size: int  # N: what the memory holds at most (tokens, or rows per layer)
    window: int  # tokens the prompt baselines may hold

    def supports(self, method: str) -> bool: ...
    def count(self, text: str) -> int: ...
    def new_memory(self, seed: int, *, archive: bool = True) -> Any: ...  # archive: keep a long-term tier
    def new_prompt_memory(self) -> Any | None: ...  # a prompt built chunk by chunk (a KV cache), or None
    def room(self, memory: Any) -> int: ...  # tokens a memory takes before it must drop
    def held_tokens(self, memory: Any) -> int: ...
    def fork(self, memory: Any) -> Any: ...  # a copy whose own updates are archived
    def write(self, memory: Any, text: str, name: str) -> int: ...  # returns the updates made
    def ask(self, memory: Any, question: str, *, whole_pool: bool = False) -> str: ...
    def ask_timed(self, memory: Any, question: str) -> tuple[float, int, float]: ...
    def ask_text(self, texts: list[str], question: str) -> str: ...  # the prompt baselines
    def ask_text_timed(self, texts: list[str], question: str) -> tuple[float, int, float]: ...
    def held(self, memory: Any) -> dict[str, float]: ...  # share of each document still held
    def updates(self, memory: Any) -> list[dict]: ...  # {source, tokens, dropped, before}: every update so far
    def nll(self, memory: Any, text: str) -> tuple[float, int]: ...  # summed NLL of text read after memory
    def pool_stats(self, memory: Any) -> list[dict]: ...  # per layer
    def plain_forward(self, text: str) -> None: ...
    def disk_bytes_per_token(self, memory: Any) -> float | None: ...


# -- data ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    path: Path
    sha256: str
    rows: range
    items: list[Item]

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "rows": f"{self.rows.start}-{self.rows.stop - 1}"}


def load_data(path: Path | None, rows: range = DEV_ROWS) -> Data:
    if path is None:
        raise InputError("no evaluation data given",
                         hint="pass --data FILE (NQ-open with gold passages, e.g. nq-open-oracle.jsonl.gz)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such data file")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    items = load_items(path, rows)
    if not items:
        raise InputError(f"{path} has no rows in {rows.start}-{rows.stop - 1}")
    return Data(path, digest, rows, items)


def parse_rows(spec: str) -> range:
    """"0-1999" -> range(0, 2000)."""
    try:
        start, _, stop = spec.partition("-")
        out = range(int(start), int(stop or start) + 1)
    except ValueError:
        raise InputError(f"bad row range {spec!r}", hint="use FIRST-LAST, e.g. 0-1999") from None
    if not out:
        raise InputError(f"empty row range {spec!r}")
    return out


def unrelated(items: list[Item], item: Item) -> list[Item]:
    """Passages of other rows that contain none of the item's answers."""
    answers = [normalise(a) for a in item.answers if normalise(a)]
    return [other for other in items if other.row != item.row and other.passage != item.passage
            and not any(a in normalise(other.passage) for a in answers)]


def pack(texts: list[str], subject: Subject, limit: int = CHUNK_TOKENS) -> list[str]:
    """Whole passages joined into updates of at most `limit` tokens (a longer passage is
    one update of its own, which the subject splits)."""
    out, current, size = [], [], 0
    for text in texts:
        n = subject.count(text) + 2
        if current and size + n > limit:
            out.append("\n\n".join(current))
            current, size = [], 0
        current.append(text)
        size += n
    if current:
        out.append("\n\n".join(current))
    return out


def accuracy(correct: int, total: int) -> dict:
    p = correct / total if total else 0.0
    return {"correct": correct, "total": total, "accuracy": round(p, 4),
            "stderr": round(math.sqrt(p * (1 - p) / total), 4) if total else 0.0}


# -- retention ----------------------------------------------------------------------------


def retention(subject: Subject, data: Data, *, questions: int, seed: int, ks: Sequence[int] = DEFAULT_KS,
              methods: Sequence[str] = METHODS, bm25_budget: int = 1024,
              progress: Progress | None = None) -> dict:
    """The paper's knowledge-retention protocol, one memory per question, asked after each
    k in turn (the distractors between two k are packed and written between the asks)."""
    progress = progress or NoProgress()
    ks = sorted(set(ks))
    if any(k < 0 for k in ks):
        raise InputError("k must be >= 0")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(sorted(unknown))}", hint=f"choose from {', '.join(METHODS)}")
    skipped = [m for m in methods if not subject.supports(m)]
    methods = [m for m in methods if subject.supports(m)]
    rng = random.Random(seed)
    chosen = rng.sample(data.items, min(questions, len(data.items)))
    scores = {m: {k: 0 for k in ks} for m in methods}
    survival = {k: {"paper": [], "expected": [], "measured": []} for k in ks}
    details = []
    progress.start(len(chosen) * len(ks), "retention")
    started = time.perf_counter()
    for q, item in enumerate(chosen):
        pool = unrelated(data.items, item)
        distractors = random.Random(seed * 1_000_003 + item.row).sample(pool, min(max(ks), len(pool)))
        run = _Run(subject, subject.new_memory(seed + q) if {"memllm", "pool"} & set(methods) else None,
                   subject.new_prompt_memory() if "prompt" in methods else None)
        run.add(item.passage, "gold")
        memory, chunks = run.memory, run.chunks
        closed = subject.ask_text([], item.question) if "closed-book" in methods else None
        done, record = 0, {"row": item.row, "question": item.question, "answers": item.answers, "k": {}}
        for k in ks:
            for text in pack([d.passage for d in distractors[done:k]], subject):
                run.add(text, f"distractors-{k}")
            done = k
            answers = {}
            if memory is not None:
                if "memllm" in methods:
                    answers["memllm"] = subject.ask(memory, item.question)
                if "pool" in methods:
                    answers["pool"] = subject.ask(memory, item.question, whole_pool=True)
                later = _after(subject.updates(memory), "gold")
                full = [u for u in later if u["dropped"]]  # updates that found the pool full
                size = statistics.mean(u["tokens"] for u in full) if full else 0.0
                survival[k]["paper"].append(max(0.0, 1 - size / subject.pool_size) ** len(full))
                survival[k]["expected"].append(math.prod(1 - u["dropped"] / u["before"] for u in later if u["before"]))
                survival[k]["measured"].append(subject.held(memory).get("gold", 0.0))
            if "prompt" in methods:
                answers["prompt"] = (subject.ask(run.prompt, item.question) if run.prompt is not None
                                     else subject.ask_text(_cut_left(chunks, subject), item.question))
            if "bm25" in methods:
                answers["bm25"] = subject.ask_text(bm25_top(chunks, item.question, subject, bm25_budget), item.question)
            if closed is not None:
                answers["closed-book"] = closed
            for method, answer in answers.items():
                scores[method][k] += is_correct(answer, item.answers)
            record["k"][k] = {m: {"answer": a.strip()[:200], "correct": is_correct(a, item.answers)}
                              for m, a in answers.items()}
            progress.advance(1, f"retention: question {q + 1}/{len(chosen)}, k={k}")
        details.append(record)
    progress.finish()
    return {
        "benchmark": "retention", "data": data.describe(), "scorer": SCORER_VERSION,
        "settings": {"questions": len(chosen), "seed": seed, "ks": ks, "methods": list(methods),
                     "methods_not_supported": skipped,
                     "bm25_budget_tokens": bm25_budget, "update_tokens": CHUNK_TOKENS},
        "rows_used": sorted(i.row for i in chosen),
        "results": {m: {str(k): accuracy(scores[m][k], len(chosen)) for k in ks} for m in methods},
        "survival": {str(k): {name: _mean(values) for name, values in v.items()} for k, v in survival.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "details": details,
    }


@dataclasses.dataclass
class _Run:
    """One question's memory and prompt, written chunk by chunk."""

    subject: Subject
    memory: Any
    prompt: Any  # the prompt baseline prefilled chunk by chunk while it fits; then None
    chunks: list[str] = dataclasses.field(default_factory=list)

    def add(self, text: str, name: str) -> None:
        self.chunks.append(text)
        if self.memory is not None:
            self.subject.write(self.memory, text, name)
        if self.prompt is not None:
            if self.subject.count(text) + 2 <= self.subject.room(self.prompt):
                self.subject.write(self.prompt, text, name)
            else:
                self.prompt = None  # from here on: the whole prompt, cut from the left, each time


def _cut_left(chunks: list[str], subject: Subject) -> list[str]:
    """The prompt baseline's text: the newest chunks that fit the window (the oldest cut)."""
    kept, size = [], 0
    for text in reversed(chunks):
        size += subject.count(text)
        if size > subject.window:
            break
        kept.append(text)
    return kept[::-1]


def bm25_top(chunks: list[str], question: str, subject: Subject, budget: int) -> list[str]:
    """The chunks BM25 ranks highest for the question, best first, up to `budget` tokens,
    placed in their original order (as a retrieval-augmented prompt would)."""
    from ..text.bm25 import bm25_index, bm25_scores

    scores = bm25_scores(bm25_index(chunks), question, len(chunks))
    order = sorted(range(len(chunks)), key=lambda i: -scores[i])
    picked, size = [], 0
    for i in order:
        n = subject.count(chunks[i])
        if size + n > budget:
            if not picked:  # the best chunk alone is over the budget: try the next one
                continue
            break
        picked.append(i)
        size += n
    return [chunks[i] for i in sorted(picked)]


def _after(updates: list[dict], source: str) -> list[dict]:
    """The updates after the first one that wrote `source`."""
    first = next((i for i, u in enumerate(updates) if u["source"] == source), len(updates))
    return updates[first + 1:]


def _mean(values: list[float]) -> float | None:
    return round(statistics.mean(values), 4) if values else None


# -- speed --------------------------------------------------------------------------------


def speed(subject: Subject, data: Data, *, questions: int, seed: int, fills: Sequence[float] = (0.25, 0.5, 1.0),
          progress: Progress | None = None) -> dict:
    """Ingest throughput against a plain forward pass; ask latency at memory fills, beside
    the prompt holding the same text. Medians and spreads over `questions` asks after one
    warm-up."""
    progress = progress or NoProgress()
    rng = random.Random(seed)
    items = rng.sample(data.items, len(data.items))
    texts = pack([i.passage for i in items], subject)
    asked = [i.question for i in items[:questions + 1]]
    progress.start(len(fills) * 2 + 1, "speed")
    started = time.perf_counter()
    plain = []
    for text in texts[:3] + texts[:3]:  # the first three warm up
        t0 = time.perf_counter()
        subject.plain_forward(text)
        plain.append((subject.count(text), time.perf_counter() - t0))
    plain_rate = sum(n for n, _ in plain[3:]) / sum(s for _, s in plain[3:])
    progress.advance(1)
    memory = subject.new_memory(seed)
    written, runs, seconds, held_texts, it = 0, [], 0.0, [], iter(texts)
    for fill in sorted(fills):
        target = int(fill * subject.pool_size)
        segment_tokens, segment_seconds = 0, 0.0
        while subject.held_tokens(memory) < target:
            try:
                text = next(it)
            except StopIteration:
                raise InputError("not enough data to fill the memory") from None
            t0 = time.perf_counter()
            subject.write(memory, text, "fill")
            segment_seconds += time.perf_counter() - t0
            segment_tokens += subject.count(text)
            held_texts.append(text)
        written += segment_tokens
        seconds += segment_seconds
        progress.advance(1, f"speed: asking at {fill:.0%}")
        memory_runs = [subject.ask_timed(memory, q) for q in asked]
        prompt_texts = _cut_left(held_texts, subject)
        prompt_runs = [subject.ask_text_timed(prompt_texts, q) for q in asked] if subject.supports("prompt") else []
        runs.append({
            "fill": fill, "held": subject.held_tokens(memory),
            "ingest_tokens_per_s": round(segment_tokens / segment_seconds, 1) if segment_seconds else None,
            "ingest_over_plain": round(segment_tokens / segment_seconds / plain_rate, 3) if segment_seconds else None,
            "memllm": _latency(memory_runs[1:]), "prompt": _latency(prompt_runs[1:]),
            "prompt_tokens": sum(subject.count(t) for t in prompt_texts),
        })
        progress.advance(1)
    progress.finish()
    return {
        "benchmark": "speed", "data": data.describe(),
        "settings": {"questions": questions, "seed": seed, "fills": list(fills), "update_tokens": CHUNK_TOKENS},
        "plain_forward_tokens_per_s": round(plain_rate, 1),
        "ingest_tokens_per_s": round(written / seconds, 1) if seconds else None,
        "ingest_over_plain": round(written / seconds / plain_rate, 3) if seconds else None,
        "runs": runs,
        "peak_rss_bytes": peak_rss(),
        "disk_bytes_per_token": subject.disk_bytes_per_token(memory),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _latency(runs: list[tuple[float, int, float]]) -> dict | None:
    """runs: (first token seconds, tokens, total seconds)."""
    if not runs:
        return None
    ttft = [r[0] for r in runs]
    decode = [(r[1] - 1) / (r[2] - r[0]) for r in runs if r[1] > 1 and r[2] > r[0]]
    return {
        "first_token_s": _spread(ttft), "decode_tokens_per_s": _spread(decode),
    }


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}


def peak_rss() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


# -- integrity ----------------------------------------------------------------------------


def integrity(subject: Subject, data: Data, *, questions: int, seed: int, updates: int = 1000,
              held_out: int = 5, progress: Progress | None = None) -> dict:
    """After U updates of unrelated text, measured at U = 0, 10, 100, ... up to `updates`:
    the retention of `questions` freshly written facts, the perplexity of held-out text read
    after the memory, and per-layer pool statistics."""
    progress = progress or NoProgress()
    rng = random.Random(seed)
    shuffled = rng.sample(data.items, len(data.items))
    facts = shuffled[:questions]
    heldout = shuffled[questions:questions + held_out]
    answers = [normalise(a) for f in facts for a in f.answers if normalise(a)]
    stream = [i for i in shuffled[questions + held_out:] if not any(a in normalise(i.passage) for a in answers)]
    if not stream:
        raise InputError("not enough data for the unrelated updates")
    checkpoints = sorted({0, updates} | {10 ** e for e in range(1, 7) if 10 ** e < updates})
    progress.start(updates + len(checkpoints), "integrity")
    memory = subject.new_memory(seed, archive=False)  # the pool only: RAM stays flat over 10^6 updates
    done, results = 0, []
    started = time.perf_counter()
    for point in checkpoints:
        while done < point:
            subject.write(memory, stream[done % len(stream)].passage, "stream")
            done += 1
            progress.advance(1, f"integrity: update {done}/{updates}")
        probe = subject.fork(memory)
        for fact in facts:
            subject.write(probe, fact.passage, f"fact-{fact.row}")
        correct = sum(is_correct(subject.ask(probe, f.question), f.answers) for f in facts)
        nll, count = 0.0, 0
        for text in heldout:
            total, n = subject.nll(memory, text.passage)
            nll, count = nll + total, count + n
        stats = subject.pool_stats(probe)
        results.append({
            "updates": point, "retention": accuracy(correct, len(facts)),
            "perplexity": round(math.exp(nll / count), 3) if count else None,
            "held": subject.held_tokens(memory),
            "pool": {"layers": len(stats),
                     "mean_norm": {"min": round(min(s["mean_norm"] for s in stats), 4),
                                   "max": round(max(s["mean_norm"] for s in stats), 4)},
                     "max_norm": round(max(s["max_norm"] for s in stats), 4),
                     "per_layer": stats},
        })
        progress.advance(1, f"integrity: measured at U={point}")
    progress.finish()
    base = results[0]
    for r in results:
        a, b = r["retention"], base["retention"]
        noise = 2 * math.sqrt(a["stderr"] ** 2 + b["stderr"] ** 2)
        r["retention_within_noise"] = abs(a["accuracy"] - b["accuracy"]) <= max(noise, 1 / max(a["total"], 1))
        r["perplexity_ratio"] = round(r["perplexity"] / base["perplexity"], 4) if base["perplexity"] else None
        r["max_norm_ratio"] = round(r["pool"]["max_norm"] / base["pool"]["max_norm"], 4) \
            if base["pool"]["max_norm"] else None
    return {
        "benchmark": "integrity", "data": data.describe(), "scorer": SCORER_VERSION,
        "settings": {"questions": len(facts), "seed": seed, "updates": updates, "held_out_passages": len(heldout),
                     "checkpoints": checkpoints},
        "results": results, "seconds": round(time.perf_counter() - started, 1),
    }
