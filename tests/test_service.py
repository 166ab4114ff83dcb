"""The Python API on tiny random models (no download)."""

import pytest
import torch

from memllm_cli.errors import InputError, MemoryNotFound, ModelError
from memllm_cli.service import Memllm
from memllm_cli.text.sources import Document


def doc(name, text):
    import hashlib

    return Document(name, text, hashlib.sha256(text.encode()).hexdigest())


PARAGRAPH = "The garden coordinator is Maria Okafor. Volunteers meet every Tuesday at six. " * 3


def test_ingest_then_ask_and_status(tmp_path, tiny_dir):
    (tmp_path / "notes.txt").write_text(PARAGRAPH)
    service = Memllm(model=str(tiny_dir), memory="notes")
    report = service.ingest([str(tmp_path / "notes.txt")])
    assert report.files == 1 and report.chunks == 1 and report.tokens == report.tokens_held > 0
    answer = service.ask("Who coordinates?", max_new_tokens=5)
    pieces = list(answer)
    assert "".join(pieces) == answer.text and len(answer.ids) == 5
    status = Memllm(memory="notes").status()
    assert status["tokens"] == report.tokens and status["updates"] == 1
    assert status["sources"][0]["tokens_held"] == status["sources"][0]["tokens_written"] == report.tokens
    assert status["model"] == str(tiny_dir)


def test_memory_answers_equal_prompt_answers_when_nothing_is_dropped(tiny_dir):
    # each chunk written after the pool (the scope for memories read whole), not its document alone
    service = Memllm(model=str(tiny_dir), pool_size=2048, write_scope="pool")
    texts = [PARAGRAPH, "The tool shed code is 4172. " * 5, "Paris is the capital of France. " * 4]
    service.ingest_documents([doc(f"d{i}", t) for i, t in enumerate(texts)])
    from_memory = service.ask("What is the code?", max_new_tokens=8, budget=0)  # the whole pool
    from_prompt = service.ask_with_text("What is the code?", texts, max_new_tokens=8)
    "".join(from_memory), "".join(from_prompt)
    assert from_memory.ids == from_prompt.ids


def test_reingesting_unchanged_content_is_a_no_op_unless_forced(tiny_dir):
    service = Memllm(model=str(tiny_dir))
    first = service.ingest_documents([doc("a", PARAGRAPH)])
    again = service.ingest_documents([doc("a-copy", PARAGRAPH)])
    assert again.chunks == 0 and again.unchanged == ["a-copy"] and again.tokens_held == first.tokens_held
    forced = service.ingest_documents([doc("a", PARAGRAPH)], force=True)  # written again, replacing itself
    assert forced.chunks == 1 and forced.updated == ["a"] and forced.tokens_held == first.tokens_held


def test_pool_never_exceeds_its_size_and_drops_uniformly(tiny_dir):
    service = Memllm(model=str(tiny_dir), pool_size=512, write_context=128)
    docs = [doc(f"d{i}", f"Document {i}. " + PARAGRAPH) for i in range(12)]
    report = service.ingest_documents(docs)
    status = service.status()
    assert status["tokens"] == 512 == report.tokens_held
    assert report.dropped == report.tokens - 512
    held = [s["tokens_held"] for s in status["sources"]]
    assert sum(held) == 512 and held[-1] == status["sources"][-1]["tokens_written"]  # the newest is whole
    assert held[0] < status["sources"][0]["tokens_written"]


def test_same_seed_same_updates_give_a_bit_identical_pool(tiny_dir):
    def build():
        service = Memllm(model=str(tiny_dir))
        memory = service.scratch_memory(pool_size=512, write_context=64, seed=7)
        for i in range(6):
            service.write_text(memory, f"Note {i}. " + PARAGRAPH * 3)
        return memory

    one, two = build(), build()
    assert torch.equal(one.pool.keys, two.pool.keys) and torch.equal(one.pool.values, two.pool.values)
    assert one.updates == two.updates and sum(u["dropped"] for u in one.updates) > 0


def test_ask_before_anything_was_ingested(tiny_dir):
    with pytest.raises(MemoryNotFound, match="no memory named 'default'"):
        Memllm(model=str(tiny_dir)).ask("anything?")


def test_empty_question(tiny_dir):
    Memllm(model=str(tiny_dir)).ingest_documents([doc("a", PARAGRAPH)])
    with pytest.raises(InputError, match="the question is empty"):
        Memllm(model=str(tiny_dir)).ask("   ")


