"""Compact blocks and writes that never copy the pool (issue 12): quantized blocks read back
as they were written, a memory may mix formats, RAM stays about the pool's size."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from memllm_cli.errors import ConfigError
from memllm_cli.memory import codec
from memllm_cli.service import Memllm
from memllm_cli.text.sources import Document

NOTE = "The garden coordinator is Maria Okafor. Volunteers meet every Tuesday at six. "


def with_format(tiny_dir, block_format, memory="default"):
    service = Memllm(model=str(tiny_dir), memory=memory)
    service.settings = dataclasses.replace(service.settings, block_format=block_format)
    return service


def block_files(service):
    return sorted((service.settings.home / "memories" / service.memory_name / "blocks").glob("*.safetensors"))


def tensors_and_codec(path):
    with safe_open(path, framework="pt") as f:
        return set(f.keys()), codec.of(json.loads(f.metadata()["memllm"]))


@pytest.mark.parametrize("block_format", ["int8", "int4", "int4-s8", "int4-s8-zstd"])
def test_a_quantized_memory_reads_back_what_it_wrote(tiny_dir, block_format):
    service = with_format(tiny_dir, block_format)
    memory = service.scratch_memory(pool_size=512, write_context=64, seed=3)
    memory.keep_blocks = True
    for i in range(6):
        service.write_text(memory, f"Note {i}. " + NOTE * 2, name=f"n{i}")
    service.repo.create({"model": {"name": service.model().name, "fingerprint": service.model().fingerprint}})
    memory.library = service.repo
    service._commit(memory, "ingest")
    loaded = service.load(states=True)
    memory.load_states()  # RAM holds what the blocks decode to, so a later process continues alike
    assert torch.equal(loaded.pool.keys, memory.pool.keys) and torch.equal(loaded.pool.values, memory.pool.values)
    names, found = tensors_and_codec(block_files(service)[0])
    assert found["bits"] == int(block_format[3]) and "keys" not in names
    assert ("keys.codes.zstd" if block_format.endswith("zstd") else "keys.codes") in names
    assert ("keys.scale.range" in names) == (found.get("stat_bits") == 8)
    assert service.verify()["ok"]


def test_compact_blocks_are_smaller_and_answer_alike(tiny_dir):
    sizes, answers = {}, {}
    for block_format in ("float16", "int8", "int4", "int4-s8", "int4-s8-zstd"):
        service = with_format(tiny_dir, block_format, memory=block_format)
        service.ingest_documents([Document.of("a.txt", NOTE * 8)])
        sizes[block_format] = sum(p.stat().st_size for p in block_files(service))
        answer = service.ask("Who is the garden coordinator?", max_new_tokens=6, budget=0)
        answers[block_format] = "".join(answer)
        assert service.status()["block_format"] == block_format
    assert sizes["int8"] < sizes["float16"] / 1.7 and sizes["int4"] < sizes["float16"] / 3
    assert sizes["int4-s8"] < sizes["int4"]  # the same codes, smaller statistics
    assert sizes["int4-s8-zstd"] < sizes["int4-s8"]  # the same codes, entropy-coded
    assert answers["int4-s8-zstd"] == answers["int4-s8"]  # lossless
    assert answers["int8"] == answers["float16"]  # a random tiny model; 8 bits change no greedy token here


def test_a_memory_may_mix_formats(tiny_dir):
    old = with_format(tiny_dir, "float16")
    old.ingest_documents([Document.of("a.txt", NOTE * 3)])
    new = with_format(tiny_dir, "int4")  # the setting applies to the blocks written from now on
    new.ingest_documents([Document.of("b.txt", "The bakery opens at seven on Sundays. " * 6)])
    codecs = [tensors_and_codec(p)[1] for p in block_files(new)]
    assert sorted(str(c and c["bits"]) for c in codecs) == ["4", "None"]
    assert new.verify()["ok"]
    for budget in (0, 64):
        answer = new.ask("When does the bakery open?", max_new_tokens=4, budget=budget)
        "".join(answer)
        assert len(answer.ids) == 4  # random weights and no end token: the full length
    assert {s["name"].split("/")[-1] for s in new.status()["sources"]} == {"a.txt", "b.txt"}


def test_an_unknown_block_format_is_a_config_error(tmp_path, monkeypatch):
    from memllm_cli.config import load_settings

    config = tmp_path / "config.toml"
    config.write_text('block_format = "int3"\n')
    monkeypatch.setenv("MEMLLM_CONFIG", str(config))
    with pytest.raises(ConfigError, match="block_format must be one of float16, int8, int4"):
        load_settings()


def test_writing_keeps_ram_about_the_pool_and_never_materializes_it(tiny_dir):
    service = Memllm(model=str(tiny_dir))
    memory = service.scratch_memory(pool_size=512, write_context=64, seed=1)
    for i in range(40):
        service.write_text(memory, f"Note {i}. " + NOTE, name=f"n{i}")
        assert not memory.has_states  # the pool is an index of (block, row) between reads
        rows = sum(len(entry["keys"]) for entry in memory.ram_blocks.values())
        assert rows <= 2 * memory.pool_size
    whole = memory.context()  # gathered whole to read it whole, and kept until the next write
    assert memory.has_states and len(whole) == len(memory) + len(service.model().cache["sink"])


def test_a_fork_never_mistakes_its_blocks_for_the_pending_ones_it_started_from(tiny_dir):
    service = Memllm(model=str(tiny_dir))
    memory = service.scratch_memory(pool_size=512, write_context=64, seed=2, keep_blocks=True)
    for i in range(3):
        service.write_text(memory, f"Note {i}. " + NOTE, name=f"n{i}")
    start = memory.context()
    fork = memory.fork()
    fork.archive_in_ram(True)
    service.write_text(fork, "A different note about the bakery. " * 3, name="fork")
    kept = fork.context()
    assert len(kept) < 512  # no drops yet: the fork's pool starts with the original's tokens, unchanged
    assert torch.equal(kept.keys[:, :, :len(start)], start.keys)
    assert torch.equal(memory.context().keys, start.keys)


def test_a_quantized_memory_survives_export_import_and_damage_is_found(tiny_dir, tmp_path):
    service = with_format(tiny_dir, "int4")
    service.ingest_documents([Document.of("a.txt", NOTE * 4), Document.of("b.txt", "The shed code is 9021. " * 5)])
    before = service.ask("What is the shed code?", max_new_tokens=5)
    "".join(before)
    service.export(tmp_path / "m.tar")
    copy = with_format(tiny_dir, None, memory="copy")
    copy.import_(tmp_path / "m.tar")
    after = copy.ask("What is the shed code?", max_new_tokens=5)
    "".join(after)
    assert after.ids == before.ids and copy.verify()["ok"]
    victim = block_files(copy)[0]
    data = bytearray(victim.read_bytes())
    data[-8:] = b"\xff" * 8
    victim.write_bytes(bytes(data))
    report = copy.verify()
    assert not report["ok"] and any(victim.stem[:12] in d for d in report["damaged"])


def test_a_format_2_memory_moves_to_format_3_without_rewriting_a_block(tiny_dir):
    old = with_format(tiny_dir, "float16")
    old.ingest_documents([Document.of("a.txt", NOTE * 3)])
    info_path = old.settings.home / "memories" / "default" / "memory.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "format": 2}))  # as memllm wrote it before compact blocks
    before = [p.name for p in block_files(old)]
    again = Memllm(model=str(tiny_dir))
    answer = again.ask("Who is the garden coordinator?", max_new_tokens=4)
    "".join(answer)
    assert json.loads(info_path.read_text())["format"] == 3
    assert any(e.get("migration") == "0002-block-formats" for e in again.store.open("default").journal())
    assert [p.name for p in block_files(again)] == before and again.verify()["ok"]  # nothing rewritten


def test_the_config_offers_every_block_format_the_codec_writes():
    from memllm_cli.config import _CHOICES

    assert set(_CHOICES["block_format"]) == set(codec.FORMATS)
