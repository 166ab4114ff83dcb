"""Fault injection (issue 11): each kind of stored file damaged in turn, every command run
on the result: no traceback, a documented exit code, nothing deleted, and the repair path
works."""

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

from memllm_cli.cli import run

DOCUMENTED = {0, 2, 3, 4, 5, 6}  # docs/cli.md, "Exit codes" (7, busy, and 8, ungrounded, cannot happen here)
NOTES = {"a.md": "The tool shed code is 4417. The garden coordinator is Maria Okafor.\n",
         "b.md": "Compost bins are behind the shed. Watering is on Tuesdays.\n"}


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    sys.stdout = sys.__stdout__  # run() wraps stdout
    return code, out.getvalue(), err.getvalue()


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xff" * min(64, len(data) - middle)
    path.write_bytes(bytes(data))


@pytest.fixture
def memory(tmp_path, env_model, isolated_home):
    for name, text in NOTES.items():
        (tmp_path / name).write_text(text)
    assert cli("ingest", str(tmp_path / "a.md"))[0] == 0
    assert cli("snapshot", "create", "before-b")[0] == 0
    assert cli("ingest", str(tmp_path / "b.md"))[0] == 0
    assert cli("ask", "--max-tokens", "4", "shed code?")[0] == 0  # builds the recall index cache
    return isolated_home / "memories" / "default"


def head_blocks(folder: Path) -> list[Path]:
    """Block files of b.md (the last ingest), which HEAD's pool holds."""
    return [p for p in (folder / "blocks").glob("*.safetensors") if b"b.md" in p.read_bytes()[:4096]]


def damage(kind: str, folder: Path) -> str:
    """Damage one stored file; return what repairs it (a command line)."""
    if kind == "block":
        garble(head_blocks(folder)[0])
        return "forget --purge --yes b.md"
    if kind == "version":
        head = (folder / "refs" / "HEAD").read_text().strip()
        garble(folder / "versions" / f"{head}.safetensors")
        return "repair"
    if kind == "ref":
        (folder / "refs" / "HEAD").write_text("not a version\n")
        return "repair"
    if kind == "tag":
        (folder / "refs" / "tags" / "before-b").write_text("\x00garbage")
        return "snapshot delete before-b"
    if kind == "journal":
        with open(folder / "journal.jsonl", "ab") as f:
            f.write(b"\x00\x01 not json\n{\"op\": \"ingest\"}\n")
        return "repair"
    if kind == "memory.json":
        (folder / "memory.json").write_text("{ not json")
        return "repair"
    if kind == "memory.json, older journal":  # a memory whose journal does not keep memory.json
        journal = folder / "journal.jsonl"
        lines = [json.loads(line) for line in journal.read_text().splitlines()]
        journal.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "info"}) + "\n" for e in lines))
        (folder / "memory.json").unlink()
        return "repair"
    if kind == "index cache":
        for p in (folder / "cache").rglob("*"):
            if p.is_file():
                p.write_bytes(b"garbage")
        return ""
    raise ValueError(kind)


COMMANDS = [
    ("status",), ("status", "--json"), ("list",), ("log",), ("snapshot", "list"), ("diff", "before-b"),
    ("verify",), ("ask", "--max-tokens", "4", "Where are the compost bins?"),
    ("ask", "--max-tokens", "4", "--budget", "0", "shed?"), ("ingest", "NEW"), ("forget", "a.md"),
    ("gc",), ("export", "EXPORT"), ("snapshot", "rollback", "before-b"),
]


def objects(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for sub in ("blocks", "versions") for p in (folder / sub).glob("*")}


@pytest.mark.parametrize("kind", ["block", "version", "ref", "tag", "journal", "memory.json",
                                  "memory.json, older journal", "index cache"])
def test_every_command_on_a_damaged_memory(kind, memory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "new.md").write_text("A new note about the greenhouse.\n")
    fix = damage(kind, memory)
    before = objects(memory)
    for command in COMMANDS:
        args = [{"NEW": str(tmp_path / "new.md"), "EXPORT": str(tmp_path / f"export-{kind}.tar")}.get(a, a)
                for a in command]
        code, out, err = cli(*args)
        assert "Traceback" not in err and "unexpected" not in err and "this is a bug" not in err, (command, err)
        assert code in DOCUMENTED, (command, code, err)
        if code != 0 and command[0] != "verify":  # verify lists each damaged file
            assert err.count("memllm: error: ") == 1, (command, err)
        assert objects(memory) >= before - {p for p in before if "blocks" in p and kind == "block"}, command
    if fix:
        code, out, err = cli(*fix.split())
        assert code == 0, (fix, err)
    code, out, err = cli("verify", "--json")
    assert code == 0 and json.loads(out)["ok"], out
    code, out, err = cli("ask", "--max-tokens", "4", "shed code?")
    assert code == 0, err


