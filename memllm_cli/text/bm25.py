"""BM25 over texts (bm25s): what memllm's reader ranks blocks with, and the bench's baseline.

Terms are lower-cased words without English stop words, reduced to their Snowball stems
(PyStemmer), so "founded" finds "founding": at a million tokens stems put the question's own
note among the blocks read for 1,803 of 1,968 NQ questions instead of 1,757, and first for
1,572 instead of 1,516 (docs/design.md, "Reading within a budget").
"""

from __future__ import annotations

import threading

TERMS = "stem"  # how texts become terms; part of the key of every cached index (recall.py)

_local = threading.local()  # a PyStemmer stemmer is not thread-safe: one per thread


def _stemmer():
    if not hasattr(_local, "stemmer"):
        import Stemmer

        _local.stemmer = Stemmer.Stemmer("english")
    return _local.stemmer


def tokenize(texts: list[str], *, ids: bool = True):
    """The texts' terms, as bm25s indexes them (`ids`) or as lists of strings."""
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), show_progress=False, return_ids=ids)


def bm25_index(texts: list[str]):
    """A BM25 index (bm25s) over texts; None when there is nothing to index (no texts, or
    no word in them that is not a stop word)."""
    if not texts:
        return None
    import bm25s

    retriever = bm25s.BM25()
    try:
        retriever.index(tokenize(texts), show_progress=False)
    except ValueError:  # an empty vocabulary
        return None
    return retriever


def bm25_scores(retriever, question: str, count: int) -> list[float]:
    """The BM25 score of each of the `count` indexed texts for the question (0 for all when
    the question has no searchable word or there is no index)."""
    if retriever is None:
        return [0.0] * count
    query = tokenize([question], ids=False)
    if not (query and query[0]):
        return [0.0] * count
    return retriever.get_scores(query[0]).tolist()  # every text's score, in index order


def rarity(retriever):
    """A term's inverse document frequency in the index, log(1 + n / (1 + df)); a term the
    index does not know is as rare as can be."""
    if retriever is None:
        return lambda term: 1.0
    import math

    vocab, indptr, n = retriever.vocab_dict, retriever.scores["indptr"], int(retriever.scores["num_docs"])

    def weight(term: str) -> float:
        v = vocab.get(term)
        df = 0 if v is None else int(indptr[v + 1] - indptr[v])
        return math.log(1 + n / (1 + df))

    return weight
