"""The long-term tier and reading within a budget (training-free kind, tiny random models)."""

import subprocess
import sys

import pytest
import torch

from memllm_cli.memory import recall
from memllm_cli.memory.base import forecast
from memllm_cli.service import Memllm
from tests.test_service import doc

TOPICS = [
    ("shed", "The tool shed code is 4172. The key hangs inside the shed door. " * 4),
    ("garden", "The garden coordinator is Maria Okafor. Volunteers meet every Tuesday at six. " * 4),
    ("capitals", "Paris is the capital of France. Berlin is the capital of Germany. " * 4),
    ("numbers", "Numbers like 1901, 42 and 3.14 appear in text; so do commas, colons and quotes. " * 4),
]


def filled(tiny_dir, pool_size=512, repeats=3):
    """A memory whose pool (512 tokens) long ago dropped most of the first documents."""
    service = Memllm(model=str(tiny_dir), memory="lt", pool_size=pool_size)
    docs = [doc(f"{name}-{r}", f"Part {r}. {text}") for r in range(repeats) for name, text in TOPICS]
    service.ingest_documents(docs)
    return service


def test_blocks_keep_the_token_ids_they_were_written_from(tiny_dir):
    service = Memllm(model=str(tiny_dir), memory="ids")
    service.ingest_documents([doc("shed", TOPICS[0][1])])
    (block,) = service.store.open("ids").blocks()
    ids = service.store.open("ids").read_block_ids(block)
    lm = service.model()
    assert lm.tokenizer.decode(ids).strip() == TOPICS[0][1].strip()


def test_nothing_ingested_is_lost_when_the_pool_drops_it(tiny_dir):
    service = filled(tiny_dir)
    status = service.status()
    first = next(s for s in status["sources"] if s["name"] == "shed-0")
    assert first["tokens_held"] < first["tokens_written"]  # the pool dropped part of it ...
    assert first["tokens_held"] + first["tokens_long_term"] == first["tokens_written"]  # ... the tier kept it
    answer = service.ask("What is the tool shed code?", max_new_tokens=3, budget=600)
    "".join(answer)
    cited = answer.info["sources"]
    assert cited and cited[0]["source"].startswith("shed-") and "shed" in cited[0]["excerpt"]
    assert "shed-0" in {c["source"] for c in cited}  # dropped from the pool, read from the long-term tier
    assert answer.info["read_tokens"] <= 600
    assert [c["score"] for c in cited] == sorted((c["score"] for c in cited), reverse=True)


def test_a_budget_reads_only_the_selected_blocks(tiny_dir, monkeypatch):
    service = filled(tiny_dir)
    reads = []
    rows_read, checked = service.repo.read_block_rows, service.repo.read_block_checked

    def counting(block, rows, keys):
        reads.append((block, rows))
        return rows_read(block, rows, keys)

    def counting_whole(block, keys):
        reads.append((block, None))
        return checked(block, keys)

    monkeypatch.setattr(service.repo, "read_block_rows", counting)
    monkeypatch.setattr(service.repo, "read_block_checked", counting_whole)
    answer = service.ask("Who is the garden coordinator?", max_new_tokens=2, budget=600)
    "".join(answer)
    # the blocks judged (each read once), none of the pool's rows
    assert len(reads) == answer.info["judged"] == 3 and all(rows is None for _, rows in reads)
    assert len(answer.info["sources"]) == 1
    assert len(reads) < len(service.store.open("lt").blocks()) == 12
    assert {c["source"].split("-")[0] for c in answer.info["sources"]} == {"garden"}


def test_reading_one_block_equals_the_prompt_with_its_text(tiny_dir):
    service = Memllm(model=str(tiny_dir), memory="one")
    service.ingest_documents([doc("shed", TOPICS[0][1])])
    from_memory = service.ask("What is the code?", max_new_tokens=6, budget=1024)
    from_prompt = service.ask_with_text("What is the code?", [TOPICS[0][1]], max_new_tokens=6)
    "".join(from_memory), "".join(from_prompt)
    assert from_memory.ids == from_prompt.ids
    assert from_memory.info["read_tokens"] == service.status()["tokens"]


