"""memllm serve (issue 13): the real server as a subprocess on a temporary socket and a free
loopback port, a tiny random model, and real clients (httpx over the Unix socket, the
official openai package over TCP)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from memllm_cli.service import Memllm

NOTE = "The tool shed code is 4417. The garden coordinator is Maria Okafor. Compost is behind the shed."


class Server:
    def __init__(self, home: Path, model: Path, sock: Path, *extra: str, env: dict | None = None) -> None:
        self.home, self.sock = home, sock
        self.env = {**os.environ, "MEMLLM_HOME": str(home), "MEMLLM_MODEL": str(model), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "memllm_cli", "serve", "--socket", str(sock),
                                      "--host", "127.0.0.1", "--port", "0", *extra],
                                     env=self.env, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert found, line + self.proc.stderr.read()
        self.port = int(found.group(1))
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        self.uds = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://memllm", timeout=60)
        self.tcp = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture
def server(tmp_path, tiny_dir):
    started = Server(tmp_path / "home", tiny_dir, tmp_path / "run" / "memllm.sock")
    yield started
    started.stop()


def ingest(client, memory="notes", **docs):
    return client.post(f"/api/memories/{memory}/ingest",
                       json={"documents": [{"name": n, "text": t} for n, t in docs.items()]})


def chat(content, memory="notes", **extra):
    return {"model": f"memllm/{memory}", "messages": [{"role": "user", "content": content}], **extra}


def test_models_ingest_and_a_greedy_answer_equal_to_in_process(server, tiny_dir):
    assert server.uds.get("/v1/models").json() == {"object": "list", "data": []}
    report = ingest(server.uds, **{"a.txt": NOTE}).json()
    assert report["files"] == 1 and report["memory"] == "notes"
    assert [m["id"] for m in server.uds.get("/v1/models").json()["data"]] == ["memllm/notes"]
    got = server.uds.post("/v1/chat/completions", json=chat("What is the shed code?", max_tokens=6)).json()
    assert got["object"] == "chat.completion" and got["choices"][0]["finish_reason"] == "length"
    assert got["usage"]["completion_tokens"] == 6 and got["usage"]["prompt_tokens"] > 6
    assert got["memllm"]["sources"][0]["source"] == "a.txt"
    local = Memllm(memory="notes", model=str(tiny_dir)).ask("What is the shed code?", max_new_tokens=6)
    assert got["choices"][0]["message"]["content"] == "".join(local).strip()
    ask = server.uds.post("/api/memories/notes/ask", json={"question": "What is the shed code?", "max_tokens": 6})
    assert ask.json()["answer"] == got["choices"][0]["message"]["content"]
    status = server.uds.get("/api/memories/notes/status").json()
    assert status["sources"][0]["name"] == "a.txt" and status["updates"] == 1
    assert any("POST /v1/chat/completions 200" in line for line in server.lines) or server.proc.poll() is None


def test_the_openai_client_streams_and_not(server):
    openai = pytest.importorskip("openai")
    ingest(server.uds, **{"a.txt": NOTE})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["memllm/notes"]
    whole = client.chat.completions.create(model="memllm/notes", max_tokens=8,
                                           messages=[{"role": "user", "content": "Who coordinates the garden?"}])
    parts = client.chat.completions.create(model="memllm/notes", max_tokens=8, stream=True,
                                           messages=[{"role": "user", "content": "Who coordinates the garden?"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in parts if chunk.choices)
    assert text.strip() == whole.choices[0].message.content
    assert whole.usage.completion_tokens == 8
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="memllm/none", messages=[{"role": "user", "content": "x"}])
    assert "no memory named 'none'" in str(missing.value)


@pytest.mark.parametrize(("body", "status", "says"), [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
    (json.dumps(chat("")).encode(), 400, "question"),
    (json.dumps(chat("x", memory="absent")).encode(), 404, "no memory named 'absent'"),
    (json.dumps(chat("x", max_tokens=0)).encode(), 400, "max_tokens"),
    (json.dumps({**chat("x"), "messages": [{"role": "user", "content": "x" * (17 << 20)}]}).encode(), 413, "over"),
])
def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(server, body, status, says):
    ingest(server.uds, **{"a.txt": NOTE})
    got = server.uds.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert got.status_code == status
    error = got.json()["error"]
    assert says in error["message"] and {"message", "type", "param", "code"} <= set(error)
    assert server.uds.get("/v1/models").status_code == 200


def test_ingest_bodies_and_paths_only_over_the_local_socket(server, tmp_path):
    note = tmp_path / "shed.md"
    note.write_text(NOTE)
    text = server.uds.post("/api/memories/notes/ingest?name=plain.txt", content="Bees live by the north wall.",
                           headers={"content-type": "text/plain"})
    assert text.json()["files"] == 1
    files = server.tcp.post("/api/memories/notes/ingest", files={"f": ("up.md", b"The pond was dug in 2019.")})
    assert files.json()["files"] == 1
    refused = server.tcp.post("/api/memories/notes/ingest", json={"paths": [str(note)]})
    assert refused.status_code == 403 and "local socket" in refused.json()["error"]["message"]
    assert server.uds.post("/api/memories/notes/ingest", json={"paths": [str(note)]}).json()["files"] == 1
    names = {s["name"] for s in server.uds.get("/api/memories/notes/status").json()["sources"]}
    assert names == {"plain.txt", "up.md", str(note.resolve())}
    binary = server.uds.post("/api/memories/notes/ingest?name=b.bin", content=b"\xff\xfe\x00",
                             headers={"content-type": "text/plain"})
    assert binary.status_code == 400 and "UTF-8" in binary.json()["error"]["message"]


def test_history_over_the_api(server):
    ingest(server.uds, **{"a.txt": NOTE})
    ingest(server.uds, **{"b.txt": "Bees live by the north wall."})
    log = server.uds.get("/api/memories/notes/log").json()
    assert len(log) == 2
    assert server.uds.post("/api/memories/notes/snapshot", json={"tag": "two"}).json()["snapshot"] == "two"
    assert server.uds.get("/api/memories/notes/diff").json()["totals"]["added"] > 0
    back = server.uds.post("/api/memories/notes/rollback", json={"target": "HEAD~1"}).json()
    assert back["version"]
    assert server.uds.post("/api/memories/notes/verify").json()["ok"]
    gone = server.uds.post("/api/memories/notes/forget", json={"sources": ["a.txt"]})
    assert gone.status_code == 200
    assert server.uds.post("/api/memories/notes/forget", json={"sources": []}).status_code == 400


def test_socket_permissions_a_second_server_and_a_stale_socket(server, tiny_dir):
    assert oct(server.sock.stat().st_mode & 0o777) == "0o600"
    assert oct(server.sock.parent.stat().st_mode & 0o777) == "0o700"
    second = subprocess.run([sys.executable, "-m", "memllm_cli", "serve", "--socket", str(server.sock) + "2"],
                            env=server.env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 7 and "another memllm serve" in second.stderr
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    assert server.sock.exists()  # a killed server leaves its socket
    again = Server(server.home, tiny_dir, server.sock)
    try:
        assert again.uds.get("/v1/models").status_code == 200
    finally:
        assert again.stop() == 0
    assert not server.sock.exists()


def test_sigterm_during_an_ingest_commits_at_a_chunk_boundary(server):
    ingest(server.uds, **{"a.txt": NOTE})
    big = " ".join(f"Line {i} of the long notes, about the garden and the shed." for i in range(3000))
    result: dict = {}

    def run():
        try:
            result["response"] = server.uds.post("/api/memories/notes/ingest",
                                                 json={"documents": [{"name": "big.txt", "text": big}]})
        except httpx.HTTPError as err:
            result["error"] = err

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(1.5)
    assert server.stop() == 0
    worker.join(timeout=60)
    if "response" in result:
        assert result["response"].json()["interrupted"] == "SIGTERM"
    service = Memllm(memory="notes")  # the test's home is the server's
    assert service.settings.home == server.home and service.verify()["ok"]
    assert {s["name"] for s in service.status()["sources"]} >= {"a.txt"}


def keyed(tmp_path, tiny_dir) -> tuple[Path, Server]:
    """A server whose TCP clients must send the key "s3cret" (from a file of mode 600)."""
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    key.chmod(0o600)
    return key, Server(tmp_path / "home", tiny_dir, tmp_path / "k.sock", "--api-key-file", str(key))


def test_an_api_key_guards_tcp_but_not_the_socket(tmp_path, tiny_dir):
    key, guarded = keyed(tmp_path, tiny_dir)
    try:
        assert guarded.tcp.get("/v1/models").status_code == 401
        wrong = guarded.tcp.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert guarded.tcp.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert guarded.uds.get("/v1/models").status_code == 200
    finally:
        guarded.stop()
    key.chmod(0o644)
    loose = subprocess.run([sys.executable, "-m", "memllm_cli", "serve", "--api-key-file", str(key)],
                           env={**os.environ, "MEMLLM_HOME": str(tmp_path / "h2")}, capture_output=True, text=True)
    assert loose.returncode == 2 and "readable by others" in loose.stderr
    open_tcp = subprocess.run([sys.executable, "-m", "memllm_cli", "serve", "--host", "0.0.0.0"],
                              env={**os.environ, "MEMLLM_HOME": str(tmp_path / "h3")}, capture_output=True, text=True)
    assert open_tcp.returncode == 2 and "API key" in open_tcp.stderr


def test_a_client_that_leaves_mid_stream_frees_the_server(server):
    ingest(server.uds, **{"a.txt": NOTE})
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        body = json.dumps(chat("Tell me about the shed.", max_tokens=2000, stream=True)).encode()
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        raw.settimeout(30)
        seen = b""
        while b"chat.completion.chunk" not in seen:
            seen += raw.recv(4096)  # the answer has started: then the client goes
    started = time.perf_counter()
    got = server.uds.post("/v1/chat/completions", json=chat("What is the shed code?", max_tokens=2))
    assert got.status_code == 200 and time.perf_counter() - started < 30


PROBE = ("import atexit, sys\n"  # the client path imports no torch (nor httpx, slow to import and to set up)
         "atexit.register(lambda: print('torch imported' if 'torch' in sys.modules else\n"
         "                              'httpx imported' if 'httpx' in sys.modules else 'no torch', file=sys.stderr))\n"
         "from memllm_cli.cli import run\n"
         "run(sys.argv[1:])\n")


def cli(server, *args, **env):
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                          env={**server.env, "MEMLLM_SOCKET": str(server.sock), "MEMLLM_MEMORY": "notes", **env})


def test_the_cli_goes_through_a_running_server_without_torch(server):
    ingest(server.uds, **{"a.txt": NOTE})
    question = ["ask", "--max-tokens", "6", "--json", "What is the shed code?"]
    through = cli(server, *question)
    assert through.returncode == 0 and "no torch" in through.stderr, through.stderr
    alone = cli(server, "--no-server", *question)
    assert alone.returncode == 0 and "torch imported" in alone.stderr
    drop = ("seconds", "first_token_seconds")
    assert {k: v for k, v in json.loads(through.stdout).items() if k not in drop} == \
        {k: v for k, v in json.loads(alone.stdout).items() if k not in drop}
    assert cli(server, "ask", "--max-tokens", "6", "What is the shed code?").stdout == \
        cli(server, "--no-server", "ask", "--max-tokens", "6", "What is the shed code?").stdout
    status = cli(server, "status", "--json")
    assert status.returncode == 0 and "no torch" in status.stderr
    assert json.loads(status.stdout) == json.loads(cli(server, "--no-server", "status", "--json").stdout)
    missing = cli(server, "-m", "absent", "ask", "anything?")
    assert missing.returncode == 4 and "no memory named 'absent'" in missing.stderr
    assert "hint: nothing has been ingested" in missing.stderr or "hint: known memories: notes" in missing.stderr
    assert cli(server, "-m", "absent", "--no-server", "ask", "anything?").returncode == 4
    for bad in ("../etc", "my notes", "notizen-\u00e4"):  # never a URL of another route, nor a client crash
        refused = cli(server, "-m", bad, "status")
        assert refused.returncode == 4 and f"invalid memory name {bad!r}" in refused.stderr, refused.stderr


def test_the_cli_falls_back_in_process_when_the_server_was_killed(server):
    ingest(server.uds, **{"a.txt": NOTE})
    big = " ".join(f"Line {i} of the long notes, about the garden and the shed." for i in range(3000))
    worker = threading.Thread(target=lambda: pytest.raises(httpx.HTTPError, ingest, server.uds, **{"big.txt": big}))
    worker.start()
    time.sleep(1.5)  # in the middle of the ingest
    server.stop(signal.SIGKILL)
    worker.join(timeout=60)
    assert Memllm(memory="notes").verify()["ok"]
    got = cli(server, "ask", "--max-tokens", "3", "What is the shed code?")
    assert got.returncode == 0 and got.stdout.strip()
    assert "no server answers" in got.stderr and "running in-process" in got.stderr


def test_memllm_mcp_goes_through_a_running_server(server):
    from tests.test_mcp import call

    env = {k: v for k, v in server.env.items() if k != "MEMLLM_MODEL"}
    tools, remembered, recalled, forgot = call({**env, "MEMLLM_SOCKET": str(server.sock)}, [
        ("remember", {"text": NOTE, "name": "shed"}),
        ("recall", {"question": "What is the tool shed code?", "max_tokens": 4}),
        ("forget", {"name": "shed"}),
    ])
    assert not remembered.is_error and not recalled.is_error and not forgot.is_error
    assert recalled.structured_content["sources"][0]["source"] == "shed"
    log = server.uds.get("/api/memories/default/log").json()
    assert [entry["op"] for entry in log] == ["forget", "ingest"]
    # in-process, memllm mcp would have loaded the embedded model (no MEMLLM_MODEL here)
    assert server.uds.get("/api/memories/default/status").json()["model"] == server.env["MEMLLM_MODEL"]


def test_requests_while_the_model_loads_and_a_question_too_long(server, tiny_dir):
    from memllm_cli.text.sources import Document

    # written in-process: the server loads the model when the three requests below arrive together
    Memllm(memory="notes", model=str(tiny_dir)).ingest_documents([Document.of("a.txt", NOTE)])
    results = []

    def ask():
        results.append(server.uds.post("/v1/chat/completions", json=chat("The shed code?", max_tokens=2)).status_code)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200, 200]
    for stream in (False, True):  # streamed too: an error response, not a stream cut short
        long = server.uds.post("/v1/chat/completions", json=chat("why " * 5000, max_tokens=2, stream=stream))
        assert long.status_code == 400 and long.json()["error"]["code"] == 5
        assert "exceed the model's window" in long.json()["error"]["message"]
    assert server.uds.get("/v1/models").status_code == 200


def test_cli_ingest_goes_through_the_server_with_the_same_report(server, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "shed.md").write_text(NOTE)
    (tmp_path / "notes" / "bees.md").write_text("Bees live by the north wall.")

    def run(*args, memory, stdin=None):
        done = subprocess.run([sys.executable, "-c", PROBE, "-m", memory, *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, input=stdin,
                              env={**server.env, "MEMLLM_SOCKET": str(server.sock)})
        return done

    through = run("ingest", "--json", "notes", memory="a")  # a relative path: the client's directory
    alone = run("--no-server", "ingest", "--json", "notes", memory="b")
    assert through.returncode == alone.returncode == 0, through.stderr + alone.stderr
    assert "no torch" in through.stderr and "torch imported" in alone.stderr
    drop = ("seconds", "memory")
    assert {k: v for k, v in json.loads(through.stdout).items() if k not in drop} == \
        {k: v for k, v in json.loads(alone.stdout).items() if k not in drop}
    again = run("ingest", "notes", memory="a")
    assert again.returncode == 0 and "2 unchanged" in again.stderr
    piped = run("ingest", "--name", "git-log", "-", memory="a", stdin="commit 1: the gate is painted green\n")
    assert piped.returncode == 0
    names = {s["name"] for s in server.uds.get("/api/memories/a/status").json()["sources"]}
    assert "git-log" in names and str((tmp_path / "notes" / "shed.md").resolve()) in names
    missing = run("ingest", "nowhere.md", memory="a")
    assert missing.returncode == 3 and "no such file" in missing.stderr
    assert run("--no-server", "ingest", "nowhere.md", memory="a").returncode == 3


def test_ctrl_c_stops_an_ingest_in_the_server_at_a_chunk_boundary(server, tmp_path):
    ingest(server.uds, **{"a.txt": NOTE})
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(f"Paragraph {i}: the garden, the shed and the bees, again and again." * 4
                               for i in range(1500)))
    proc = subprocess.Popen([sys.executable, "-c", PROBE, "-m", "notes", "ingest", "--json", str(big)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**server.env, "MEMLLM_SOCKET": str(server.sock)})
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert json.loads(out)["interrupted"] == "SIGINT" and "stopping at the next chunk boundary" in err
    assert server.uds.get("/v1/models").status_code == 200  # the server goes on
    assert Memllm(memory="notes").verify()["ok"]
    status = server.uds.get("/api/memories/notes/status").json()
    assert any(s.get("partial") for s in status["sources"])  # committed in part; the same command resumes it


def test_unknown_paths_and_chunked_bodies_over_the_limit(server):
    missing = server.uds.get("/v2/nothing")
    assert missing.status_code == 404 and "error" in missing.json()

    def chunks():
        for _ in range(17):
            yield b"x" * (1 << 20)

    big = server.uds.post("/api/memories/notes/ingest?name=big.txt", content=chunks(),
                          headers={"content-type": "text/plain"})
    assert big.status_code == 413 and "error" in big.json()
    assert server.uds.get("/v1/models").status_code == 200


@pytest.mark.slow
def test_the_embedded_model_through_the_server_answers_as_in_process(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMLLM_CACHE", raising=False)  # the converted embedded model is shared between tests
    root = Path(__file__).resolve().parents[1]
    notes = (root / "examples" / "garden-notes.md").read_text()
    env = {k: v for k, v in os.environ.items() if k != "MEMLLM_MODEL"}
    started = Server(tmp_path / "home", Path("unused"), tmp_path / "e.sock", env={"MEMLLM_MODEL": ""})
    try:
        ingest(started.uds, **{"garden-notes.md": notes})
        got = started.uds.post("/v1/chat/completions", json=chat("What is the tool shed code?", max_tokens=24))
        answer = got.json()["choices"][0]["message"]["content"]
        assert "4172" in answer
        done = subprocess.run([sys.executable, "-m", "memllm_cli", "--no-server", "-m", "notes", "ask", "--max-tokens",
                               "24", "What is the tool shed code?"], capture_output=True, text=True, timeout=600,
                              env={**env, "MEMLLM_HOME": str(tmp_path / "home")})
        assert done.stdout.strip() == answer
    finally:
        started.stop()


def test_a_bare_port_listens_on_loopback_and_folders_given_keep_their_mode(tmp_path, tiny_dir):
    import stat

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: world-writable and sticky
    env = {**os.environ, "MEMLLM_HOME": str(tmp_path / "new" / "home"), "MEMLLM_MODEL": str(tiny_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "memllm_cli", "serve", "--socket", str(shared / "m.sock"),
                             "--port", "0"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert found, line
        assert httpx.get(f"http://127.0.0.1:{found.group(1)}/v1/models", timeout=30).status_code == 200
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777  # the user's folder: untouched
        assert stat.S_IMODE((shared / "m.sock").stat().st_mode) == 0o600
        for made in (tmp_path / "new", tmp_path / "new" / "home"):  # folders memllm made: user-only
            assert stat.S_IMODE(made.stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "new" / "home" / "serve.lock").stat().st_mode) == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)  # writable by others, not sticky: another user could replace the socket
    refused = subprocess.run([sys.executable, "-m", "memllm_cli", "serve", "--socket", str(loose / "m.sock")],
                             env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "may be written by others" in refused.stderr
    assert stat.S_IMODE(loose.stat().st_mode) == 0o777


def test_the_bearer_scheme_is_case_insensitive(tmp_path, tiny_dir):
    _, guarded = keyed(tmp_path, tiny_dir)
    try:
        for header in ("bearer s3cret", "BEARER s3cret", "Bearer  s3cret"):
            assert guarded.tcp.get("/v1/models", headers={"Authorization": header}).status_code == 200, header
        assert guarded.tcp.get("/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401
    finally:
        guarded.stop()


@pytest.mark.parametrize("documents, says", [
    ([{"name": "e", "text": ""}], "e is empty"),
    ([{"name": "e", "text": "  \n"}], "e is empty"),
    ([{"name": "", "text": "Some text."}], "name must not be empty"),
    ([{"name": "n", "text": "Some\x00text."}], "NUL"),
    ([{"name": "n", "text": "One."}, {"name": "n", "text": "Two."}], "given twice"),
])
def test_api_ingest_is_validated_as_the_cli_validates_files(server, documents, says):
    got = server.uds.post("/api/memories/notes/ingest", json={"documents": documents})
    assert got.status_code == 400 and says in got.json()["error"]["message"], got.text
    assert got.json()["error"]["code"] == 3  # the CLI's exit code for bad input


def test_log_limits_and_chunked_json_bodies_over_the_limit(server):
    ingest(server.uds, **{"a.txt": NOTE})
    for limit in ("0", "-1"):
        assert server.uds.get(f"/api/memories/notes/log?limit={limit}").status_code == 400
    assert len(server.uds.get("/api/memories/notes/log?limit=1").json()) == 1

    def chunks():
        for _ in range(17):
            yield b"x" * (1 << 20)

    for path in ("/v1/chat/completions", "/api/memories/notes/ask", "/api/memories/notes/ingest"):
        big = server.uds.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large", (path, big.text)


def test_two_memories_of_one_trained_checkpoint_answered_at_once_equal_answered_alone(tmp_path):
    """The official engine is a function of its state: two memories of one loaded checkpoint,
    read in threads of one server, never read each other's rows (issue 26)."""
    from concurrent.futures import ThreadPoolExecutor

    from memllm_cli.random_checkpoints import save_trained

    checkpoint = save_trained(tmp_path / "memoryllm", chat=True)
    served = Server(tmp_path / "home", checkpoint, tmp_path / "t.sock")
    try:
        texts = {"a": "The tool shed code is 4172. The key hangs inside the shed door. " * 6,
                 "b": "The garden coordinator is Maria Okafor. Volunteers meet on Tuesdays. " * 6}
        for name, text in texts.items():
            assert ingest(served.uds, memory=name, **{f"{name}.txt": text}).status_code == 200

        def ask(name: str) -> str:
            got = served.uds.post(f"/api/memories/{name}/ask", json={"question": "What is written here?",
                                                                      "max_tokens": 12})
            assert got.status_code == 200, got.text
            return got.json()["answer"]

        alone = {name: ask(name) for name in texts}
        assert alone["a"] != alone["b"]  # the two memories answer differently: a mix-up would show
        with ThreadPoolExecutor(max_workers=8) as pool:
            names = ["a", "b"] * 8
            together = list(pool.map(ask, names))
        assert together == [alone[n] for n in names]
    finally:
        served.stop()


