"""The versioned store through the service: log, snapshots, rollback, diff, forget, verify, gc, migration."""

import dataclasses
import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from memllm_cli.errors import InputError, StoreError
from memllm_cli.service import Memllm
from memllm_cli.store import FORMAT
from memllm_cli.text.sources import Document


def doc(name, text):
    return Document(name, text, hashlib.sha256(text.encode()).hexdigest())


NOTE = "The garden coordinator is Maria Okafor. Volunteers meet every Tuesday at six. "


@pytest.fixture
def service(tiny_dir):
    return Memllm(model=str(tiny_dir))


def test_every_ingest_is_a_version_and_log_walks_them(service):
    service.ingest_documents([doc("a", NOTE)])
    service.ingest_documents([doc("b", "Second note. " * 10)])
    log = service.log()
    assert [e["op"] for e in log] == ["ingest", "ingest"]
    assert log[0]["tokens"] == log[0]["added"] + log[1]["tokens"]
    assert service.repo.resolve("HEAD~1") == log[1]["version"]
    assert service.verify()["ok"]


def test_a_version_stores_only_new_tokens(service):
    service.ingest_documents([doc("a", NOTE * 3)])
    blocks_before = service.repo.blocks()
    service.ingest_documents([doc("b", "Another note. " * 5)])
    assert len(service.repo.blocks()) == len(blocks_before) + 1
    version_file = service.repo.folder / "versions" / f"{service.repo.head()}.safetensors"
    from safetensors import safe_open

    with safe_open(version_file, framework="pt") as f:  # an index of (block, row) pairs, not a pool copy
        assert sorted(f.keys()) == ["block", "chunk", "row", "source"]
        assert all(f.get_slice(k).get_dtype() == "I32" for k in f.keys())


def test_snapshot_rollback_and_undo(service):
    service.ingest_documents([doc("a", NOTE)])
    service.snapshot_create("one", "first")
    service.ingest_documents([doc("b", "Second note. " * 10)])
    full = service.status()["tokens"]
    plan = service.rollback("one", dry_run=True)
    assert plan["dry_run"] and service.status()["tokens"] == full
    result = service.rollback("one")
    assert service.status()["tokens"] == plan["diff"]["totals"]["held"] < full
    assert service.log()[0]["op"] == "rollback"
    service.rollback("HEAD~1")  # undo the rollback
    assert service.status()["tokens"] == full
    assert result["to"] == service.repo.tags()["one"]
    assert [s["snapshot"] for s in service.snapshot_list()] == ["one"]
    assert service.snapshot_list()[0]["message"] == "first"
    service.snapshot_delete("one")
    assert service.snapshot_list() == []
    with pytest.raises(InputError, match="no snapshot named 'one'"):
        service.snapshot_delete("one")
    with pytest.raises(InputError, match="neither a snapshot nor a version"):
        service.rollback("nope")


def test_diff_per_source(service):
    service.ingest_documents([doc("a", NOTE)])
    service.ingest_documents([doc("b", "Second note. " * 10)])
    result = service.diff()
    rows = {r["source"]: r for r in result["sources"]}
    assert rows["b"]["added"] == rows["b"]["held"] == rows["b"]["written"] > 0 and rows["b"]["retained"] == 1.0
    assert rows["a"]["added"] == 0 and rows["a"]["dropped"] == 0
    assert result["totals"]["added"] == rows["b"]["added"]


def test_forget_makes_a_version_without_the_document(service, tmp_path):
    (tmp_path / "secret.txt").write_text("The password is hunter2. " * 4)
    service.ingest([str(tmp_path / "secret.txt")])
    service.ingest_documents([doc("keep", NOTE)])
    before = service.status()
    result = service.forget([str(tmp_path / "secret.txt")])
    after = service.status()
    assert result["tokens_removed"] == before["sources"][0]["tokens_held"]
    assert [s["name"] for s in after["sources"]] == ["keep"]
    assert after["tokens"] == before["tokens"] - result["tokens_removed"]
    again = service.ingest([str(tmp_path / "secret.txt")])  # forgotten content can be written again
    assert again.chunks == 1
    with pytest.raises(InputError, match="no such document"):
        service.forget(["never-ingested.txt"])