def test_a_memory_refuses_another_model(tiny_dir, other_tiny_dir):
    Memllm(model=str(tiny_dir)).ingest_documents([doc("a", PARAGRAPH)])
    with pytest.raises(ModelError, match="was written by model"):
        Memllm(model=str(other_tiny_dir)).ask("who?")
    with pytest.raises(ModelError, match="was written by model"):
        Memllm(model=str(other_tiny_dir)).ingest_documents([doc("b", "other text")])


def test_a_memory_belongs_to_the_weights_not_to_the_compute_dtype(tiny_dir, other_tiny_dir):
    Memllm(model=str(tiny_dir)).ingest_documents([doc("a", PARAGRAPH)])  # float32
    in_bf16 = Memllm(model=str(tiny_dir), dtype="bfloat16")
    answer = in_bf16.ask("Who coordinates?", max_new_tokens=4)
    assert len(list(answer)) >= 1 and len(answer.ids) == 4
    in_bf16.ingest_documents([doc("b", "The tool shed code is 4172. " * 5)])
    assert Memllm(model=str(tiny_dir)).status()["updates"] == 2  # and back in float32
    with pytest.raises(ModelError, match="was written by model"):
        Memllm(model=str(other_tiny_dir), dtype="bfloat16").ask("who?")


def test_the_load_time_check_is_remembered_per_weights_and_dtype(tiny_dir, tmp_path):
    from memllm_cli.model.loading import load_model

    cache = tmp_path / "cache"
    for dtype in ("float32", "bfloat16"):
        load_model(str(tiny_dir), cache_dir=cache, dtype=dtype)
    records = sorted(p.name.rsplit("-", 1)[1] for p in (cache / "checks").glob("*.json"))
    assert records == ["bfloat16.json", "float32.json"]
    for path in (cache / "checks").glob("*.json"):
        path.write_text("{damaged")  # a damaged record: checked again, not trusted
    assert load_model(str(tiny_dir), cache_dir=cache).engine.check_error is not None


def test_a_sliding_window_model_reads_what_fits_its_window_and_says_so(tmp_path):
    from .conftest import save_tiny

    model = save_tiny(tmp_path / "gemma2", kind="gemma2")
    service = Memllm(model=str(model))
    service.ingest_documents([doc("a", PARAGRAPH), doc("b", "The tool shed code is 4172. " * 5)])
    answer = service.ask("What is the code?", max_new_tokens=3)
    list(answer)
    cap = answer.info["read_cap"]
    assert cap["why"] == "the model's sliding window of 64 tokens" and 0 < cap["tokens"] < 64
    assert answer.info["read_tokens"] <= cap["tokens"]
    whole = service.ask("What is the code?", max_new_tokens=3, budget=0)  # the whole pool: no cap
    list(whole)
    assert "read_cap" not in whole.info


def test_the_memory_remembers_its_model(tiny_dir):
    Memllm(model=str(tiny_dir)).ingest_documents([doc("a", PARAGRAPH)])
    service = Memllm()  # no model named: the memory's own, not the embedded default
    answer = service.ask("who?", max_new_tokens=3)
    list(answer)
    assert service.model().name == str(tiny_dir) and len(answer.ids) == 3


def test_base_model_without_chat_template(tiny_qwen_dir):
    service = Memllm(model=str(tiny_qwen_dir))
    service.ingest_documents([doc("a", PARAGRAPH)])
    answer = service.ask("who?", max_new_tokens=4)
    list(answer)
    assert len(answer.ids) == 4
    assert service.model().prompt.chat is False


def test_pool_size_must_hold_a_chunk(tiny_dir):
    with pytest.raises(ModelError, match="does not fit"):
        Memllm(model=str(tiny_dir), pool_size=100).ingest_documents([doc("a", PARAGRAPH)])


def test_interrupted_ingest_keeps_the_last_commit(tiny_dir, monkeypatch):
    service = Memllm(model=str(tiny_dir))
    service.ingest_documents([doc("a", PARAGRAPH)])
    before = service.status()
    calls = {"n": 0}
    original = type(service.model().engine).encode

    def interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(service.model().engine), "encode", interrupt)
    with pytest.raises(KeyboardInterrupt):
        service.ingest_documents([doc("b", "Second. " * 30), doc("c", "Third. " * 30)])
    assert Memllm().status() == before