def test_the_error_tables_are_derived_from_the_error_classes():
    """Exit codes, HTTP statuses and the client's classes come from one place: errors.py."""
    from memllm_cli import errors
    from memllm_cli.server.client import BY_EXIT

    expected = {"UsageError": (2, 400), "ConfigError": (2, 400), "InputError": (3, 400), "MemoryNotFound": (4, 404),
                "ModelError": (5, 400), "StoreError": (6, 500), "Busy": (7, 409), "Ungrounded": (8, 422)}
    assert {name: (getattr(errors, name).exit_code, getattr(errors, name).http_status) for name in expected} == expected
    assert {code: cls.__name__ for code, cls in BY_EXIT.items()} == {
        2: "UsageError", 3: "InputError", 4: "MemoryNotFound", 5: "ModelError", 6: "StoreError", 7: "Busy",
        8: "Ungrounded"}


def test_both_back_ends_take_the_same_parameters():
    """The CLI and memllm mcp call one protocol: Memllm (this process) and Remote (a running
    server) take the same parameters, by the same names, in the same order, with the same defaults."""
    import inspect

    from memllm_cli.server.backends import PROTOCOL, Backend
    from memllm_cli.server.client import Remote

    def shape(method):
        return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]

    for name in PROTOCOL:
        assert shape(getattr(Memllm, name)) == shape(getattr(Remote, name)) == shape(getattr(Backend, name)), name
