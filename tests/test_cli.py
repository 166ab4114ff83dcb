"""The `memllm` command through its real entry point, in subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PARAGRAPH = "The garden coordinator is Maria Okafor. Volunteers meet every Tuesday at six.\n\n"


def memllm(*args, stdin: bytes | None = None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "memllm_cli", *args],
        input=stdin, capture_output=True, env={**os.environ, **(env or {})}, timeout=300,
    )


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys\nfrom memllm_cli.cli import app\n"
        "for args in (['--help'], ['--version'], ['ingest', '--help'], ['ask', '--help']):\n"
        "    try:\n        app(args, prog_name='memllm')\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert "Examples:" in memllm("ingest", "--help").stdout.decode()
    assert memllm("--version").stdout.decode().startswith("memllm ")


def test_ingest_ask_status_round_trip_with_json(tmp_path, env_model):
    notes = tmp_path / "notes.md"
    notes.write_text(PARAGRAPH * 2)
    out = memllm("ingest", "--json", str(notes))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["files"] == 1 and report["chunks"] == 1 and report["tokens_held"] == report["tokens"]
    assert out.stderr == b""  # no terminal: no progress bar

    again = memllm("ingest", str(notes))
    assert again.returncode == 0 and b"1 unchanged" in again.stderr

    asked = memllm("ask", "--json", "--max-tokens", "4", "Who coordinates the garden?")
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert set(answer) >= {"answer", "model", "memory", "tokens", "seconds"}
    assert answer["memory"] == "default" and answer["tokens"] == 4

    streamed = memllm("ask", "--max-tokens", "4", "Who coordinates the garden?")
    assert streamed.returncode == 0 and streamed.stdout.decode().strip() == answer["answer"]

    status = json.loads(memllm("status", "--json").stdout)
    assert status["tokens"] == report["tokens"] and status["sources"][0]["name"] == str(notes)
    assert "notes.md" in memllm("status").stdout.decode()


def test_stdin_ingest_and_named_memory(env_model):
    out = memllm("-m", "work", "ingest", "-", stdin=PARAGRAPH.encode())
    assert out.returncode == 0, out.stderr
    status = json.loads(memllm("status", "--json", env={"MEMLLM_MEMORY": "work"}).stdout)
    assert status["memory"] == "work" and status["sources"][0]["name"] == "<stdin>"


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["ingest", "/nonexistent/notes.txt"], 3, "memllm: error: /nonexistent/notes.txt: no such file or directory"),
        (["ask", "anything?"], 4, "memllm: error: no memory named 'default'"),
        (["-m", "../x", "status"], 4, "memllm: error: invalid memory name '../x'"),
        (["--model", "/nonexistent-model", "ingest", "-"], 5, "memllm: error: model not found: /nonexistent-model"),
        (["ask", "--temperature", "-1", "q"], 2, ""),
    ],
)
def test_errors_have_one_clear_line_and_an_exit_code(args, code, message, env_model):
    out = memllm(*args, stdin=b"some text")
    assert out.returncode == code
    assert out.stdout == b""
    assert message in out.stderr.decode()
    assert b"Traceback" not in out.stderr


def test_bad_files(tmp_path, env_model):
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\x00\x00\x01")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9")
    for path, reason in [(binary, "is a binary file"), (empty, "is empty"), (latin1, "is not valid UTF-8")]:
        out = memllm("ingest", str(path))
        assert out.returncode == 3 and reason in out.stderr.decode()
    assert memllm("status").returncode == 4  # nothing was created


def test_a_memory_written_by_another_model(tmp_path, env_model, other_tiny_dir):
    (tmp_path / "a.txt").write_text(PARAGRAPH)
    assert memllm("ingest", str(tmp_path / "a.txt")).returncode == 0
    out = memllm("--model", str(other_tiny_dir), "ask", "who?")
    assert out.returncode == 5 and b"was written by model" in out.stderr and b"hint: use --model" in out.stderr


def _signal_mid_ingest(tmp_path, signum: int, after: float) -> tuple[int, bytes]:
    """A long ingest in a subprocess, sent `signum` `after` seconds past taking the memory's lock
    (delivered as at a terminal, even where this test runs with it ignored: a background job)."""
    import signal
    import time

    big = tmp_path / "big.txt"
    big.write_text("".join(f"Paragraph {i}. " + PARAGRAPH for i in range(20000)))  # far more than a few s of work
    proc = subprocess.Popen([sys.executable, "-m", "memllm_cli", "ingest", str(big)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    lock = Path(os.environ["MEMLLM_HOME"]) / "memories" / "default" / "lock"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not _locked(lock):
        time.sleep(0.1)
    time.sleep(after)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_ctrl_c_mid_ingest_exits_130_and_keeps_the_last_commit(tmp_path, env_model):
    import signal

    (tmp_path / "first.txt").write_text(PARAGRAPH)
    assert memllm("ingest", str(tmp_path / "first.txt")).returncode == 0
    before = json.loads(memllm("status", "--json").stdout)
    code, err = _signal_mid_ingest(tmp_path, signal.SIGINT, 1.0)
    assert code == 130, err
    assert b"interrupted" in err and b"Traceback" not in err
    assert json.loads(memllm("status", "--json").stdout) == before


def test_sighup_stops_an_ingest_like_sigterm(tmp_path, env_model):
    import signal

    (tmp_path / "first.txt").write_text(PARAGRAPH)
    assert memllm("ingest", str(tmp_path / "first.txt")).returncode == 0
    code, err = _signal_mid_ingest(tmp_path, signal.SIGHUP, 3.0)
    assert code == 128 + signal.SIGHUP, err
    assert b"SIGHUP" in err and b"Traceback" not in err
    assert memllm("verify").returncode == 0


def _locked(path):
    import fcntl

    if not path.exists():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_an_unusable_home_is_one_line_not_a_traceback(tmp_path, env_model):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = memllm("ingest", "-", stdin=PARAGRAPH.encode(), env={"MEMLLM_HOME": str(blocker / "home")})
    assert out.returncode == 2  # a setting that can never work (issue 30): it was exit 1, "Not a directory"
    assert out.stderr.decode().startswith(f"memllm: error: MEMLLM_HOME={blocker / 'home'}: {blocker} is not a folder")
    assert b"Traceback" not in out.stderr


def test_two_ingests_at_once_both_land(tmp_path, env_model):
    files = []
    for i in range(2):
        files.append(tmp_path / f"job{i}.txt")
        files[-1].write_text(f"Job {i} wrote this. " + PARAGRAPH)
    procs = [
        subprocess.Popen([sys.executable, "-m", "memllm_cli", "ingest", "--json", str(f)], stdout=subprocess.PIPE)
        for f in files
    ]
    reports = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    status = json.loads(memllm("status", "--json").stdout)
    assert status["updates"] == 2
    assert status["tokens"] == sum(r["tokens"] for r in reports)
    assert sorted(s["name"] for s in status["sources"]) == sorted(str(f) for f in files)


def test_versions_from_the_command_line(tmp_path, env_model):
    (tmp_path / "a.txt").write_text(PARAGRAPH)
    (tmp_path / "b.txt").write_text("Another note about the shed. " * 5)
    assert memllm("ingest", str(tmp_path / "a.txt")).returncode == 0
    assert memllm("snapshot", "create", "first", "-m", "one file").returncode == 0
    assert memllm("ingest", str(tmp_path / "b.txt")).returncode == 0
    log = json.loads(memllm("log", "--json").stdout)
    assert [e["op"] for e in log] == ["ingest", "ingest"] and log[1]["tags"] == ["first"]

    refused = memllm("snapshot", "rollback", "first")  # no terminal, no --yes
    assert refused.returncode == 2 and b"pass --yes" in refused.stderr
    dry = memllm("snapshot", "rollback", "first", "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["dry_run"] is True
    assert len(json.loads(memllm("log", "--json").stdout)) == 2
    assert memllm("snapshot", "rollback", "first", "--yes").returncode == 0
    assert json.loads(memllm("status", "--json").stdout)["tokens"] == log[1]["tokens"]

    diff = json.loads(memllm("diff", "--json").stdout)
    assert diff["totals"]["dropped"] == log[0]["added"]
    forgot = memllm("forget", str(tmp_path / "a.txt"))
    assert forgot.returncode == 0 and b"forgot" in forgot.stdout
    assert memllm("verify").returncode == 0
    assert memllm("gc", "--json").returncode == 0


def test_verify_reports_damage_with_exit_6(tmp_path, env_model):
    (tmp_path / "a.txt").write_text(PARAGRAPH)
    assert memllm("ingest", str(tmp_path / "a.txt")).returncode == 0
    blocks = list((Path(os.environ["MEMLLM_HOME"]) / "memories" / "default" / "blocks").iterdir())
    data = bytearray(blocks[0].read_bytes())
    data[-3] ^= 0x55
    blocks[0].write_bytes(bytes(data))
    out = memllm("verify")
    assert out.returncode == 6
    assert b"checksum mismatch" in out.stderr and b"problem(s)" in out.stdout


def test_purge_needs_yes_without_a_terminal(tmp_path, env_model):
    (tmp_path / "secret.txt").write_text("The password is hunter2. " * 5)
    assert memllm("ingest", str(tmp_path / "secret.txt")).returncode == 0
    refused = memllm("forget", "--purge", str(tmp_path / "secret.txt"))
    assert refused.returncode == 2 and b"pass --yes" in refused.stderr
    done = memllm("forget", "--purge", "--yes", str(tmp_path / "secret.txt"))
    assert done.returncode == 0 and b"purged: 1 blocks deleted" in done.stdout
    assert memllm("verify").returncode == 0


def test_ask_works_while_an_ingest_runs(tmp_path, env_model):
    (tmp_path / "first.txt").write_text(PARAGRAPH)
    assert memllm("ingest", str(tmp_path / "first.txt")).returncode == 0
    big = tmp_path / "big.txt"
    big.write_text("".join(f"Paragraph {i}. " + PARAGRAPH for i in range(1500)))
    writer = subprocess.Popen([sys.executable, "-m", "memllm_cli", "ingest", str(big)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    lock = Path(os.environ["MEMLLM_HOME"]) / "memories" / "default" / "lock"
    import time

    deadline = time.monotonic() + 120
    while writer.poll() is None and not _locked(lock) and time.monotonic() < deadline:
        time.sleep(0.1)
    asked = memllm("ask", "--json", "--max-tokens", "2", "who?")
    still_writing = writer.poll() is None
    writer.communicate(timeout=600)
    assert asked.returncode == 0, asked.stderr
    assert still_writing  # the answer came while the writer held the lock
    assert writer.returncode == 0


def test_list_shows_every_memory(tmp_path, env_model):
    assert memllm("list").stderr.startswith(b"memllm: no memories yet")
    (tmp_path / "a.txt").write_text(PARAGRAPH)
    assert memllm("-m", "one", "ingest", str(tmp_path / "a.txt")).returncode == 0
    assert memllm("-m", "two", "ingest", str(tmp_path / "a.txt")).returncode == 0
    listed = json.loads(memllm("list", "--json").stdout)
    assert [m["memory"] for m in listed] == ["one", "two"]
    assert listed[0]["tokens"] > 0 and listed[0]["versions"] == 1 and listed[0]["model"] == str(env_model)
    assert b"one " in memllm("list").stdout


def test_global_options_after_the_command(tmp_path, env_model, isolated_home):
    from memllm_cli.cli.app import hoist_global_options
    from tests.test_faults import cli

    assert hoist_global_options(["ask", "--no-server", "q"]) == ["--no-server", "ask", "q"]
    assert hoist_global_options(["ingest", "-", "--name", "-m", "-m", "w"]) == ["-m", "w", "ingest", "-", "--name",
                                                                               "-m"]  # --name's value stays
    assert hoist_global_options(["snapshot", "create", "s", "-m", "msg"]) == ["snapshot", "create", "s", "-m", "msg"]
    assert hoist_global_options(["ask", "--", "--model"]) == ["ask", "--", "--model"]
    (tmp_path / "a.md").write_text(PARAGRAPH)
    assert cli("ingest", str(tmp_path / "a.md"), "-m", "work", "--model", str(env_model))[0] == 0
    code, out, err = cli("ask", "--no-server", "--max-tokens", "2", "-m", "work", "What?")
    assert code == 0, err
    code, out, err = cli("snapshot", "create", "s1", "-m", "kept with it", "--memory", "work", "--json")
    assert code == 0 and json.loads(out)["message"] == "kept with it", err
    assert [m["memory"] for m in json.loads(cli("list", "--json")[1])] == ["work"]
