"""The disk budget (issue 12): beyond max_disk, the least recently read long-term blocks keep
only their token ids; a question that needs one gets its keys and values recomputed; pool
blocks never go; verify, export, status, gc and forget tell an evicted block from a damaged one."""

import dataclasses
import json
import tarfile

import pytest
import torch

from memllm_cli.config import parse_size
from memllm_cli.errors import ConfigError
from memllm_cli.service import Memllm
from memllm_cli.service.space import ROOM
from memllm_cli.text.sources import Document
from tests.test_faults import cli, garble

TOPICS = ["The tool shed code is 4417.", "Compost bins stand behind the shed.", "Watering is on Tuesdays.",
          "The bakery opens at seven.", "Maria Okafor coordinates the garden.", "Bees live by the north wall.",
          "The pond was dug in 2019.", "Seeds are kept in the blue cabinet."]


@pytest.fixture(autouse=True)
def same_drops(monkeypatch):
    """Every memory here drops the same tokens in every run (which blocks the pool still holds
    depends on the drops)."""
    monkeypatch.setattr("memllm_cli.memory.free.secrets.randbits", lambda bits: 7)


def notes(count=8, repeat=14):
    return [Document.of(f"n{i}.txt", " ".join([TOPICS[i % len(TOPICS)] + f" Note {i}."] * repeat))
            for i in range(count)]


def service_with(tiny_dir, **settings):
    service = Memllm(model=str(tiny_dir), pool_size=512)
    service.settings = dataclasses.replace(service.settings, **settings)
    return service


def folder(service, sub):
    return service.settings.home / "memories" / service.memory_name / sub


def pinned(service):
    tensors, meta = service.repo.read_version(service.repo.head())
    return {meta["blocks"][i] for i in tensors["block"].unique().tolist()}


@pytest.fixture
def filled(tiny_dir):
    """A memory whose pool dropped its first notes: some blocks are long-term only."""
    service = service_with(tiny_dir)
    service.ingest_documents(notes())
    assert set(service.repo.blocks()) - pinned(service), "the test needs blocks the pool no longer holds"
    return service


def test_sizes_parse_with_units():
    assert parse_size("1GB") == 10**9 and parse_size("2 GiB") == 2 * 2**30 and parse_size("500mb") == 5 * 10**8
    assert parse_size(1234) == 1234
    for bad in ("1 XB", "GB", "-1GB", -1, True, ""):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_max_disk_evicts_long_term_blocks_only(filled, tiny_dir):
    before = filled.repo.disk_bytes()
    keep = pinned(filled)
    limited = service_with(tiny_dir, max_disk=1)  # below what the pool alone takes: evict all it may
    result = limited.gc()
    evicted = set(filled.repo.evicted())
    assert evicted - keep and set(filled.repo.blocks()) <= keep
    tensors, meta = filled.repo.read_version(filled.repo.head())
    held = {}
    for blk, row in zip(tensors["block"].tolist(), tensors["row"].tolist(), strict=True):
        held.setdefault(meta["blocks"][blk], set()).add(row)
    for block in keep - set(filled.repo.blocks()):  # a pool block goes only trimmed to the rows the pool holds
        rows, _, _ = filled.repo.read_kept(block)
        assert set(rows.tolist()) == held[block]
    disk = result["disk"]
    assert disk["evicted_blocks"] + disk.get("trimmed_blocks", 0) == len(evicted) and "over the budget" in disk["note"]
    assert filled.repo.disk_bytes() < before
    assert filled.verify()["ok"] and filled.verify()["checked"]["evicted"] == len(evicted)
    status = limited.status()
    assert status["evicted_blocks"] == len(evicted) and status["max_disk"] == 1
    assert {s["name"] for s in status["sources"]} == {f"n{i}.txt" for i in range(8)}
    assert sum(s["long_term"] for s in status["sources"]) > 0  # evicted text is still findable


