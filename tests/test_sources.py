import io
import re

import pytest

from memllm_cli.errors import InputError
from memllm_cli.text.sources import collect


def test_files_folders_globs_and_stdin(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "b.md").write_text("# beta")
    (tmp_path / "notes" / "deep").mkdir()
    (tmp_path / "notes" / "deep" / "c.md").write_text("gamma")
    (tmp_path / "notes" / ".hidden").write_text("secret")
    got = collect([str(tmp_path / "a.txt"), str(tmp_path / "notes"), "-"], io.BytesIO(b"from stdin"))
    assert [d.text for d in got.documents] == ["alpha", "# beta", "gamma", "from stdin"]
    assert got.documents[-1].name == "<stdin>"
    globbed = collect([str(tmp_path / "**" / "*.md")])
    assert sorted(d.text for d in globbed.documents) == ["# beta", "gamma"]


def test_same_file_twice_is_read_once(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    assert len(collect([str(tmp_path / "a.txt"), str(tmp_path)]).documents) == 1


def test_content_hash_identifies_content(tmp_path):
    (tmp_path / "a.txt").write_text("same")
    (tmp_path / "b.txt").write_text("same")
    docs = collect([str(tmp_path)]).documents
    assert docs[0].sha256 == docs[1].sha256


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"  \n\t", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "is a binary file"),
        (b"caf\xe9 au lait", "is not valid UTF-8 text (bad byte at offset 3)"),
    ],
)
def test_a_bad_named_file_fails_the_whole_ingest(tmp_path, content, message):
    (tmp_path / "good.txt").write_text("fine")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(message)):
        collect([str(tmp_path / "good.txt"), str(bad)])


def test_bad_files_inside_a_folder_are_skipped_and_reported(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / "empty.txt").write_text("")
    got = collect([str(tmp_path)])
    assert [d.text for d in got.documents] == ["fine"]
    assert sorted(reason for _, reason in got.skipped) == ["a binary file, not text", "empty"]


def test_missing_path_folder_without_text_and_empty_glob(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        collect([str(tmp_path / "missing.txt")])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x").write_bytes(b"\x00\x01")
    with pytest.raises(InputError, match="no text files in this folder"):
        collect([str(tmp_path / "bin")])
    with pytest.raises(InputError, match="no files match"):
        collect([str(tmp_path / "*.nothing")])
    with pytest.raises(InputError, match="nothing to ingest"):
        collect([])


def test_stdin_errors():
    with pytest.raises(InputError, match="standard input is empty"):
        collect(["-"], io.BytesIO(b""))
    with pytest.raises(InputError, match="standard input is not valid UTF-8"):
        collect(["-"], io.BytesIO(b"\xff\xfe\xfa"))


def test_unreadable_file(tmp_path, monkeypatch):
    from pathlib import Path

    path = tmp_path / "locked.txt"
    path.write_text("secret")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # root reads anything, so chmod cannot show this
    with pytest.raises(InputError, match="cannot be read: permission denied"):
        collect([str(path)])
