"""BM25 over texts (bm25s): what memllm's reader ranks blocks with, and the bench's baseline."""

from __future__ import annotations


def bm25_index(texts: list[str]):
    """A BM25 index (bm25s) over texts; None when there is nothing to index (no texts, or
    no word in them that is not a stop word)."""
    if not texts:
        return None
    import bm25s

    retriever = bm25s.BM25()
    try:
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    except ValueError:  # an empty vocabulary
        return None
    return retriever


def bm25_scores(retriever, question: str, count: int) -> list[float]:
    """The BM25 score of each of the `count` indexed texts for the question (0 for all when
    the question has no searchable word or there is no index)."""
    if retriever is None:
        return [0.0] * count
    import bm25s

    query = bm25s.tokenize([question], stopwords="en", show_progress=False, return_ids=False)
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
