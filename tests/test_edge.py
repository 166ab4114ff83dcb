"""The CLI edge as a hostile tester tries it: every bad value, closed stream and damaged file
ends in one clear line on stderr and a documented exit code, never a traceback."""

import json
import os
import subprocess
import sys

import pytest

from memllm_cli.config import load_settings
from memllm_cli.errors import ConfigError

NOTE = "The tool shed code is 4417. The garden coordinator is Maria Okafor.\n\n"


def memllm(*args, stdin: bytes = b"", env=None):
    return subprocess.run([sys.executable, "-m", "memllm_cli", *args], input=stdin, capture_output=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def one_error(out, code: int, text: str) -> None:
    err = out.stderr.decode()
    assert out.returncode == code, err
    assert b"Traceback" not in out.stderr
    errors = [line for line in err.splitlines() if line.startswith("memllm: error: ")]
    assert len(errors) == 1 and text in errors[0], err


@pytest.fixture
def filled(tmp_path, env_model):
    notes = tmp_path / "notes.md"
    notes.write_text(NOTE)
    assert memllm("ingest", str(notes)).returncode == 0
    return notes


@pytest.mark.parametrize("flags, text", [
    (["--temperature", "1", "--top-p", "0"], "top-p must be in (0, 1], got 0.0"),
    (["--seed", str(2 ** 70)], "the seed must be between 0 and 2**64 - 1"),
    (["--temperature", "inf"], "the temperature must be a finite number >= 0, got inf"),
])
def test_sampling_values_out_of_range_are_usage_errors(flags, text, filled):
    one_error(memllm("ask", *flags, "What is the code?"), 2, text)


def test_a_file_that_is_not_gguf(tmp_path, env_model):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model at all" * 100)
    one_error(memllm("--model", str(fake), "ingest", "-", stdin=b"some text"), 5, "is not a GGUF file")
    torn = tmp_path / "torn.gguf"
    torn.write_bytes(b"GGUF\x03\x00\x00\x00garbage")  # the magic, then nothing that parses
    one_error(memllm("--model", str(torn), "ingest", "-", stdin=b"some text"), 5, "is not a readable GGUF file")


@pytest.mark.parametrize("line, text", [
    ('lock_timeout = "soon"', "lock_timeout must be a number, not 'soon'"),
    ('pool_size = "4k"', "pool_size must be an integer, not '4k'"),
    ("pool_size = 0", "pool_size must be >= 1, not 0"),
    ("read_budget = -5", "read_budget must be >= 0"),
    ("pool_size = true", "pool_size must be an integer, not True"),
    ("lock_timeout = nan", "lock_timeout must be a finite number, not nan"),
    ("lock_timeout = inf", "lock_timeout must be a finite number, not inf"),
    ("max_disk = 1.5", "max_disk: 1.5 is not a size"),
    ('max_disk = "1.5"', "without a unit it is bytes, a whole number"),
])
def test_config_values_are_type_checked(line, text, tmp_path, env_model):
    config = tmp_path / "config.toml"
    config.write_text(line + "\n")
    one_error(memllm("ingest", "-", stdin=b"some text", env={"MEMLLM_CONFIG": str(config)}), 2, text)


def test_config_types_are_derived_from_the_settings(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text("lock_timeout = 5\nread_budget = 0\ndevice = 'cpu'\n")
    monkeypatch.setenv("MEMLLM_CONFIG", str(config))
    settings = load_settings()
    assert settings.lock_timeout == 5.0 and isinstance(settings.lock_timeout, float) and settings.read_budget == 0
    monkeypatch.setenv("MEMLLM_CONFIG", str(tmp_path))
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings()


def test_a_missing_config_file_named_on_purpose_and_a_home_under_a_file(tmp_path, env_model):
    one_error(memllm("list", env={"MEMLLM_CONFIG": str(tmp_path / "typo.toml")}), 2,
              f"MEMLLM_CONFIG names {tmp_path / 'typo.toml'}, which does not exist")
    (tmp_path / "file").write_text("x")
    for command in (["list"], ["status"], ["ingest", "-"]):
        one_error(memllm(*command, stdin=b"text", env={"MEMLLM_HOME": str(tmp_path / "file" / "x")}), 2,
                  f"MEMLLM_HOME={tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is not a folder")


def test_a_pool_the_model_cannot_use_is_refused(tmp_path, env_model):
    config = tmp_path / "config.toml"
    config.write_text("pool_size = 100\n")
    one_error(memllm("ingest", "-", stdin=b"some text", env={"MEMLLM_CONFIG": str(config)}), 5,
              "a pool of 100 tokens does not fit")
    assert memllm("status").returncode == 4  # nothing was created


def test_garbage_in_the_journal_is_reported_by_verify(filled, isolated_home):
    journal = isolated_home / "memories" / "default" / "journal.jsonl"
    with open(journal, "ab") as f:
        f.write(b"\x89\xff\x00garbage\n[1, 2]\n")
    out = memllm("verify")
    assert out.returncode == 6 and b"Traceback" not in out.stderr
    assert b"journal.jsonl: line" in out.stderr
    assert memllm("status").returncode == 0 and memllm("log").returncode == 0  # the rest still reads


def test_a_torn_last_journal_line_is_not_damage(filled, isolated_home):
    journal = isolated_home / "memories" / "default" / "journal.jsonl"
    with open(journal, "ab") as f:
        f.write(b'{"op": "ingest", "ti')  # a crash cut this write short
    assert memllm("verify").returncode == 0
    assert memllm("snapshot", "create", "after").returncode == 0  # the next entry starts a new line
    assert memllm("verify").returncode == 0


def test_closed_streams(tmp_path, filled):
    other = tmp_path / "other.md"
    other.write_text("Another note about the compost bins.\n")
    out = subprocess.run([sys.executable, "-m", "memllm_cli", "ingest", str(other)], stdin=subprocess.DEVNULL,
                         capture_output=True, timeout=300, close_fds=True, preexec_fn=lambda: os.close(0))
    assert out.returncode == 0 and b"Traceback" not in out.stderr  # stdin closed but not read
    out = subprocess.run([sys.executable, "-m", "memllm_cli", "ask", "-"], capture_output=True, timeout=300,
                         preexec_fn=lambda: os.close(0))
    one_error(out, 3, "standard input, but it is closed")
    out = subprocess.run([sys.executable, "-m", "memllm_cli", "ask", "What is the code?"], capture_output=True,
                         timeout=300, preexec_fn=lambda: os.close(1))
    one_error(out, 1, "standard output is closed")


def test_snapshot_delete_speaks_json(filled):
    assert memllm("snapshot", "create", "one").returncode == 0
    out = memllm("snapshot", "delete", "--json", "one")
    assert out.returncode == 0 and json.loads(out.stdout)["deleted"] == "one"


def test_a_rollback_executes_the_plan_it_showed(filled, tmp_path):
    from memllm_cli.errors import Busy
    from memllm_cli.service import Memllm

    (tmp_path / "b.md").write_text("Second note. " * 5)
    service = Memllm()
    service.ingest([str(tmp_path / "b.md")])
    plan = service.rollback("HEAD~1", dry_run=True)
    (tmp_path / "c.md").write_text("Third note, written while the user read the plan. " * 5)
    service.ingest([str(tmp_path / "c.md")])  # another job moves HEAD before the confirmation
    head = service.repo.head()
    with pytest.raises(Busy, match="changed since the rollback was planned"):
        service.rollback("HEAD~1", plan=plan)
    assert service.repo.head() == head  # nothing was rolled back
    assert service.rollback("HEAD~1", plan=service.rollback("HEAD~1", dry_run=True))["version"] != head


def test_trained_units_in_every_listing(tmp_path):
    from memllm_cli.random_checkpoints import save_trained
    from memllm_cli.service import Memllm

    folder = save_trained(tmp_path / "ckpt", "main")
    service = Memllm(model=str(folder), memory="t")
    (tmp_path / "n.md").write_text(NOTE * 3)
    service.ingest([str(tmp_path / "n.md")])
    service.snapshot_create("one")
    (tmp_path / "m.md").write_text("Another note about the compost bins. " * 4)
    service.ingest([str(tmp_path / "m.md")])
    assert {m["unit"] for m in service.list_memories()} == {"rows per layer"}
    assert service.snapshot_list()[0]["unit"] == "rows per layer"
    assert service.rollback("one", dry_run=True)["unit"] == "rows per layer"
    assert service.status()["sources"][0]["written"] == service.status()["sources"][0]["rows_written"]
