"""From every state verify reports back to a clean verify (issues 25 and 30), through the real
entry point: what repair mends, what it cannot and says so (exit 6, with the command that clears
it), and that nothing intact is lost on the way (gc keeps what no version names)."""

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_faults import cli, garble, head_blocks


@pytest.fixture
def notes(tmp_path, env_model, isolated_home, monkeypatch):
    """Two notes ingested one after the other; the memory's folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.md").write_text("The tool shed code is 4417. The garden coordinator is Maria Okafor.\n")
    (tmp_path / "b.md").write_text("Compost bins are behind the shed. Watering is on Tuesdays.\n")
    assert cli("ingest", "a.md")[0] == 0
    assert cli("ingest", "b.md")[0] == 0
    return isolated_home / "memories" / "default"


def head(folder: Path) -> str:
    return (folder / "refs" / "HEAD").read_text().strip()


def documents() -> list[str]:
    code, out, err = cli("status", "--json")
    assert code == 0, err
    return sorted(Path(s["name"]).name for s in json.loads(out)["sources"])


def verify_ok() -> bool:
    code, out, _ = cli("verify", "--json")
    return code == 0 and json.loads(out)["ok"]


def test_a_damaged_head_version_is_rebuilt_from_its_blocks_and_gc_loses_nothing(notes):
    pool = {k: t.clone() for k, t in load_file(notes / "versions" / f"{head(notes)}.safetensors").items()}
    (notes / "versions" / f"{head(notes)}.safetensors").write_bytes(b"\0" * 100)  # truncated, as a crash might
    code, out, err = cli("repair", "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"] and result["restored"] == [str(Path("b.md").resolve())], (out, err)
    assert verify_ok() and documents() == ["a.md", "b.md"]
    rebuilt = load_file(notes / "versions" / f"{head(notes)}.safetensors")
    assert all((rebuilt[k] == pool[k]).all() for k in pool)  # the same pool: the same drops, the same rows
    blocks = set((notes / "blocks").glob("*"))
    code, out, _ = cli("gc", "--json")
    assert code == 0 and json.loads(out)["blocks_deleted"] == 0 and set((notes / "blocks").glob("*")) == blocks
    assert "Traceback" not in cli("ask", "--max-tokens", "4", "compost?")[2]


def test_a_snapshot_on_the_damaged_head_names_the_rebuilt_version(notes):
    assert cli("snapshot", "create", "s")[0] == 0
    garble(notes / "versions" / f"{head(notes)}.safetensors")
    code, out, err = cli("repair")
    assert code == 0 and "names the rebuilt one" in out, (out, err)
    assert (notes / "refs" / "tags" / "s").read_text().strip() == head(notes)
    assert verify_ok()


def test_repair_with_to_leaves_the_lost_blocks_for_gc_to_keep(notes):
    first = cli("log", "--json")[1]
    parent = json.loads(first)[1]["version"]
    garble(notes / "versions" / f"{head(notes)}.safetensors")
    code, out, err = cli("repair", "--to", parent[:12], "--json")
    assert code == 0 and json.loads(out)["head"] == parent and verify_ok(), err
    assert documents() == ["a.md"]
    code, out, err = cli("gc")
    assert code == 0 and "kept 1 block(s) no version names" in err
    assert cli("gc", "--drop-unreached")[0] == 2  # deleting them needs a yes
    code, out, err = cli("repair", "--json")  # takes them back
    assert code == 0 and json.loads(out)["restored"], out
    assert documents() == ["a.md", "b.md"] and verify_ok()


def test_a_damaged_older_version_is_written_off_and_log_and_gc_work_again(notes):
    (notes.parent.parent.parent / "c.md").write_text("The bakery opens at seven.\n")
    assert cli("ingest", str(notes.parent.parent.parent / "c.md"))[0] == 0
    versions = json.loads(cli("log", "--json")[1])
    middle = versions[1]["version"]
    garble(notes / "versions" / f"{middle}.safetensors")
    assert cli("log")[0] == 6 and cli("gc")[0] == 6
    code, out, err = cli("repair")
    assert code == 0 and "written off" in out, (out, err)
    code, out, _ = cli("log", "--json")
    entries = json.loads(out)
    assert code == 0 and [e["version"] for e in entries] == [v["version"] for v in versions]
    assert entries[1].get("lost") is True
    code, out, _ = cli("gc", "--json")
    assert code == 0 and json.loads(out)["versions_deleted"] == 0  # the oldest is still reached, past the lost one
    assert verify_ok()


@pytest.mark.parametrize("damage", ["garbled", "deleted", "symlink", "header"])
def test_a_damaged_block_is_rebuilt_from_its_document(notes, damage, tmp_path):
    block = head_blocks(notes)[0]
    if damage == "garbled":
        garble(block)
    elif damage == "deleted":
        block.unlink()
    elif damage == "symlink":  # a link to somewhere else
        (tmp_path / "elsewhere").write_bytes(b"not the block")
        block.unlink()
        block.symlink_to(tmp_path / "elsewhere")
    else:
        block.write_bytes(b"\xff" * 64)  # the header cannot be read
    assert not verify_ok()
    code, out, err = cli("repair")
    assert code == 0 and "rebuilt from" in out and str(tmp_path / "b.md") in out, (out, err)
    assert verify_ok() and documents() == ["a.md", "b.md"]
    code, out, err = cli("ask", "--json", "--max-tokens", "4", "Where are the compost bins?")
    assert code == 0 and not json.loads(out).get("damaged"), err


def test_a_block_replaced_by_a_link_to_its_own_bytes_is_stored_again(notes, tmp_path):
    block = head_blocks(notes)[0]
    (tmp_path / "copy").write_bytes(block.read_bytes())
    block.unlink()
    block.symlink_to(tmp_path / "copy")
    assert not verify_ok()
    code, out, _ = cli("repair")
    assert code == 0 and "stored again as a file" in out and not block.is_symlink() and verify_ok()


def test_a_damaged_block_whose_document_is_gone_says_how_to_clear_it(notes, tmp_path):
    garble(head_blocks(notes)[0])
    (tmp_path / "b.md").write_text("Its text changed since.\n")
    code, out, err = cli("repair", "--json")
    result = json.loads(out)
    assert code == 6 and not result["ok"] and len(result["remaining"]) == 1, (out, err)
    assert "forget --purge" in result["remaining"][0]["fix"] and "b.md" in result["remaining"][0]["problem"]
    code, out, err = cli("repair")
    assert code == 6 and "still damaged" in err and "to clear it" in err
    assert cli("repair", "--drop-damaged")[0] == 2  # removes data for good: needs a yes
    code, out, err = cli("forget", "--purge", "--yes", str(tmp_path / "b.md"))
    assert code == 0, err
    assert verify_ok() and cli("repair")[0] == 0


def test_drop_damaged_clears_what_cannot_be_rebuilt(notes, tmp_path):
    garble(head_blocks(notes)[0])
    (tmp_path / "b.md").unlink()
    code, out, err = cli("repair", "--drop-damaged", "--yes")
    assert code == 0 and "--drop-damaged" in out, (out, err)
    assert verify_ok() and documents() == ["a.md", "b.md"]  # b.md is still listed, without that chunk


def test_forget_purge_of_a_block_with_an_unreadable_header(notes, tmp_path):
    head_blocks(notes)[0].write_bytes(b"\xff" * 64)
    (tmp_path / "b.md").unlink()
    versions = len(list((notes / "versions").glob("*")))
    code, out, err = cli("forget", "--purge", "--yes", str(tmp_path / "b.md"))
    assert code == 0, err
    assert verify_ok() and documents() == ["a.md"]
    assert len(list((notes / "versions").glob("*"))) == versions + 1


def test_a_lost_journal_is_rebuilt(notes):
    (notes / "journal.jsonl").unlink()
    code, _, err = cli("verify")
    assert code == 6 and "journal.jsonl is missing" in err
    code, out, _ = cli("repair")
    assert code == 0 and "rebuilt from 2 version(s)" in out and verify_ok()
    garble(notes / "versions" / f"{head(notes)}.safetensors")  # the rebuilt journal still finds HEAD
    assert cli("repair")[0] == 0 and verify_ok()


def test_a_damaged_evicted_block_is_not_read(env_model, isolated_home, tmp_path, monkeypatch):
    from tests.test_disk_budget import TOPICS

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text("pool_size = 512\n")
    monkeypatch.setenv("MEMLLM_CONFIG", str(tmp_path / "config.toml"))
    for i, topic in enumerate(TOPICS):  # the pool drops the first notes: their blocks are long-term only
        (tmp_path / f"n{i}.md").write_text(" ".join([topic + f" Note {i}."] * 14))
    assert cli("ingest", *[f"n{i}.md" for i in range(len(TOPICS))])[0] == 0
    assert cli("gc", "--max-disk", "1")[0] == 0
    stubs = sorted((isolated_home / "memories" / "default" / "evicted").glob("*.safetensors"))
    assert stubs
    for stub in stubs:
        garble(stub)
    code, out, err = cli("ask", "--json", "--max-tokens", "4", "What is the tool shed code?")
    answer = json.loads(out)
    assert code == 0 and answer["damaged"] and "n0.md" not in str(answer["sources"]), (out, err)
    assert cli("repair")[0] == 0 and verify_ok()  # rebuilt from the documents, still on disk
    code, out, err = cli("ask", "--json", "--max-tokens", "4", "What is the tool shed code?")
    assert code == 0 and not json.loads(out).get("damaged") and "n0.md" in str(json.loads(out)["sources"]), err


def test_log_without_head_and_list_with_damaged_memories(notes, tmp_path):
    assert cli("-m", "x", "ingest", "a.md")[0] == 0
    assert cli("-m", "y", "ingest", "a.md")[0] == 0
    assert cli("-m", "y", "snapshot", "create", "s")[0] == 0
    (notes / "refs" / "HEAD").unlink()
    code, out, err = cli("log")
    assert code == 6 and "refs/HEAD is missing" in err and not out
    (notes.parent / "x" / "memory.json").unlink()
    (notes.parent / "y" / "refs" / "tags" / "s").write_text("garbage")
    code, out, err = cli("list", "--json")
    listed = {m["memory"]: m for m in json.loads(out)}
    assert code == 0 and set(listed) == {"default", "x", "y"} and all("damaged" in m for m in listed.values())


@pytest.mark.parametrize("command", [("export", "out.tar"), ("snapshot", "create", "s"), ("gc",),
                                     ("forget", "a.md"), ("repair",), ("verify",), ("log",)])
def test_a_mistyped_memory_name_leaves_nothing_behind(notes, command):
    code, _, err = cli("-m", "nosuch", *command)
    assert code == 4 and "no memory named 'nosuch'" in err
    assert not (notes.parent / "nosuch").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file")
def test_an_unreadable_block_is_reported_as_unreadable(notes):
    block = head_blocks(notes)[0]
    block.chmod(0)
    try:
        code, _, err = cli("verify")
        assert code == 6 and "Permission denied" in err
        assert cli("repair")[0] == 0 and verify_ok()
    finally:
        for p in (notes / "damaged").rglob("*"):
            p.chmod(0o700)


def test_a_deleted_long_term_block_is_reported_by_ask(env_model, isolated_home, tmp_path, monkeypatch):
    from tests.test_disk_budget import TOPICS

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text("pool_size = 512\n")
    monkeypatch.setenv("MEMLLM_CONFIG", str(tmp_path / "config.toml"))
    for i, topic in enumerate(TOPICS):
        (tmp_path / f"n{i}.md").write_text(" ".join([topic + f" Note {i}."] * 14))
    assert cli("ingest", *[f"n{i}.md" for i in range(len(TOPICS))])[0] == 0
    folder = isolated_home / "memories" / "default"
    tensors = load_file(folder / "versions" / f"{head(folder)}.safetensors")
    held = {p.stem for p in (folder / "blocks").glob("*")} - _pool_blocks(folder, tensors)
    assert held, "the test needs a block the pool no longer holds"
    victim = sorted(held)[0]
    (folder / "blocks" / f"{victim}.safetensors").unlink()
    code, out, err = cli("ask", "--json", "--max-tokens", "2", "What is the tool shed code?")
    assert code == 0 and victim in [d["block"] for d in json.loads(out)["damaged"]], (out, err)
    assert cli("repair")[0] == 0 and verify_ok()  # its document is on disk: rebuilt


def _pool_blocks(folder: Path, tensors) -> set[str]:
    from safetensors import safe_open

    with safe_open(folder / "versions" / f"{head(folder)}.safetensors", framework="pt") as f:
        blocks = json.loads(f.metadata()["memllm"])["blocks"]
    return {blocks[i] for i in tensors["block"].unique().tolist()}
