"""Drafts for greedy decoding, looked up in the text the answer is read from.

An answer from memory mostly copies spans of the notes it read ("The tool shed code is
4172."). Prompt-lookup decoding (Saxena 2023; transformers' `prompt_lookup_num_tokens`)
uses that: when the last tokens generated also occur in the notes or the question, the
tokens that followed them there are proposed as the next ones, and one forward pass over
the proposal checks them all. Greedy decoding keeps exactly the tokens it would have picked
one at a time (up to float rounding of a batched matmul); only the number of forward passes
changes. It pays where a forward pass over a few tokens costs little more than over one
(decoding bound by reading the weights: GPUs, large models); on the 2-core development CPU a
pass over 4 tokens costs twice one over 1, and it saved 15% of decode time on NQ answers
(docs/benchmarks.md, "Serve").
"""

from __future__ import annotations

from collections.abc import Iterable

MATCH = 2  # tokens that must match before a draft is proposed (1 proposes too often in vain)
LONGEST_MATCH = 8  # matches are compared up to this many tokens back


class Drafts:
    """An index of the token bigrams of a text that grows as tokens are generated."""

    def __init__(self, texts: Iterable[list[int]], longest: int) -> None:
        self.longest = longest
        self.tokens: list[int] = []
        self._after: dict[tuple[int, int], list[int]] = {}  # bigram -> positions of what followed it
        self._bounds: list[int] = []  # text boundaries: a draft never runs across one
        for text in texts:
            self.extend(text)
            self._bounds.append(len(self.tokens))

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            n = len(self.tokens)
            if n >= MATCH:
                self._after.setdefault((self.tokens[-2], self.tokens[-1]), []).append(n)

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest earlier occurrence of the text's
        last tokens (the latest one among equally long matches); [] when none did."""
        tokens = self.tokens
        if len(tokens) < MATCH or limit <= 0:
            return []
        places = self._after.get((tokens[-2], tokens[-1]), ())
        best, best_len = -1, 0
        for at in reversed(places):  # latest first
            if at >= len(tokens):
                continue  # the text's own end: nothing follows it yet
            length = MATCH
            while length < LONGEST_MATCH and at - length - 1 >= 0 and tokens[at - length - 1] == tokens[-length - 1]:
                length += 1
            if length > best_len:
                best, best_len = at, length
        if best < 0:
            return []
        end = next((b for b in self._bounds if b > best), len(tokens))
        return tokens[best : min(end, best + min(limit, self.longest))]
