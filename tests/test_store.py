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
    store.create("notes", {"model": {"name": "m", "fingerprint": "f"}})
    assert store.head("notes") is None
    keys = torch.randn(5, 2, 3)
    block = store.write_block("notes", {"keys": keys, "values": keys + 1}, {"source": "a.txt"})
    assert store.write_block("notes", {"keys": keys, "values": keys + 1}, {"source": "a.txt"}) == block  # by content
    got = store.read_block_rows("notes", block, [0, 1, 3], ("keys",))
    assert torch.equal(got["keys"], keys[[0, 1, 3]])
    index = {"block": torch.zeros(3, dtype=torch.int32), "row": torch.tensor([0, 1, 3], dtype=torch.int32)}
    version = store.write_version("notes", index, {"parent": None, "blocks": [block]})
    store.set_head("notes", version)
    store.set_tag("notes", "before", version)
    store.log_operation("notes", {"op": "ingest"})
    assert store.resolve("notes", "HEAD") == store.resolve("notes", "before") == store.resolve("notes", version[:8])
    tensors, meta = store.read_version("notes", version)
    assert meta["blocks"] == [block] and tensors["block"].tolist() == [0, 0, 0]
    assert store.journal("notes") == [{"op": "ingest"}]
    folder = isolated_home / "memories" / "notes"
    assert mode(isolated_home / "memories") == 0o700
    assert all(mode(p) == 0o700 for p in folder.rglob("*") if p.is_dir())
    assert all(mode(p) == 0o600 for p in folder.rglob("*") if p.is_file())
    assert store.names() == ["notes"]
    assert store.verify("notes").ok


def test_verify_names_what_is_damaged(isolated_home):
    store = Store(isolated_home)
    store.create("m", {})
    keys = torch.randn(4, 2)
    block = store.write_block("m", {"keys": keys, "values": keys.clone()}, {})
    version = store.write_version("m", {"block": torch.zeros(2, dtype=torch.int32), "row": torch.arange(2)},
                                  {"parent": None, "blocks": [block]})
    store.set_head("m", version)
    path = isolated_home / "memories" / "m" / "blocks" / f"{block}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    report = store.verify("m")
    assert not report.ok
    assert f"block {block[:12]}: checksum mismatch" in report.damaged
    assert any(f"version {version[:12]}: block {block[:12]}" in d for d in report.damaged)


def test_unknown_and_invalid_names(isolated_home):
    store = Store(isolated_home)
    with pytest.raises(MemoryNotFound, match="no memory named 'nope'"):
        store.info("nope")
    for bad in ["../escape", ".hidden", "a/b", ""]:
        with pytest.raises(MemoryNotFound, match="invalid memory name"):
            store.path(bad)


def test_newer_format_is_refused(isolated_home):
    store = Store(isolated_home)
    store.create("m", {})
    path = isolated_home / "memories" / "m" / "memory.json"
    path.write_text(json.dumps({"format": FORMAT + 1}))
    with pytest.raises(StoreError, match=f"newer memllm \\(format {FORMAT + 1}"):
        store.info("m")


def test_a_failed_write_keeps_head(isolated_home, monkeypatch):
    store = Store(isolated_home)
    store.create("m", {})
    first = store.write_version("m", {"block": torch.zeros(1)}, {"parent": None})
    store.set_head("m", first)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("memllm_cli.store.os.replace", crash)
    with pytest.raises(OSError):
        store.set_head("m", store.write_version("m", {"block": torch.ones(1)}, {"parent": first}))
    assert store.head("m") == first
    assert not [p for p in (isolated_home / "memories" / "m").rglob("*.tmp")]


def test_lock_times_out_with_a_clear_error(isolated_home):
    store = Store(isolated_home)
    held, release = threading.Event(), threading.Event()

    def holder():
        with store.lock("m", timeout=5):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    try:
        with pytest.raises(Busy, match="memory 'm' is busy"):
            with Store(isolated_home).lock("m", timeout=0.2):
                pass
    finally:
        release.set()
        thread.join()
