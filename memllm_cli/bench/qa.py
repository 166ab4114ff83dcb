"""Question answering over passages: data, scoring, and memory-vs-prompt evaluation.

Data is the format of Natural Questions open with gold passages (one JSON object a line,
gzip or plain): {"question", "answers": [...], "ctxs": [{"title", "text", ...}, ...]}.
An answer counts as correct when one of the accepted answers, normalised (lower case, no
punctuation, no articles, single spaces), appears in the normalised generated answer.
"""

from __future__ import annotations

import gzip
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

SCORER_VERSION = "contains-normalised-1"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014")


@dataclass(frozen=True)
class Item:
    row: int
    question: str
    answers: list[str]
    passage: str  # "title\ntext" of the gold passage


def load_items(path: Path, rows: range) -> list[Item]:
    """Items at the given 0-based rows of a NQ-open-oracle style file."""
    wanted = set(rows)
    items = []
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for row, line in enumerate(f):
                if row in wanted:
                    data = json.loads(line)
                    ctx = data["ctxs"][0]
                    items.append(Item(row, data["question"], list(data["answers"]), f"{ctx['title']}\n{ctx['text']}"))
                if row >= rows.stop - 1:
                    break
    except (OSError, json.JSONDecodeError, KeyError, IndexError) as err:
        raise InputError(f"cannot read QA data {path}: {err}") from None
    return items


def normalise(text: str) -> str:
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def is_correct(prediction: str, answers: list[str]) -> bool:
    got = normalise(prediction)
    return any(normalise(a) and normalise(a) in got for a in answers)


@dataclass
class Score:
    correct: int = 0
    total: int = 0
    details: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def add(self, item: Item, prediction: str) -> None:
        ok = is_correct(prediction, item.answers)
        self.correct += ok
        self.total += 1
        self.details.append({"row": item.row, "correct": ok, "answer": prediction.strip()[:200]})