@pytest.mark.parametrize("scope", ["document", "pool"])
def test_a_note_written_after_another_reads_as_the_prompt_with_its_text(tiny_dir, scope):
    service = Memllm(model=str(tiny_dir), memory=f"scope-{scope}", write_scope=scope)
    service.ingest_documents([doc("garden", TOPICS[1][1]), doc("shed", TOPICS[0][1])])
    question = "What is the tool shed code?"
    from_memory = service.ask(question, max_new_tokens=6, budget=1024)
    from_prompt = service.ask_with_text(question, [TOPICS[0][1]], max_new_tokens=6)
    "".join(from_memory), "".join(from_prompt)
    assert [c["source"] for c in from_memory.info["sources"]] == ["shed"]
    assert service.status()["write_scope"] == scope
    # a document's first chunk is written after the sink alone, not after the note before it
    assert (from_memory.ids == from_prompt.ids) == (scope == "document")


def test_a_documents_later_chunks_are_written_after_its_own_earlier_ones(tiny_dir):
    service = Memllm(model=str(tiny_dir), write_context=64)
    memory = service.scratch_memory(pool_size=512, seed=1)
    assert memory.write_scope == "document"
    first = service.write_text(memory, TOPICS[0][1], "shed")
    assert memory.context_for(0) == min(64, first) and memory.context_for(1) == 0
    memory.write_scope = "pool"
    assert memory.context_for(1) == 64


def test_a_question_finds_a_note_by_other_forms_of_its_words(tiny_dir):
    service = Memllm(model=str(tiny_dir), memory="stems")
    service.ingest_documents([doc("history", "The orchestra was founded by violinists in 1898. " * 3),
                              doc("dates", "Concert dates for the spring season are listed online. " * 3),
                              doc("shed", TOPICS[0][1])])
    answer = service.ask("Who founding orchestras?", max_new_tokens=1, budget=512)
    "".join(answer)
    assert [c["source"] for c in answer.info["sources"]] == ["history"]  # "founding orchestras": stems of its words


SHEDS = [("shed-code", "The shed code is 4172. The key hangs by the door. " * 3),
         ("shed-roof", "The shed roof leaks when it rains. Fix it in May. " * 3),
         ("shed-tools", "A shed of tools: saws, a drill and code books. " * 3)]


def fits(service, question, budget=1024):
    """The model's log-likelihood of the question after each shortlisted block alone, plus
    SCORE_WEIGHT times its BM25 score, by name."""
    from memllm_cli.memory.free import sink

    memory, lm = service.load(), service.model()
    engine = lm.engine
    ids = torch.tensor(lm.prompt.question_ids(lm.tokenizer, question))
    start, end = lm.prompt.question_span(lm.tokenizer, question)
    out = {}
    for c in recall.shortlist(recall.index(memory, lm.tokenizer), question, budget):
        pool, damaged = recall.read([c], torch.float32, (engine.layers, engine.kv_heads, engine.head_dim))
        assert not damaged
        fit = engine.loglik(ids, sink(lm) + pool, start, end)
        out[memory.sources[c.source]["name"]] = fit + recall.SCORE_WEIGHT * c.score
    return out


def test_the_question_span_is_the_questions_own_tokens(tiny_dir, tiny_qwen_dir):
    for path in (tiny_dir, tiny_qwen_dir):  # a chat template, and none
        lm = Memllm(model=str(path)).model()
        question = "  Who keeps the shed key?  "
        ids = lm.prompt.question_ids(lm.tokenizer, question)
        start, end = lm.prompt.question_span(lm.tokenizer, question)
        assert 1 <= start < end < len(ids)
        assert lm.tokenizer.decode(ids[start:end]).strip() == question.strip()


