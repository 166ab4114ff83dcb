"""memllm bench scale: a notebook-sized memory, grown to each size and measured there.

Real text in many files of note size, as `memllm ingest DIR` gets it: NQ development
passages (each with its question) spread evenly among filler notes cut from real text
shipped on the machine (the Python standard library's modules, at paragraph boundaries).
At each size: ingest tokens/s beside a plain forward pass over notes of the same segment,
disk bytes per ingested token, the process's resident memory after asking, ask time to the
first token (median and p95, the memory loaded from disk for every question, as `ask`
does), the accuracy of the questions whose passages are in memory against the same
questions with the gold passage alone in the prompt, and how often the answer read the
question's own note (so a miss can be told apart as retrieval's or the reading's).
"""

from __future__ import annotations

import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..progress import NoProgress, Progress
from .protocols import CHUNK_TOKENS, Data
from .qa import SCORER_VERSION, Item, is_correct

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
NOTE_CHARS = 1600  # filler notes of at most this many characters (about 100-400 tokens)


class ScaleSubject(Protocol):
    """What `scale` needs: a stored memory it can grow, and the prompt baseline."""

    def count(self, text: str) -> int: ...
    def plain_forward(self, text: str) -> None: ...
    def stored_memory(self) -> Any: ...  # an empty stored memory, removed by `close`
    def ingest(self, stored: Any, notes: list[tuple[str, str]]) -> int: ...  # returns the tokens written
    # (answer, first token seconds, the notes the answer read: None where the subject cannot tell)
    def ask_stored(self, stored: Any, question: str) -> tuple[str, float, list[str] | None]: ...
    def ask_text(self, texts: list[str], question: str) -> str: ...
    def disk_bytes(self, stored: Any) -> int: ...
    def close(self, stored: Any) -> str | None: ...  # removes the memory, or says where it is kept