def test_an_evicted_block_is_recomputed_exactly_when_first_written_after_the_sink(tiny_dir):
    # The first note is written after the sink alone, as recomputation writes it again: equal keys.
    service = service_with(tiny_dir, block_format="float16")
    service.ingest_documents(notes(8))
    mem = service.load()
    first = mem.blocks[0]
    assert first not in pinned(service)
    stored = mem.block_states(first, None)
    service_with(tiny_dir, max_disk=1).gc()
    assert service.repo.is_evicted(first) and not service.repo.has_block(first)
    recomputed = service.load().block_states(first, None)
    assert torch.allclose(recomputed["keys"].float(), stored["keys"].float(), atol=1e-3)
    assert torch.allclose(recomputed["values"].float(), stored["values"].float(), atol=1e-3)


def test_ask_reads_evicted_blocks_and_caches_them_within_the_budget(filled, tiny_dir):
    question = "What is the tool shed code?"  # note 0: written first, after the sink alone
    first = filled.load().blocks[0]

    def ask(service):
        answer = service.ask(question, max_new_tokens=4, budget=4096)
        "".join(answer)
        assert not answer.info.get("damaged")
        return answer.ids, [s["source"] for s in answer.info["sources"]]

    before = ask(filled)
    assert before[1] == ["n0.txt"]
    service_with(tiny_dir, max_disk=1).gc()
    assert filled.repo.is_evicted(first)
    assert ask(filled) == before  # recomputed after the sink alone, as it was first written
    assert not list(folder(filled, "recomputed").glob("*"))  # no max_disk at ask: nothing cached
    roomy = service_with(tiny_dir, max_disk=10**9)
    assert ask(roomy) == before
    assert [p.stem for p in folder(filled, "recomputed").glob("*.safetensors")] == [first]
    assert ask(roomy) == before  # read back from the cache
    assert filled.verify()["ok"]


def test_the_least_recently_read_blocks_go_first(tiny_dir):
    service = service_with(tiny_dir)
    service.ingest_documents(notes(8))
    mem = service.load()
    long_term = [b for b in mem.blocks if b not in pinned(service)]
    assert len(long_term) >= 2
    oldest = long_term[0]
    service.repo.note_reads([oldest])  # an answer read the oldest block
    budget = service.repo.disk_bytes() - 1
    service_with(tiny_dir, max_disk=budget).gc()
    lru = [b for b in long_term if b != oldest] + [oldest]  # unread ones in the order they were written
    evicted = set(service.repo.evicted())
    assert 1 <= len(evicted) < len(lru) and evicted == set(lru[:len(evicted)])
    assert service.repo.disk_bytes() <= budget * (1 - ROOM)  # evicting leaves room to cache recomputed blocks


def test_ingest_with_max_disk_stays_within_it(tiny_dir):
    service = service_with(tiny_dir)
    service.ingest_documents(notes(4))
    limit = service.repo.disk_bytes()
    limited = service_with(tiny_dir, max_disk=limit)
    report = limited.ingest_documents(notes(12)[4:])
    assert report.disk["evicted_blocks"] > 0 and report.disk["max_disk"] == limit
    assert service.repo.disk_bytes() <= limit or "note" in report.disk
    assert service.verify()["ok"]
    answer = limited.ask("When does the bakery open?", max_new_tokens=4, budget=512)
    "".join(answer)
    assert answer.info["sources"] and not answer.info.get("damaged")


def test_verify_tells_a_damaged_evicted_block_from_an_evicted_one(filled, tiny_dir):
    service_with(tiny_dir, max_disk=1).gc()
    stubs = sorted(folder(filled, "evicted").glob("*.safetensors"))
    garble(stubs[0])
    report = filled.verify()
    assert not report["ok"]
    assert any("evicted block" in d and stubs[0].stem[:12] in d for d in report["damaged"])
    stubs[1].unlink()
    damaged = " ".join(filled.verify()["damaged"])
    assert f"block {stubs[1].stem[:12]} is missing or damaged" in damaged


def test_export_keeps_evicted_blocks_not_recomputed_ones(filled, tiny_dir, tmp_path):
    service_with(tiny_dir, max_disk=1).gc()
    "".join(service_with(tiny_dir, max_disk=10**9).ask("The tool shed code?", max_new_tokens=2, budget=4096))
    assert list(folder(filled, "recomputed").glob("*.safetensors"))
    archive = tmp_path / "m.tar"
    filled.export(archive)
    names = tarfile.open(archive).getnames()
    assert any("/evicted/" in n for n in names) and not any("recomputed" in n or "reads" in n for n in names)
    copy = Memllm(model=str(tiny_dir), memory="copy")
    copy.import_(archive)
    assert copy.verify()["ok"] and copy.status()["evicted_blocks"] == len(filled.repo.evicted())
    answer = copy.ask("The tool shed code?", max_new_tokens=2, budget=4096)
    "".join(answer)
    assert [s["source"] for s in answer.info["sources"]] == ["n0.txt"] and not answer.info.get("damaged")