# -- sync: renames, copies, links (issue 30) ---------------------------------------------------

def sources() -> dict[str, int]:
    code, out, err = cli("status", "--json")
    assert code == 0, err
    return {Path(s["name"]).name: s["held"] for s in json.loads(out)["sources"]}


def synced(folder: Path) -> dict:
    code, out, err = cli("ingest", "--sync", "--json", str(folder))
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("how", ["rename", "copy then delete"])
def test_sync_keeps_a_renamed_document(how, tmp_path, env_model):
    notes = tmp_path / "n"
    notes.mkdir()
    (notes / "a.md").write_text("The retro is on Fridays.\n")
    synced(notes)
    held = sources()["a.md"]
    if how == "rename":
        (notes / "a.md").rename(notes / "b.md")
    else:
        (notes / "b.md").write_bytes((notes / "a.md").read_bytes())
        assert synced(notes)["unchanged"]  # a copy beside its original: the text is in memory already
        (notes / "a.md").unlink()
    report = synced(notes)
    assert report["renamed"] == [{"from": str(notes / "a.md"), "to": str(notes / "b.md")}], report
    assert report["removed"] == [] and report["chunks"] == 0 and report["reused"] == 1
    assert sources() == {"b.md": held}
    code, out, _ = cli("ask", "--json", "--max-tokens", "4", "When is the retro?")
    assert code == 0 and [Path(s["source"]).name for s in json.loads(out)["sources"]] == ["b.md"]


def test_sync_forgets_a_document_reached_through_a_link_once_the_link_is_gone(tmp_path, env_model):
    notes, outside = tmp_path / "n", tmp_path / "elsewhere"
    notes.mkdir()
    outside.mkdir()
    (notes / "a.md").write_text("The retro is on Fridays.\n")
    (outside / "bees.md").write_text("The bees live by the north wall.\n")
    (notes / "bees.md").symlink_to(outside / "bees.md")
    synced(notes)
    assert sorted(sources()) == ["a.md", "bees.md"]
    (notes / "bees.md").unlink()
    report = synced(notes)
    assert report["removed"] == [str(outside / "bees.md")] and sorted(sources()) == ["a.md"]


# -- import: only what an export holds (issue 30) ----------------------------------------------

def _with_extra(archive: Path, target: Path, names: list[str]) -> None:
    import tarfile

    with tarfile.open(archive) as src, tarfile.open(target, "w") as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 4
            dst.addfile(info, io.BytesIO(b"junk"))


@pytest.mark.parametrize("extra", [["memllm-memory/evil.sh"], ["memllm-memory/blocks/evil.sh"],
                                   ["memllm-memory/refs/junk"], ["memllm-memory/versions/" + "0" * 64 + ".txt"],
                                   [f"memllm-memory/cache/{i}" for i in range(3)]])
def test_import_refuses_what_no_export_holds(extra, memory, tmp_path):
    assert cli("export", str(tmp_path / "good.tar"))[0] == 0
    _with_extra(tmp_path / "good.tar", tmp_path / "bad.tar", extra)
    code, out, err = cli("-m", "copy", "import", str(tmp_path / "bad.tar"))
    assert code == 3 and "not a memllm export" in err and "unexpected entry" in err, err
    assert not (memory.parent / "copy").exists()
    assert cli("-m", "copy", "import", str(tmp_path / "good.tar"))[0] == 0  # the export itself imports


def test_import_onto_a_full_disk_is_the_disk_not_the_archive(memory, tmp_path, monkeypatch):
    import errno
    import tarfile

    assert cli("export", str(tmp_path / "good.tar"))[0] == 0

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extract", full)
    code, out, err = cli("-m", "copy", "import", str(tmp_path / "good.tar"))
    assert code == 1 and "No space left on device" in err and "cannot read" not in err, err
    assert not (memory.parent / "copy").exists()
