"""Notes that change (issue 11): an edited document keeps its unchanged chunks, a stopped
ingest commits at a chunk boundary and resumes, SIGTERM stops like Ctrl-C."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from memllm_cli.memory import recall
from memllm_cli.service import Memllm
from memllm_cli.service import session as session_module
from memllm_cli.service.session import Stop
from memllm_cli.text.chunking import chunk_document

WORDS = "alpha beta gamma delta shed code garden maria compost river stone lamp".split()


def notes(paragraphs: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(40)) + f" line{i}." for i in range(paragraphs)]


def stored_text(service: Memllm, name: str) -> list[str]:
    """The text of every block ask can read for this document, in chunk order."""
    mem = service.load()
    idx = recall.index(mem, mem.lm.tokenizer)
    src = mem.live_source(name)
    chunks = sorted((c for c in idx.candidates if c.source == src), key=lambda c: c.chunk)
    return [mem.lm.tokenizer.decode(c.ids) for c in chunks]


def test_an_edited_chunk_is_the_only_one_chunked_anew(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    paragraphs = notes(80)
    before = chunk_document("\n\n".join(paragraphs), tokenizer, 512)
    paragraphs[40] += " An added sentence." * 10  # pushes the chunk over 512 tokens
    after = chunk_document("\n\n".join(paragraphs), tokenizer, 512, keep=[c.ids for c in before])
    old = {tuple(c.ids) for c in before}
    new = [c for c in after if tuple(c.ids) not in old]
    assert len(before) == 40 and len(new) == 2
    plain = chunk_document("\n\n".join(paragraphs), tokenizer, 512)
    assert len([c for c in plain if tuple(c.ids) not in old]) > len(new)  # greedy chunking alone shifts more
    assert [i for c in after for i in c.ids] == [i for c in plain for i in c.ids]  # the same tokens, all of them


def test_reingesting_an_edited_file_writes_only_its_changed_chunks(tmp_path, tiny_dir):
    path = tmp_path / "notes.txt"
    paragraphs = notes(60)
    path.write_text("\n\n".join(paragraphs))
    service = Memllm(model=str(tiny_dir))
    first = service.ingest([str(path)])
    assert first.chunks >= 20
    paragraphs[30] = paragraphs[30].replace("line30.", "line30 EDITEDWORD.")
    path.write_text("\n\n".join(paragraphs))
    second = Memllm(model=str(tiny_dir)).ingest([str(path)])
    assert second.updated == [str(path)] and second.chunks == 1 and second.reused == first.chunks - 1
    text = stored_text(Memllm(model=str(tiny_dir)), str(path))
    assert len(text) == first.chunks and sum("EDITEDWORD" in t for t in text) == 1
    assert not any("line30." in t for t in text)  # the old text of the edited chunk is not read
    status = Memllm(model=str(tiny_dir)).status()
    [row] = status["sources"]
    assert row["revision"] == 2 and row["chunks"] == first.chunks and row["tokens_written"] >= first.tokens
    assert Memllm(model=str(tiny_dir)).verify()["ok"]
    forgotten = Memllm(model=str(tiny_dir)).forget([str(path)], purge=True)
    assert forgotten["purged_blocks"] == first.chunks + 1  # every block of both revisions, the kept ones too
    assert Memllm(model=str(tiny_dir)).repo.blocks() == []


def test_a_stopped_ingest_commits_at_a_chunk_boundary_and_resumes(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setattr(session_module, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every chunk
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join(notes(40)))
    stop = Stop()

    class StopAfterThree:
        calls = 0

        def start(self, total, label): ...
        def finish(self): ...

        def advance(self, n, label):
            self.calls += 1
            if self.calls == 3:
                stop.requested = "SIGTERM"

    report = Memllm(model=str(tiny_dir)).ingest([str(path)], progress=StopAfterThree(), stop=stop)
    assert report.interrupted == "SIGTERM" and report.chunks == 3 and report.files == 0
    service = Memllm(model=str(tiny_dir))
    [row] = service.status()["sources"]
    assert row["partial"] and row["chunks"] == 3
    assert len(service.log()) >= 2  # checkpoints inside the document, then the stop's commit
    again = Memllm(model=str(tiny_dir)).ingest([str(path)])
    assert again.resumed == [str(path)] and again.reused == 3 and again.files == 1
    total = len(chunk_document(path.read_text(), service.model().tokenizer, 512))
    assert again.chunks == total - 3
    [row] = Memllm(model=str(tiny_dir)).status()["sources"]
    assert not row["partial"] and row["chunks"] == total and row["revision"] == 1
    assert Memllm(model=str(tiny_dir)).ingest([str(path)]).unchanged == [str(path)]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_ingest_with_a_commit(tmp_path, env_model, isolated_home, sig, code):
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(notes(1500)))
    proc = subprocess.Popen([sys.executable, "-m", "memllm_cli", "ingest", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    journal = isolated_home / "memories" / "default" / "journal.jsonl"
    deadline = time.time() + 120
    while not journal.exists() and time.time() < deadline:  # the memory is created: writing begins
        time.sleep(0.1)
    time.sleep(1.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert b"at a chunk boundary" in err and b"Traceback" not in err
    service = Memllm()
    [row] = service.status()["sources"]
    assert row["partial"] and row["chunks"] > 0
    assert service.verify()["ok"]
