import json
import os
import stat
import threading

import pytest
import torch

from memllm_cli.errors import Busy, MemoryNotFound, StoreError
from memllm_cli.store import FORMAT, Store


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_objects_refs_and_journal_with_user_only_permissions(isolated_home):
    store = Store(isolated_home)
    repo = store.open("notes")
    repo.create({"model": {"name": "m", "fingerprint": "f"}})
    assert repo.head() is None
    keys = torch.randn(5, 2, 3)
    block = repo.write_block({"keys": keys, "values": keys + 1}, {"source": "a.txt"})
    assert repo.write_block({"keys": keys, "values": keys + 1}, {"source": "a.txt"}) == block  # by content
    got = repo.read_block_rows(block, [0, 1, 3], ("keys",))
    assert torch.equal(got["keys"], keys[[0, 1, 3]])
    index = {"block": torch.zeros(3, dtype=torch.int32), "row": torch.tensor([0, 1, 3], dtype=torch.int32)}
    version = repo.write_version(index, {"parent": None, "blocks": [block]})
    repo.set_head(version)
    repo.set_tag("before", version)
    repo.log_operation({"op": "ingest"})
    assert repo.resolve("HEAD") == repo.resolve("before") == repo.resolve(version[:8])
    tensors, meta = repo.read_version(version)
    assert meta["blocks"] == [block] and tensors["block"].tolist() == [0, 0, 0]
    assert repo.journal() == [{"op": "ingest"}]
    folder = isolated_home / "memories" / "notes"
    assert mode(isolated_home / "memories") == 0o700
    assert all(mode(p) == 0o700 for p in folder.rglob("*") if p.is_dir())
    assert all(mode(p) == 0o600 for p in folder.rglob("*") if p.is_file())
    assert store.names() == ["notes"]
    assert repo.verify().ok


def test_verify_names_what_is_damaged(isolated_home):
    store = Store(isolated_home)
    repo = store.open("m")
    repo.create({})
    keys = torch.randn(4, 2)
    block = repo.write_block({"keys": keys, "values": keys.clone()}, {})
    version = repo.write_version({"block": torch.zeros(2, dtype=torch.int32), "row": torch.arange(2)},
                                  {"parent": None, "blocks": [block]})
    repo.set_head(version)
    path = isolated_home / "memories" / "m" / "blocks" / f"{block}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    report = repo.verify()
    assert not report.ok
    assert f"block {block[:12]}: checksum mismatch" in report.damaged
    assert any(f"version {version[:12]}: block {block[:12]}" in d for d in report.damaged)


def test_unknown_and_invalid_names(isolated_home):
    store = Store(isolated_home)
    repo = store.open("nope")
    with pytest.raises(MemoryNotFound, match="no memory named 'nope'"):
        repo.info()
    for bad in ["../escape", ".hidden", "a/b", ""]:
        with pytest.raises(MemoryNotFound, match="invalid memory name"):
            store.open(bad)


def test_newer_format_is_refused(isolated_home):
    store = Store(isolated_home)
    repo = store.open("m")
    repo.create({})
    path = isolated_home / "memories" / "m" / "memory.json"
    path.write_text(json.dumps({"format": FORMAT + 1}))
    with pytest.raises(StoreError, match=f"newer memllm \\(format {FORMAT + 1}"):
        repo.info()


def test_a_failed_write_keeps_head(isolated_home, monkeypatch):
    store = Store(isolated_home)
    repo = store.open("m")
    repo.create({})
    first = repo.write_version({"block": torch.zeros(1)}, {"parent": None})
    repo.set_head(first)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("memllm_cli.store.repo.os.replace", crash)
    with pytest.raises(OSError):
        repo.set_head(repo.write_version({"block": torch.ones(1)}, {"parent": first}))
    assert repo.head() == first
    assert not [p for p in (isolated_home / "memories" / "m").rglob("*.tmp")]


def test_lock_times_out_with_a_clear_error(isolated_home):
    store = Store(isolated_home)
    repo = store.open("m")
    held, release = threading.Event(), threading.Event()

    def holder():
        with repo.lock(timeout=5, create=True):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    try:
        with pytest.raises(Busy, match="memory 'm' is busy"):
            with Store(isolated_home).open("m").lock(timeout=0.2):
                pass
    finally:
        release.set()
        thread.join()
