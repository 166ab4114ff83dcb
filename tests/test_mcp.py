"""memllm mcp (issue 13): the server over stdio, driven by the official mcp SDK's client."""

from __future__ import annotations

import os
import sys

import anyio
import pytest

mcp = pytest.importorskip("mcp")


def call(env: dict, steps):
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(command=sys.executable, args=["-m", "memllm_cli", "mcp"], env=env)
    results = []

    async def main():
        async with Client(params) as client:
            results.append(sorted(t.name for t in (await client.list_tools()).tools))
            for name, args in steps:
                results.append(await client.call_tool(name, args))

    anyio.run(main)
    return results


def test_an_agent_remembers_recalls_and_forgets(tiny_dir, isolated_home):
    env = {**os.environ, "MEMLLM_HOME": str(isolated_home), "MEMLLM_MODEL": str(tiny_dir), "MEMLLM_NO_SERVER": "1"}
    tools, remembered, recalled, status, forgot, after = call(env, [
        ("remember", {"text": "The tool shed code is 4417.", "name": "shed"}),
        ("recall", {"question": "What is the tool shed code?", "max_tokens": 4}),
        ("status", {}),
        ("forget", {"name": "shed"}),
        ("status", {}),
    ])
    assert tools == ["forget", "recall", "remember", "status"]
    assert not remembered.is_error and remembered.structured_content["chunks"] == 1
    found = recalled.structured_content
    assert isinstance(found["answer"], str) and found["sources"][0]["source"] == "shed"
    assert [d["name"] for d in status.structured_content["documents"]] == ["shed"]
    assert not forgot.is_error
    assert after.structured_content["tokens"] == 0


def test_a_tool_error_is_an_error_result_not_a_crash(tiny_dir, isolated_home):
    env = {**os.environ, "MEMLLM_HOME": str(isolated_home), "MEMLLM_MODEL": str(tiny_dir), "MEMLLM_NO_SERVER": "1"}
    tools, recalled, remembered = call(env, [
        ("recall", {"question": "Anything?"}),  # nothing was remembered yet
        ("remember", {"text": "Bees live by the north wall.", "name": "bees"}),
    ])
    assert recalled.is_error and "no memory named 'default'" in recalled.content[0].text
    assert not remembered.is_error  # the server went on


class Raw:
    """memllm mcp driven line by line, as a client that sends what it likes."""

    def __init__(self, env: dict) -> None:
        import json
        import subprocess

        self.json = json
        self.proc = subprocess.Popen([sys.executable, "-m", "memllm_cli", "mcp"], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}})
        assert "result" in self.receive()
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def send(self, message) -> None:
        line = message if isinstance(message, bytes) else self.json.dumps(message).encode()
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        return self.json.loads(self.proc.stdout.readline())

    def remember(self, ident: int, text: str) -> dict:
        self.send({"jsonrpc": "2.0", "id": ident, "method": "tools/call",
                   "params": {"name": "remember", "arguments": {"text": text, "name": "note"}}})
        return self.receive()


@pytest.fixture
def raw(tiny_dir, isolated_home):
    env = {**os.environ, "MEMLLM_HOME": str(isolated_home), "MEMLLM_MODEL": str(tiny_dir), "MEMLLM_NO_SERVER": "1"}
    client = Raw(env)
    yield client
    client.proc.kill()
    client.proc.wait()


def test_what_is_not_json_rpc_gets_json_rpcs_error_and_the_server_goes_on(raw):
    from memllm_cli.server.mcp import MAX_REQUEST

    raw.send(b"{not json")
    parse = raw.receive()
    assert parse["id"] is None and parse["error"]["code"] == -32700 and "Parse error" in parse["error"]["message"]
    raw.send({"hello": "world", "id": 7})
    answer = raw.receive()
    assert answer["id"] == 7 and answer["error"]["code"] == -32600
    raw.send(b"[1, 2]")
    assert raw.receive()["error"]["code"] == -32600
    huge = raw.remember(8, "x" * (MAX_REQUEST + 10))
    assert huge["error"]["code"] == -32600 and "memllm ingest" in huge["error"]["message"]
    empty = raw.remember(9, "   ")
    assert empty["id"] == 9 and empty["result"]["isError"] and "empty" in empty["result"]["content"][0]["text"]
    good = raw.remember(10, "The tool shed code is 4417.")
    assert good["id"] == 10 and not good["result"]["isError"]


def test_memllm_mcp_stops_when_its_client_goes(raw):
    import time

    text = " ".join(f"Line {i} about the garden and the shed." for i in range(20000))  # minutes of work
    raw.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
              "params": {"name": "remember", "arguments": {"text": text, "name": "big"}}})
    time.sleep(3)
    raw.proc.stdin.close()
    started = time.monotonic()
    assert raw.proc.wait(timeout=120) == 0
    assert time.monotonic() - started < 60  # stopped at a chunk boundary, not at the end of the ingest
    from memllm_cli.service import Memllm

    assert Memllm().verify()["ok"]