def test_pool_read_back_from_blocks_equals_the_pool_written(service):
    memory = service.scratch_memory(pool_size=512, write_context=64, seed=3)
    memory.keep_blocks = True
    for i in range(6):
        service.write_text(memory, f"Note {i}. " + NOTE * 2, name=f"n{i}")
    copy = Memllm(dataclasses.replace(service.settings, memory="copy"))
    lm = copy.model()
    copy.repo.create({"model": {"name": lm.name, "fingerprint": lm.fingerprint}})
    memory.library = copy.repo
    copy._commit(memory, "ingest")
    loaded = copy.load(states=True)
    memory.load_states()  # gathered from the blocks in RAM (writing keeps only the pool's index)
    assert torch.equal(loaded.pool.keys, memory.pool.keys) and torch.equal(loaded.pool.values, memory.pool.values)
    assert torch.equal(loaded.pool.tags["source"], memory.pool.tags["source"])


def test_gc_deletes_only_what_nothing_reaches(service):
    service.ingest_documents([doc("a", NOTE)])
    service.snapshot_create("keep")
    service.ingest_documents([doc("b", "Second note. " * 10)])
    assert service.gc()["blocks_deleted"] == 0
    # an orphan left by a crash between writing a block and committing its version: kept (repair
    # may take it back) until gc is told to drop what no version names
    service.repo.write_block({"keys": torch.zeros(1, 2), "values": torch.zeros(1, 2)}, {})
    kept = service.gc()
    assert kept["blocks_deleted"] == 0 and kept["unreached_kept"] == 1
    result = service.gc(drop_unreached=True)
    assert result["blocks_deleted"] == 1 and result["bytes_freed"] > 0 and result["unreached_kept"] == 0
    assert service.verify()["ok"] and service.status()["tokens"] > 0


def test_a_format_1_memory_migrates_forward(tiny_dir, isolated_home):
    # Write a memory the way memllm 0.1 (store format 1) did: one pool file.
    service = Memllm(model=str(tiny_dir))
    memory = service.scratch_memory(seed=5)
    service.write_text(memory, NOTE * 2, name="a.txt")
    service.write_text(memory, "Second note. " * 10, name="b.txt")
    lm = service.model()
    folder = isolated_home / "memories" / "old"
    folder.mkdir(parents=True)
    (folder / "memory.json").write_text(json.dumps({
        "format": 1, "kind": "training-free", "model": {"name": lm.name, "fingerprint": lm.fingerprint},
        "pool_size": memory.pool_size, "write_context": memory.write_context, "dtype": memory.dtype,
    }))
    memory.load_states()
    tags = memory.pool.tags
    save_file(
        {"keys": memory.pool.keys, "values": memory.pool.values, "tag.source": tags["source"],
         "tag.chunk": tags["chunk"], "tag.offset": tags["row"]},
        folder / "pool.safetensors",
        metadata={"memllm": json.dumps({
            "format": 1, "pool_size": memory.pool_size, "write_context": memory.write_context,
            "dtype": memory.dtype, "seed": memory.seed, "updates": memory.updates,
            "sources": memory.sources,
        })},
    )
    old = Memllm(model=str(tiny_dir), memory="old")
    expected = old.ask_in(memory, "who?", max_new_tokens=5)
    "".join(expected)
    answer = old.ask("who?", max_new_tokens=5)
    "".join(answer)
    assert answer.ids == expected.ids
    assert old.store.open("old").info()["format"] == FORMAT and not (folder / "pool.safetensors").exists()
    assert [e["op"] for e in old.log()] == ["migrate"]
    assert old.verify()["ok"]
    migrations = [e["migration"] for e in old.store.open("old").journal() if e.get("op") == "migrate"]
    assert migrations == ["0001-pool-file-to-blocks", "0002-block-formats"]  # each step runs, each is journalled