def test_the_model_reads_the_shortlisted_block_that_best_predicts_the_question(tiny_dir):
    service = Memllm(model=str(tiny_dir), memory="judged")
    service.ingest_documents([doc(name, text) for name, text in SHEDS])
    question = "What is in the shed?"  # "shed" is every note's: BM25 alone cannot choose
    answer = service.ask(question, max_new_tokens=6, budget=1024)
    "".join(answer)
    expected = fits(service, question)
    assert len(expected) == answer.info["judged"] == 3
    (read,) = answer.info["sources"]
    assert read["source"] == max(expected, key=expected.get)
    assert read["fit"] + recall.SCORE_WEIGHT * read["score"] == pytest.approx(expected[read["source"]], abs=1e-2)
    # read alone after the sink, as the prompt holding that note's text alone
    from_prompt = service.ask_with_text(question, [dict(SHEDS)[read["source"]]], max_new_tokens=6)
    "".join(from_prompt)
    assert answer.ids == from_prompt.ids


def test_a_shortlisted_block_that_is_damaged_is_not_chosen(tiny_dir):
    service = Memllm(model=str(tiny_dir), memory="judged-damaged")
    service.ingest_documents([doc(name, text) for name, text in SHEDS])
    question = "What is in the shed?"
    expected = fits(service, question)
    best = max(expected, key=expected.get)
    blocks = service.settings.home / "memories" / "judged-damaged" / "blocks"
    (path,) = [p for p in blocks.iterdir() if best.encode() in p.read_bytes()[:4096]]
    data = bytearray(path.read_bytes())
    data[-64:] = b"\x7f" * 64  # garbage in its keys and values
    path.write_bytes(bytes(data))
    answer = service.ask(question, max_new_tokens=2, budget=1024)
    "".join(answer)
    assert [d["source"] for d in answer.info["damaged"]] == [best]
    (read,) = answer.info["sources"]
    rest = {name: fit for name, fit in expected.items() if name != best}
    assert read["source"] == max(rest, key=rest.get)


def test_budget_zero_reads_the_whole_pool(tiny_dir):
    service = filled(tiny_dir)
    answer = service.ask("What is the tool shed code?", max_new_tokens=2, budget=0)
    "".join(answer)
    assert "sources" not in answer.info and answer.info["read_tokens"] == service.status()["tokens"] == 512


def test_forgotten_and_rolled_back_documents_are_not_read(tiny_dir):
    service = filled(tiny_dir, repeats=1)
    service.forget(["shed-0"])
    answer = service.ask("What is the tool shed code?", max_new_tokens=1, budget=2000)
    "".join(answer)
    assert "shed-0" not in {c["source"] for c in answer.info["sources"]}
    service.ingest_documents([doc("late", "A late note about the tool shed code: it changed to 9911. " * 3)])
    service.rollback("HEAD~1")
    answer = service.ask("What is the tool shed code?", max_new_tokens=1, budget=2000)
    "".join(answer)
    assert "late" not in {c["source"] for c in answer.info["sources"]}


def test_status_and_diff_forecast_the_pool(tiny_dir):
    service = filled(tiny_dir)
    status = service.status()
    last = status["sources"][-1]
    assert last["pool_after_10"] < last["tokens_held"] and last["pool_after_100"] <= last["pool_after_10"]
    service.ingest_documents([doc("late", "A late note about the tool shed. " * 5)])
    diff = service.diff("HEAD~1", "HEAD")
    assert "late" in {r["source"] for r in diff["sources"]} and any(r["long_term"] > 0 for r in diff["sources"])
    for row in diff["sources"]:
        assert row["long_term"] == row["written"] - row["held"] and row["pool_after_100"] <= row["held"]


def test_forecast_waits_for_the_pool_to_fill():
    assert forecast(100, 0, 1000, 100, 9) == 100  # 900 tokens in a 1000-token pool: nothing dropped yet
    full = forecast(100, 1000, 1000, 100, 10)
    assert abs(full - 100 * 0.9 ** 10) < 1e-9


