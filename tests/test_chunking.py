import pytest
from transformers import AutoTokenizer

from memllm_cli.text.chunking import SEPARATOR, chunk_document


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def paragraphs(count, sentences=6):
    return "\n\n".join(
        " ".join(f"Sentence {s} of paragraph {p} mentions the garden and the shed." for s in range(sentences))
        for p in range(count)
    )


def test_chunks_are_bounded_and_cover_the_document_exactly(tokenizer):
    text = paragraphs(30)
    chunks = chunk_document(text, tokenizer, max_tokens=64)
    assert len(chunks) > 5
    assert all(len(c.ids) <= 64 for c in chunks)
    whole = tokenizer(text + SEPARATOR, add_special_tokens=False).input_ids
    assert [i for c in chunks for i in c.ids] == whole
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:], strict=False))


def test_cuts_prefer_paragraphs_then_sentences(tokenizer):
    text = paragraphs(12, sentences=2)
    chunks = chunk_document(text, tokenizer, max_tokens=80)
    for chunk in chunks[:-1]:
        assert text[chunk.start : chunk.end].endswith("\n\n")
    long_paragraph = paragraphs(1, sentences=40)
    for chunk in chunk_document(long_paragraph, tokenizer, max_tokens=80)[:-1]:
        assert long_paragraph[chunk.start : chunk.end].rstrip().endswith(".")


def test_text_without_boundaries_is_cut_at_the_limit(tokenizer):
    text = "x" * 3000
    chunks = chunk_document(text, tokenizer, max_tokens=32)
    assert all(len(c.ids) <= 32 for c in chunks)
    assert sum(len(c.ids) for c in chunks) == len(tokenizer(text + SEPARATOR, add_special_tokens=False).input_ids)


def test_whitespace_only_gives_no_chunks(tokenizer):
    assert chunk_document(" \n\n\t ", tokenizer) == []


def test_offsets_skip_leading_whitespace(tokenizer):
    chunks = chunk_document("\n\n  Hello garden.", tokenizer)
    assert len(chunks) == 1 and chunks[0].start == 4
