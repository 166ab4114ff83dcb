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
