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


def test_round_trip_with_user_only_permissions(isolated_home):
    store = Store(isolated_home)
    store.create("notes", {"model": {"name": "m", "fingerprint": "f"}})
    assert store.read_pool("notes") is None
    tensors = {"keys": torch.randn(2, 3, 4), "tag.source": torch.arange(4)}
    store.write_pool("notes", tensors, {"hello": [1, 2]})
    got, meta = store.read_pool("notes")
    assert torch.equal(got["keys"], tensors["keys"]) and torch.equal(got["tag.source"], tensors["tag.source"])
    assert meta == {"format": FORMAT, "hello": [1, 2]}
    folder = isolated_home / "memories" / "notes"
    assert mode(isolated_home / "memories") == 0o700 and mode(folder) == 0o700
    assert all(mode(p) == 0o600 for p in folder.iterdir())
    assert store.names() == ["notes"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


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


def test_damaged_pool_is_reported(isolated_home):
    store = Store(isolated_home)
    store.create("m", {})
    (isolated_home / "memories" / "m" / "pool.safetensors").write_bytes(b"\x10\x00\x00garbage")
    with pytest.raises(StoreError, match="memory 'm' is damaged"):
        store.read_pool("m")


def test_a_failed_write_keeps_the_previous_pool(isolated_home, monkeypatch):
    store = Store(isolated_home)
    store.create("m", {})
    store.write_pool("m", {"keys": torch.ones(2)}, {"v": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("memllm_cli.store.os.replace", crash)
    with pytest.raises(OSError):
        store.write_pool("m", {"keys": torch.zeros(2)}, {"v": 2})
    tensors, meta = store.read_pool("m")
    assert meta["v"] == 1 and torch.equal(tensors["keys"], torch.ones(2))
    assert not [p for p in (isolated_home / "memories" / "m").iterdir() if p.name.endswith(".tmp")]


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
