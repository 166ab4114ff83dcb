"""Whether an answer is grounded in what was read from memory.

A small model answers every question, whether or not memory holds the answer ("What is
the guest Wi-Fi password?" -> "123456"). Two checks tell the user when it does not:

- relevance: the share of the question's content words (BM25's terms: lower case, English
  stop words removed, stemmed) that occur in the text read, weighted by how rare each word
  is among the memory's blocks (a rare word such as a name counts for more than "year");
- support: the share of the answer's content words, other than the question's own, that
  occur in the text read (an answer built of words memory never held came from the model
  alone; repeating the question proves nothing).

An answer is grounded when both reach their threshold. The thresholds were chosen by
measurement (benchmarks/grounding.py, docs/benchmarks.md): NQ development questions whose
passages were ingested against questions whose passages were not, so that ingested
questions lose under 5% of their correct answers.
"""

from __future__ import annotations

from collections.abc import Callable

from ..text.bm25 import tokenize

MIN_RELEVANCE = 0.25  # measured: docs/benchmarks.md, "Grounded answers"
MIN_SUPPORT = 0.1


def terms(text: str) -> list[str]:
    """The content words of a text, as the retriever sees them (stems)."""
    found = tokenize([text], ids=False)
    return list(dict.fromkeys(found[0])) if found else []


def judge(question: str, read: list[str], rarity: Callable[[str], float]) -> Callable[[str], dict]:
    """A judge of answers to `question` given the texts read; `rarity(term)` weighs a term
    (its inverse document frequency in the memory, 1.0 when unknown)."""
    held = set()
    for text in read:
        held.update(terms(text))
    asked = terms(question)
    weights = {t: rarity(t) for t in asked}
    total = sum(weights.values())
    relevance = sum(w for t, w in weights.items() if t in held) / total if total else 0.0

    def verdict(answer: str) -> dict:
        said = [t for t in terms(answer) if t not in weights]  # what the answer adds to the question
        support = sum(t in held for t in said) / len(said) if said else 1.0
        grounded = bool(read) and relevance >= MIN_RELEVANCE and support >= MIN_SUPPORT
        return {"grounded": grounded, "relevance": round(relevance, 3), "support": round(support, 3)}

    return verdict