def filler_notes(root: Path | None = None) -> Iterator[tuple[str, str]]:
    """Notes of real English-and-code text from the files under `root` (the standard
    library by default), cut at blank lines into pieces of at most NOTE_CHARS."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        piece, part = "", 0
        for paragraph in text.split("\n\n"):
            if piece and len(piece) + len(paragraph) > NOTE_CHARS:
                yield f"{path.relative_to(root)}#{part}", piece
                piece, part = "", part + 1
            piece = f"{piece}\n\n{paragraph}" if piece else paragraph[:NOTE_CHARS]
        if piece.strip():
            yield f"{path.relative_to(root)}#{part}", piece


def scale(subject: ScaleSubject, data: Data, *, sizes: Sequence[int] = DEFAULT_SIZES, questions: int = 200,
          seed: int = 0, gold_share: float = 0.25, progress: Progress | None = None,
          filler: Iterator[tuple[str, str]] | None = None) -> dict:
    """Grow one stored memory to each of `sizes` tokens and measure it there."""
    progress = progress or NoProgress()
    rng = random.Random(seed)
    gold = rng.sample(data.items, len(data.items))
    stream = _notes(gold, filler if filler is not None else filler_notes(), gold_share, subject)
    stored = subject.stored_memory()
    runs, ingested, seconds_total, asked_in = [], 0, 0.0, []
    started = time.perf_counter()
    progress.start(len(sizes) * 3, "scale")
    try:
        for size in sorted(sizes):
            batch, tokens, golds = [], 0, []
            while ingested + tokens < size:
                note = next(stream, None)
                if note is None:
                    break
                name, text, item, count = note
                batch.append((name, text))
                tokens += count
                if item is not None:
                    golds.append(item)
            if not batch:
                break
            plain_rate = _plain_rate(subject, [text for _, text in batch[:24]])
            progress.advance(1, f"scale: ingesting {tokens:,} tokens")
            t0 = time.perf_counter()
            written = subject.ingest(stored, batch)
            seconds = time.perf_counter() - t0
            ingested += written
            seconds_total += seconds
            asked_in += golds
            progress.advance(1, f"scale: asking at {ingested:,} tokens")
            chosen = random.Random(seed + size).sample(asked_in, min(questions, len(asked_in)))
            first, asked = [], []
            for item in chosen:
                answer, first_token, read = subject.ask_stored(stored, item.question)
                asked.append({"row": item.row, "memory": is_correct(answer, item.answers),
                              "prompt": is_correct(subject.ask_text([item.passage], item.question), item.answers),
                              "read_gold": None if read is None else gold_name(item) in read})
                first.append(first_token)
            memory_right, prompt_right = sum(a["memory"] for a in asked), sum(a["prompt"] for a in asked)
            told = [a["read_gold"] for a in asked if a["read_gold"] is not None]
            rate = written / seconds if seconds else None
            runs.append({
                "tokens": ingested, "notes": len(batch), "gold_notes": len(asked_in),
                "ingest_tokens_per_s": round(rate, 1) if rate else None,
                "plain_forward_tokens_per_s": round(plain_rate, 1),
                "ingest_over_plain": round(rate / plain_rate, 3) if rate else None,
                "disk_bytes": subject.disk_bytes(stored),
                "disk_bytes_per_token": round(subject.disk_bytes(stored) / ingested, 1),
                "rss_bytes": resident_bytes(),
                "first_token_s": quantiles(first),
                "questions": len(chosen), "memory_correct": memory_right, "prompt_correct": prompt_right,
                "memory_over_prompt": round(memory_right / prompt_right, 3) if prompt_right else None,
                "read_gold": sum(told) if told else None,  # answers that read the question's own note
                "asked": asked,
            })
            progress.advance(1)
    finally:
        kept = subject.close(stored)
        progress.finish()
    return {
        "benchmark": "scale", "data": data.describe(),
        "settings": {"sizes": list(sizes), "questions": questions, "seed": seed, "gold_share": gold_share,
                     "filler": "Python standard library modules, cut at blank lines", "scorer": SCORER_VERSION},
        "runs": runs,
        "ingest_tokens_per_s": round(ingested / seconds_total, 1) if seconds_total else None,
        "seconds": round(time.perf_counter() - started, 1),
        **({"memory_home": kept} if kept else {}),
    }


def _notes(gold: list[Item], filler: Iterator[tuple[str, str]], share: float,
           subject: ScaleSubject) -> Iterator[tuple[str, str, Item | None, int]]:
    """Gold passages spread evenly among filler notes: about `share` of the tokens are gold,
    until either runs out; then the other alone."""
    gold_tokens = filler_tokens = 0
    gold_it = iter(gold)
    while True:
        take_gold = gold_tokens <= share * (gold_tokens + filler_tokens)
        if take_gold:
            item = next(gold_it, None)
            if item is not None:
                count = subject.count(item.passage)
                gold_tokens += count
                yield gold_name(item), item.passage, item, count
                continue
        note = next(filler, None)
        if note is None:
            if not take_gold:
                share = 1.0  # filler ran out: the rest is gold
                continue
            return
        count = subject.count(note[1])
        filler_tokens += count
        yield f"notes/{note[0]}", note[1], None, count


def gold_name(item: Item) -> str:
    """The note a gold passage is ingested as."""
    return f"nq/{item.row}.txt"


def _plain_rate(subject: ScaleSubject, texts: list[str]) -> float:
    """Tokens/s of the model alone over these notes (after one warm-up)."""
    subject.plain_forward(texts[0])
    tokens, seconds = 0, 0.0
    for text in texts:
        t0 = time.perf_counter()
        subject.plain_forward(text)
        seconds += time.perf_counter() - t0
        tokens += min(CHUNK_TOKENS, subject.count(text))  # plain_forward reads one chunk at most
    return tokens / seconds


def quantiles(values: list[float]) -> dict | None:
    """Median, p95 and max of timings (rounded to 0.1 ms); None for none."""
    if not values:
        return None
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median": round(statistics.median(ordered), 4), "p95": round(p95, 4), "max": round(ordered[-1], 4)}


def resident_bytes() -> int | None:
    """The process's resident memory now (Linux; None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
