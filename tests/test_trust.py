"""A memory you can trust from cron (issue 11, the parts done so far): pipes, exports that
destroy nothing, honest warnings and counts."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from memllm_cli.errors import InputError, StoreError
from memllm_cli.service import Memllm
from memllm_cli.text.sources import Document, collect

NOTE = "The tool shed code is 4417. The garden coordinator is Maria Okafor.\n\n"


def memllm(*args, stdin: bytes = b"", env=None):
    return subprocess.run([sys.executable, "-m", "memllm_cli", *args], input=stdin, capture_output=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def doc(name: str, text: str) -> Document:
    import hashlib

    return Document(name, text, hashlib.sha256(text.encode()).hexdigest())


@pytest.fixture
def service(tiny_dir):
    s = Memllm(model=str(tiny_dir))
    s.ingest_documents([doc("a.md", NOTE * 3), doc("b.md", "Compost bins are behind the shed. " * 6)])
    return s


def test_a_reader_that_goes_away_ends_quietly_with_exit_0():
    code = ("import sys\nclass Gone:\n    def write(self, s):\n        raise BrokenPipeError(32, 'Broken pipe')\n"
            "    def flush(self):\n        raise BrokenPipeError(32, 'Broken pipe')\n"
            "    def isatty(self):\n        return False\n"
            "sys.stdout = Gone()\nfrom memllm_cli.cli import run\nrun(['--version'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stderr == b""


def test_an_empty_memory_name_is_not_default(env_model):
    out = memllm("-m", "", "status")
    assert out.returncode == 4 and b"invalid memory name ''" in out.stderr


def test_a_nul_byte_anywhere_makes_a_file_binary(tmp_path):
    late = tmp_path / "late.bin"
    late.write_bytes(b"text " * 4000 + b"\x00" + b"more")
    with pytest.raises(InputError, match="binary"):
        collect([str(late)])


def test_a_failed_first_ingest_leaves_no_memory_folder(tmp_path, isolated_home):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"nothing" * 10)
    assert memllm("--model", str(fake), "ingest", "-", stdin=b"some text").returncode == 5
    assert not (isolated_home / "memories" / "default").exists()


def test_a_document_larger_than_the_pool_says_so(tiny_dir):
    service = Memllm(model=str(tiny_dir), pool_size=512)
    report = service.ingest_documents([doc("big.md", NOTE * 80)])
    assert any("big.md is larger than the pool" in w and "long-term tier" in w for w in report.warnings)
    small = service.ingest_documents([doc("small.md", NOTE)])
    assert small.warnings == []


def test_export_destroys_nothing(service, tmp_path):
    target = tmp_path / "m.tar"
    service.export(target)
    with pytest.raises(InputError, match="exists"):
        service.export(target)
    assert service.export(target, force=True)["files"] > 0
    (tmp_path / "mine.txt").write_text("the user's own file")
    (tmp_path / "link.tar").symlink_to(tmp_path / "mine.txt")
    os.mkfifo(tmp_path / "fifo.tar")
    for special in ("link.tar", "fifo.tar"):
        with pytest.raises(InputError, match="not a regular file"):
            service.export(tmp_path / special, force=True)
    assert (tmp_path / "mine.txt").read_text() == "the user's own file"
    assert (tmp_path / "link.tar").is_symlink()


def test_export_to_stdout_imports_elsewhere(service, tmp_path, env_model):
    out = memllm("export", "-")
    assert out.returncode == 0 and out.stderr == b""
    (tmp_path / "s.tar").write_bytes(out.stdout)
    assert tarfile.is_tarfile(tmp_path / "s.tar")
    imported = memllm("-m", "copy", "import", str(tmp_path / "s.tar"))
    assert imported.returncode == 0, imported.stderr
    assert json.loads(memllm("-m", "copy", "status", "--json").stdout)["tokens"] == service.status()["tokens"]


def test_a_damaged_memory_is_not_exported_unless_forced(service, tmp_path):
    block = next(iter(service.repo.blocks()))
    path = service.repo.folder / "blocks" / f"{block}.safetensors"
    path.write_bytes(path.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(StoreError, match="is damaged"):
        service.export(tmp_path / "bad.tar")
    assert not (tmp_path / "bad.tar").exists()
    assert service.export(tmp_path / "bad.tar", force=True)["files"] > 0


def test_forgotten_documents_are_not_counted_as_readable(service):
    service.forget(["b.md"])
    rows = {r["source"]: r for r in service.diff()["sources"]}
    assert rows["b.md"]["dropped"] > 0 and rows["b.md"]["long_term"] == 0


def test_purge_leaves_true_counts_in_log_and_snapshots(service):
    service.snapshot_create("both")
    held = service.status()["tokens"]
    service.forget(["b.md"], purge=True)
    b_tokens = held - service.status()["tokens"]
    assert b_tokens > 0
    assert service.snapshot_list()[0]["tokens"] == held - b_tokens  # the snapshot no longer holds b.md
    assert all(e["tokens"] <= held - b_tokens for e in service.log())


# -- notes change: a document is updated, not duplicated -----------------------------------

def test_an_edited_file_replaces_its_old_text_in_one_version(tmp_path, tiny_dir):
    from memllm_cli.memory import recall

    notes = tmp_path / "notes.md"
    notes.write_text("The guest Wi-Fi password is tulip-42.\n\n" + NOTE)
    service = Memllm(model=str(tiny_dir))
    service.ingest([str(notes)])
    versions = len(service.log())
    notes.write_text("The guest Wi-Fi password is daisy-77.\n\n" + NOTE)
    report = service.ingest([str(notes)])
    assert report.updated == [str(notes.resolve())] and report.chunks == 1
    assert len(service.log()) == versions + 1 and "(updated)" in service.log()[0]["message"]
    status = service.status()
    assert [s["name"] for s in status["sources"]] == [str(notes.resolve())]
    assert status["tokens"] == report.tokens  # the old text left the pool
    mem = service.load()
    texts = [service.model().tokenizer.decode(c.ids) for c in recall.index(mem, service.model().tokenizer).candidates]
    assert texts and all("daisy" in t and "tulip" not in t for t in texts)  # the long-term tier has only the new text
    (row,) = service.diff()["sources"]
    assert row["added"] > 0 and row["dropped"] > 0 and row["long_term"] == 0
    service.rollback("HEAD~1")  # history keeps the old text
    texts = [service.model().tokenizer.decode(c.ids) for c in recall.index(service.load(), service.model().tokenizer)
             .candidates]
    assert any("tulip" in t for t in texts) and not any("daisy" in t for t in texts)


def test_one_file_under_two_spellings_is_one_document(tmp_path, tiny_dir, monkeypatch):
    (tmp_path / "sub").mkdir()
    notes = tmp_path / "notes.md"
    notes.write_text(NOTE)
    monkeypatch.chdir(tmp_path / "sub")
    service = Memllm(model=str(tiny_dir))
    service.ingest(["../notes.md"])
    again = service.ingest([str(notes)])
    assert again.chunks == 0 and len(service.status()["sources"]) == 1
    notes.write_text(NOTE + "A new line about the compost.\n")
    assert service.ingest([str(notes)]).updated and len(service.status()["sources"]) == 1
    assert service.forget(["../notes.md"])["forgotten"] == [str(notes.resolve())]


def test_sync_mirrors_a_folder_and_is_a_no_op_when_nothing_changed(tmp_path, tiny_dir):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.md").write_text(NOTE)
    (folder / "b.md").write_text("Compost bins are behind the shed. " * 5)
    outside = tmp_path / "other.md"
    outside.write_text("A note outside the mirrored folder. " * 5)
    service = Memllm(model=str(tiny_dir))
    service.ingest([str(outside)])
    service.ingest([str(folder)], sync=True)
    (folder / "b.md").unlink()
    (folder / "a.md").write_text(NOTE + "The meeting moved to Thursday.\n")
    (folder / "c.md").write_text("The seed order arrives in March. " * 5)
    versions = len(service.log())
    report = service.ingest([str(folder)], sync=True)
    assert report.removed == [str((folder / "b.md").resolve())] and report.updated == [str((folder / "a.md").resolve())]
    assert len(service.log()) == versions + 1  # one version
    names = sorted(s["name"] for s in service.status()["sources"])
    assert names == sorted(str(p.resolve()) for p in (outside, folder / "a.md", folder / "c.md"))
    quiet = service.ingest([str(folder)], sync=True)
    assert quiet.chunks == 0 and quiet.removed == [] and len(service.log()) == versions + 1  # cron: nothing new


def test_stdin_is_one_document_per_name(tiny_dir):
    import io

    service = Memllm(model=str(tiny_dir))
    service.ingest(["-"], stdin=io.BytesIO(b"First log entry. " * 5), name="git-log")
    report = service.ingest(["-"], stdin=io.BytesIO(b"Second log entry. " * 5), name="git-log")
    assert report.updated == ["git-log"] and len(service.status()["sources"]) == 1
    service.ingest(["-"], stdin=io.BytesIO(b"Unnamed text. " * 5))
    service.ingest(["-"], stdin=io.BytesIO(b"Other unnamed text. " * 5))
    assert len(service.status()["sources"]) == 3  # unnamed stdin: each text its own document


def test_an_edited_document_replaces_itself_in_a_trained_memory(tmp_path):
    from memllm_cli.random_checkpoints import save_trained

    service = Memllm(model=str(save_trained(tmp_path / "ckpt", "main")), memory="t")
    service.ingest_documents([doc("n.md", NOTE * 2)])
    report = service.ingest_documents([doc("n.md", NOTE * 2 + "The meeting moved to Thursday evening.")])
    assert report.updated == ["n.md"]
    (entry,) = service.status()["sources"]
    assert entry["revision"] == 2 and entry["held"] == entry["written"]


# -- damage is detected where it is read, and never spreads ---------------------------------

def test_a_lost_head_is_damage_and_repair_restores_it(service, tiny_dir):
    service.snapshot_create("one")
    service.ingest_documents([doc("c.md", "The seed order arrives in March. " * 5)])
    head, versions = service.repo.head(), len(service.repo.versions())
    (service.repo.folder / "refs" / "HEAD").unlink()
    report = service.verify()
    assert not report["ok"] and any("refs/HEAD is missing" in d for d in report["damaged"])
    for call in (service.status, lambda: service.ingest_documents([doc("d.md", NOTE)]), service.gc):
        with pytest.raises(StoreError):
            call()
    assert len(service.repo.versions()) == versions  # no new root over the history, nothing deleted
    listed = {m["memory"]: m for m in Memllm(model=str(tiny_dir), memory="other").list_memories()}
    assert "damaged" in listed["default"]
    assert service.repair(dry_run=True)["head"] == head and service.repo.head() is None
    assert service.repair()["head"] == head and service.verify()["ok"]
    assert service.repair()["problem"] is None  # intact: nothing to do


def test_a_rollback_to_a_snapshot_works_while_head_is_garbled(service):
    service.snapshot_create("one")
    target = service.repo.head()
    service.ingest_documents([doc("c.md", "The seed order arrives in March. " * 5)])
    (service.repo.folder / "refs" / "HEAD").write_text("not a version\n")
    result = service.rollback("one")
    assert result["to"] == target and service.repo.head() == target and service.verify()["ok"]


def test_a_damaged_block_stops_writes_until_its_document_is_forgotten(service):
    versions = len(service.repo.versions())
    tensors, meta = service.repo.read_version(service.repo.head())
    damaged = next(b for b in meta["blocks"] if service.repo.block_meta(b)["source"] == "b.md")
    path = service.repo.folder / "blocks" / f"{damaged}.safetensors"
    path.write_bytes(path.read_bytes()[:-4] + b"XXXX")
    with pytest.raises(StoreError, match=r"block\(s\) of HEAD \(b.md\)"):
        service.ingest_documents([doc("c.md", "The seed order arrives in March. " * 5)])
    with pytest.raises(StoreError, match="damaged"):
        service.forget(["a.md"])  # what would remain still holds the damage
    assert len(service.repo.versions()) == versions  # nothing was committed on top of it
    service.forget(["b.md"])
    assert service.ingest_documents([doc("c.md", "The seed order arrives in March. " * 5)]).chunks == 1


# -- honest about time ------------------------------------------------------------------

def test_a_waiting_writer_says_who_holds_the_lock(tmp_path, env_model, isolated_home):
    import time
    from pathlib import Path

    (tmp_path / "first.md").write_text(NOTE)
    assert memllm("ingest", str(tmp_path / "first.md")).returncode == 0
    big = tmp_path / "big.md"
    big.write_text("".join(f"Paragraph {i}. " + NOTE for i in range(1500)))
    writer = subprocess.Popen([sys.executable, "-m", "memllm_cli", "ingest", str(big)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    owner = Path(isolated_home) / "memories" / "default" / "lock.owner"
    deadline = time.monotonic() + 120
    while writer.poll() is None and not owner.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = memllm("ingest", "--json", "-", stdin=b"A second writer's note. " * 5)
    writer.communicate(timeout=600)
    assert writer.returncode == 0 and second.returncode == 0, second.stderr
    waited = second.stderr.decode()
    assert "waiting for memory 'default'" in waited and f"pid {writer.pid}" in waited and "big.md" in waited
    assert json.loads(second.stdout)["seconds"] < 30  # the wait is not counted as ingest time
    assert not owner.exists()


def test_logs_get_progress_lines_at_a_low_rate(capsys):
    from memllm_cli.cli.render import LogProgress

    quiet = LogProgress(every=3600)
    quiet.start(100, "ingesting into notes")
    quiet.advance(50, "a.md")
    quiet.finish()
    assert capsys.readouterr().err == ""  # short work: no lines at all
    chatty = LogProgress(every=0)
    chatty.start(100, "ingesting into notes")
    chatty.advance(50, "a.md")
    chatty.finish()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("memllm: ingesting into notes: 50/100 tokens (50%)") and "a.md" in lines[0]
    assert lines[-1] == "memllm: ingesting into notes: done, 50 tokens"


def test_names_and_piped_tables_stay_one_line_each(tmp_path, env_model):
    from memllm_cli.cli.render import safe

    assert safe("notes\nmore.md") == "notes\\nmore.md" and safe("plain.md") == "plain.md"
    long = tmp_path / ("a-very-long-folder-name-" * 4) / "notes-with-a-long-name.md"
    long.parent.mkdir()
    long.write_text(NOTE)
    odd = tmp_path / "two\nlines.md"
    odd.write_text("Another note about the compost bins. " * 4)
    assert memllm("ingest", str(long), str(odd)).returncode == 0
    status = memllm("status").stdout.decode()
    assert any(str(long) in line for line in status.splitlines())  # not folded to 80 columns
    assert "two\\nlines.md" in status and memllm("log").stdout.decode().count("\n") == 1
