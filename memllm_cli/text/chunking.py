"""Split a document into chunks of at most `max_tokens` model tokens, one memory update each.

The document is tokenized once; chunks are slices of that token sequence, so the tokens a
chunk writes are exactly the tokens the document has in that place (no re-tokenization
drift at chunk edges). Cuts go at the last paragraph break in the window, else the last
sentence end, else the last word boundary, each only if it leaves a chunk of at least a
quarter of the window; otherwise the window is cut at the token limit.

Re-chunking an edited document (`keep`: the token ids of its earlier chunks) keeps every
earlier chunk that still appears, in order, as a chunk of its own, and chunks only the
text between them: a one-line edit changes one chunk, not every chunk after it.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

SEPARATOR = "\n\n"  # every document ends with a blank line, so the next one starts a paragraph
_SENTENCE_END = re.compile(r"[.!?\u3002][\"'\u201d\u2019)\]]*$")


@dataclass(frozen=True)
class Chunk:
    index: int  # position of the chunk within its document
    start: int  # character offsets into the original document text
    end: int
    ids: list[int]


def chunk_document(text: str, tokenizer, max_tokens: int = 512, keep: Sequence[Sequence[int]] = ()) -> list[Chunk]:
    """Chunks covering `text` (stripped of surrounding whitespace), in order; the chunks
    of `keep` (earlier chunks of the same document) wherever they still appear."""
    if max_tokens < 16:
        raise ValueError(f"max_tokens must be at least 16, got {max_tokens}")
    lead = len(text) - len(text.lstrip())
    body = text.strip()
    if not body:
        return []
    normalised = body + SEPARATOR
    encoding = tokenizer(normalised, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoding["input_ids"]
    starts = [start for start, _ in encoding["offset_mapping"]] + [len(normalised)]
    kinds = [_cut_kind(normalised, starts[c]) for c in range(len(ids) + 1)]

    chunks: list[Chunk] = []

    def add(i: int, end: int) -> None:
        chunks.append(Chunk(len(chunks), lead + starts[i], lead + min(starts[end], len(body)), ids[i:end]))

    i = 0
    for start, end in [*_anchors(ids, keep, max_tokens), (len(ids), len(ids))]:
        while i < start:  # the text before the next kept chunk
            cut = min(i + max_tokens, start)
            if cut < start:
                cut = _best_cut(kinds, i, cut, min_len=max_tokens // 4)
            add(i, cut)
            i = cut
        if start < end:
            add(start, end)
            i = end
    return chunks


def _anchors(ids: list[int], keep: Sequence[Sequence[int]], max_tokens: int) -> list[tuple[int, int]]:
    """Where the chunks of `keep` occur in `ids`, in order, without overlapping: (start, end)."""
    if not keep:
        return []
    haystack = array("q", ids).tobytes()
    width = array("q").itemsize
    found, at = [], 0
    for old in keep:
        if not 0 < len(old) <= max_tokens:
            continue
        needle = array("q", old).tobytes()
        pos = haystack.find(needle, at * width)
        while pos >= 0 and pos % width:  # a match must start on a token
            pos = haystack.find(needle, pos + 1)
        if pos >= 0:
            found.append((pos // width, pos // width + len(old)))
            at = pos // width + len(old)
    return found


def _cut_kind(text: str, position: int) -> int:
    """How good a place `position` is to start a new chunk: 3 paragraph, 2 sentence, 1 word, 0 none."""
    before = text[max(0, position - 16) : position]
    after = text[position : position + 1]
    if re.search(r"\n[ \t]*\n\s*$", before):
        return 3
    spaced = before[-1:].isspace() or after.isspace()
    if spaced and _SENTENCE_END.search(before.rstrip()):
        return 2
    return 1 if spaced else 0


def _best_cut(kinds: list[int], start: int, end: int, min_len: int) -> int:
    for wanted in (3, 2, 1):
        for c in range(end, start + min_len - 1, -1):
            if kinds[c] >= wanted:
                return c
    return end