def test_an_in_ram_memory_reads_its_pending_blocks(tiny_dir):
    service = Memllm(model=str(tiny_dir), pool_size=512)
    memory = service.scratch_memory(keep_blocks=True, seed=0)
    for name, text in TOPICS * 2:
        service.write_text(memory, text, name)
    idx = recall.index(memory, tokenizer=service.model().tokenizer)
    assert len(idx.candidates) == 8 and all(c.block.startswith("pending-") for c in idx.candidates)
    selected = recall.select(idx, "Who is the garden coordinator?", 600)
    assert selected and {memory.sources[c.source]["name"] for c in selected} == {"garden"}
    engine = service.model().engine
    pool, damaged = recall.read(selected, torch.float16, (engine.layers, engine.kv_heads, engine.head_dim))
    assert pool.keys.shape[2] == sum(c.tokens for c in selected) and damaged == []


def test_cli_ask_lists_its_sources(tmp_path, env_model):
    notes = tmp_path / "shed.txt"
    notes.write_text(TOPICS[0][1])
    other = tmp_path / "garden.txt"
    other.write_text(TOPICS[1][1])
    assert subprocess.run([sys.executable, "-m", "memllm_cli", "ingest", str(notes), str(other)],
                          capture_output=True).returncode == 0
    out = subprocess.run([sys.executable, "-m", "memllm_cli", "ask", "--sources", "--max-tokens", "2",
                          "What is the tool shed code?"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    at = lines.index("sources:")
    assert str(notes) in lines[at + 1] and "chunk 0" in lines[at + 1]


def test_gc_bounds_the_long_term_tier(tiny_dir):
    service = filled(tiny_dir, repeats=10)  # 40 updates through a 512-token pool: the oldest are gone from it
    before = service.status()
    lt_before = sum(s["tokens_long_term"] for s in before["sources"])
    dry = service.gc(keep_long_term=0, dry_run=True)
    assert dry["long_term_blocks_deleted"] > 0 and len(service.store.open("lt").blocks()) == 40
    result = service.gc(keep_long_term=0)
    assert result["long_term_blocks_deleted"] == dry["long_term_blocks_deleted"] and result["bytes_freed"] > 0
    after = service.status()
    assert sum(s["tokens_long_term"] for s in after["sources"]) < lt_before
    assert after["tokens"] == before["tokens"]  # the pool is untouched
    assert service.verify()["ok"]  # versions still list the pruned blocks; the journal says why
    answer = service.ask("What is the tool shed code?", max_new_tokens=1, budget=2000)
    "".join(answer)
    present = set(service.store.open("lt").blocks())
    assert len(present) == 40 - result["blocks_deleted"]
    idx = recall.index(service.load(), service.model().tokenizer)
    assert {c.block for c in idx.candidates} <= present
    assert {c["source"] for c in answer.info["sources"]} <= {s["name"] for s in after["sources"]}
    assert service.gc(keep_long_term=0)["long_term_blocks_deleted"] == 0  # nothing more to prune


def test_the_index_is_cached_per_version_and_purged_with_the_document(tiny_dir, monkeypatch):
    service = filled(tiny_dir, repeats=1)
    "".join(service.ask("What is the tool shed code?", max_new_tokens=1))
    cache = service.store.open("lt").folder / "cache"
    (first,) = list(cache.glob("recall-*"))
    calls = []
    monkeypatch.setattr(service.repo, "read_block_ids", lambda *a: calls.append(a) or [])
    answer = service.ask("Who is the garden coordinator?", max_new_tokens=1)
    "".join(answer)
    assert len(calls) == len(answer.info["sources"]) >= 1  # a cache hit reads the ids of the cited blocks only
    monkeypatch.undo()
    assert list(cache.glob("recall-*")) == [first]
    service.forget(["shed-0"], purge=True)
    assert not list(cache.glob("recall-*"))  # no byte of a purged document stays on disk
    answer = service.ask("What is the tool shed code?", max_new_tokens=1, budget=2000)
    "".join(answer)
    assert "shed-0" not in {c["source"] for c in answer.info["sources"]}
    assert service.export(service.store.open("lt").folder.parent / "lt.tar")["files"] > 0