def test_gc_and_purge_remove_what_eviction_left(filled, tiny_dir):
    service_with(tiny_dir, max_disk=1).gc()
    "".join(service_with(tiny_dir, max_disk=10**9).ask("The tool shed code?", max_new_tokens=2, budget=4096))
    victim = filled.load().blocks[0]
    assert (folder(filled, "recomputed") / f"{victim}.safetensors").exists()
    name = filled.repo.block_meta(victim)["source"]
    filled.forget([name], purge=True)
    assert victim not in filled.repo.evicted()
    assert not (folder(filled, "recomputed") / f"{victim}.safetensors").exists()
    assert filled.verify()["ok"]


def test_max_disk_on_the_command_line(filled, env_model, tmp_path):
    code, out, err = cli("gc", "--max-disk", "12 parsecs")
    assert code == 2 and "not a size" in err and "Traceback" not in err
    code, out, err = cli("gc", "--max-disk", "1KB", "--json")
    assert code == 0, err
    assert json.loads(out)["disk"]["evicted_blocks"] > 0
    code, out, err = cli("status")
    assert code == 0 and "evicted" in out
    more = tmp_path / "more.txt"
    more.write_text(" ".join(["The gate is painted green."] * 20))
    code, out, err = cli("ingest", "--max-disk", "1KB", str(more))
    assert code == 0, err
    assert "evicted" in err and "over the budget" in err


def test_max_disk_in_the_config_file(tmp_path, monkeypatch):
    config = tmp_path / "c.toml"
    monkeypatch.setenv("MEMLLM_CONFIG", str(config))
    config.write_text('max_disk = "1.5GB"\n')
    assert Memllm().settings.max_disk == 1_500_000_000
    config.write_text('max_disk = "lots"\n')
    with pytest.raises(ConfigError, match="max_disk"):
        Memllm()


def test_a_rollback_to_a_pool_of_evicted_blocks_reads_them_recomputed(tiny_dir):
    service = service_with(tiny_dir)
    service.ingest_documents(notes(1))
    old = service.repo.head()
    service.ingest_documents(notes(8)[1:])
    first = service.load().blocks[0]
    service_with(tiny_dir, max_disk=1).gc()
    assert service.repo.is_evicted(first)
    service.rollback(old)
    assert service.verify()["ok"]
    answer = service.ask("What is the tool shed code?", max_new_tokens=3, budget=0)  # the whole pool
    "".join(answer)
    assert len(answer.ids) == 3
    service.ingest_documents(notes(9)[8:])  # writing after it gathers its rows too
    assert service.verify()["ok"]


@pytest.mark.parametrize("block_format", ["int4", "int4-s8", "int4-s8-zstd", "float16"])
def test_pool_blocks_keep_the_rows_the_pool_holds_bit_for_bit(tiny_dir, block_format):
    service = service_with(tiny_dir, block_format=block_format)
    service.ingest_documents(notes(12))
    before = service.load(states=True).pool
    result = service_with(tiny_dir, max_disk=1).gc()
    assert result["disk"].get("trimmed_blocks", 0) > 0
    assert set(service.repo.blocks()) < pinned(service)  # some pool blocks now keep only their held rows
    after = service.load(states=True).pool
    assert torch.equal(after.keys, before.keys) and torch.equal(after.values, before.values)
    assert service.verify()["ok"]
    service.ingest_documents(notes(14)[12:])  # writing after a trimmed pool gathers its rows exactly
    assert service.verify()["ok"]
    trimmed = [p for p in folder(service, "evicted").glob("*.safetensors") if p.stem in pinned(service)]
    garble(trimmed[0])
    assert any(trimmed[0].stem[:12] in d for d in service.verify()["damaged"])