def test_eight_ingests_at_once_all_land(tmp_path, env_model):
    files = []
    for i in range(8):
        files.append(tmp_path / f"job{i}.txt")
        files[-1].write_text(f"Cron job {i} wrote this line. " * 3)
    procs = [
        subprocess.Popen([sys.executable, "-m", "memllm_cli", "ingest", "--json", str(f)], stdout=subprocess.PIPE)
        for f in files
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    service = Memllm()
    assert len(service.log()) == 8
    assert service.status()["tokens"] == sum(json.loads(o)["tokens"] for o in outs)
    assert service.verify()["ok"]


def test_export_then_import_elsewhere_keeps_history_and_answers(service, tmp_path, tiny_dir, monkeypatch):
    service.ingest_documents([doc("a", NOTE)])
    service.snapshot_create("one")
    service.ingest_documents([doc("b", "Second note. " * 10)])
    expected = service.ask("who?", max_new_tokens=4)
    "".join(expected)
    archive = tmp_path / "memory.tar"
    service.export(archive)

    monkeypatch.setenv("MEMLLM_HOME", str(tmp_path / "other-machine"))
    moved = Memllm(memory="moved")
    assert moved.import_(archive)["versions"] == 2
    answer = moved.ask("who?", max_new_tokens=4)
    "".join(answer)
    assert answer.ids == expected.ids and moved.model().name == str(tiny_dir)
    assert [e["version"] for e in moved.log()] == [e["version"] for e in service.log()]
    assert list(moved.store.open("moved").tags()) == ["one"] and moved.verify()["ok"]
    with pytest.raises(InputError, match="exists"):
        moved.import_(archive)


def test_import_refuses_damaged_or_foreign_archives(tmp_path, service):
    import tarfile

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all")
    with pytest.raises(InputError, match="not a tar archive"):
        Memllm(memory="x").import_(junk)
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        (tmp_path / "f").write_text("x")
        tar.add(tmp_path / "f", arcname="../../escape")
    with pytest.raises(InputError, match="not a memllm export"):
        Memllm(memory="x").import_(evil)
    service.ingest_documents([doc("a", NOTE)])
    archive = tmp_path / "m.tar"
    service.export(archive)
    data = bytearray(archive.read_bytes())
    block_at = data.find(b"__metadata__") + 200  # inside the first stored file's bytes
    data[block_at] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged"):
        Memllm(memory="x").import_(archive)
    assert "x" not in Memllm().memories()


def test_forget_purge_removes_the_bytes_from_every_version(service, tmp_path):
    secret_text = "The password is hunter2. " * 6
    (tmp_path / "passwords.txt").write_text(secret_text)
    service.ingest_documents([doc("keep", NOTE)])
    service.ingest([str(tmp_path / "passwords.txt")])
    service.snapshot_create("with-secret")
    service.ingest_documents([doc("later", "Later note. " * 8)])
    secret_blocks = [b for b in service.repo.blocks()
                     if service.repo.block_meta(b).get("source") == str(tmp_path / "passwords.txt")]
    assert secret_blocks
    result = service.forget([str(tmp_path / "passwords.txt")], purge=True)
    assert result["purged_blocks"] == len(secret_blocks)
    assert not set(secret_blocks) & set(service.repo.blocks())
    assert service.verify()["ok"]
    for version in service.repo.versions():
        tensors, meta = service.repo.read_version(version)
        assert "passwords" not in json.dumps(meta)
    folder = service.repo.folder
    for path in (folder / "blocks").iterdir():
        assert b"passwords" not in path.read_bytes()
    # history survives, minus the secret: the snapshot still names a version, older ingests stay
    assert service.repo.tags()["with-secret"] in service.repo.versions()
    assert [s["name"] for s in service.status()["sources"]] == ["keep", "later"]
    service.rollback("with-secret")
    assert [s["name"] for s in service.status()["sources"]] == ["keep"]


def test_replaying_the_same_ingests_from_a_version_is_bit_identical(tiny_dir):
    service = Memllm(model=str(tiny_dir), pool_size=512, write_context=128)
    service.ingest_documents([doc(f"d{i}", f"Base {i}. " + NOTE * 2) for i in range(4)])
    service.snapshot_create("base")
    replay = [doc(f"r{i}", f"Replay {i}. " + NOTE * 2) for i in range(4)]
    service.ingest_documents(replay)
    first = service.load(states=True)
    service.rollback("base")
    service.ingest_documents(replay, force=True)
    second = service.load(states=True)
    assert sum(u["dropped"] for u in service.repo.version_meta(second.head)["updates"]) > 0
    assert torch.equal(first.pool.keys, second.pool.keys) and torch.equal(first.pool.values, second.pool.values)
    assert first.blocks == second.blocks


def test_gc_with_a_history_limit_prunes_old_versions(tiny_dir):
    service = Memllm(model=str(tiny_dir), pool_size=512, write_context=64)
    for i in range(8):
        service.ingest_documents([doc(f"d{i}", f"Note {i}. " + NOTE * 3)])
    before = service.repo.disk_bytes()
    dry = service.gc(keep_versions=2, dry_run=True)
    assert dry["versions_deleted"] == 6 and service.repo.disk_bytes() == before
    result = service.gc(keep_versions=2)
    assert result["versions_deleted"] == 6 and result["bytes_freed"] > 0
    assert service.repo.disk_bytes() < before
    # blocks go once none of their tokens is in a kept version
    used = {b for v in service.repo.versions() for b in service.repo.version_meta(v)["blocks"]}
    assert set(service.repo.blocks()) == used
    assert service.verify()["ok"]  # the pruned parent is not damage
    assert len(service.log()) == 2
    with pytest.raises(InputError, match="past what gc kept"):
        service.rollback("HEAD~2")
    service.ingest_documents([doc("after", "After gc. " * 5)])
    assert service.verify()["ok"]
