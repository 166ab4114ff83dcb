"""Answers that say when memory has nothing, reads that check what they read, a hub that
fails fast (issue 11)."""

import json
import os
import subprocess
import sys
import time

from memllm_cli.memory import grounding


def memllm(*args, env=None):
    return subprocess.run([sys.executable, "-m", "memllm_cli", *args], capture_output=True, input=b"a note\n",
                          env={**os.environ, **(env or {})}, timeout=300)


PASSAGE = "The guest network of the Lindqvist office is called Harbour; its password is tern-4417."


def test_a_supported_answer_is_grounded():
    verdict = grounding.judge("What is the password of the guest network?", [PASSAGE], lambda t: 1.0)
    assert verdict("The password is tern-4417.")["grounded"]


def test_an_answer_memory_does_not_hold_is_not_grounded():
    verdict = grounding.judge("What is the guest Wi-Fi password?", [PASSAGE], lambda t: 1.0)
    assert not verdict("It is 123456, set by the router maker.")["grounded"]  # the answer's words are not there
    nothing = grounding.judge("Who won the 1998 world cup?", [PASSAGE], lambda t: 1.0)
    assert not nothing("France won it.")["grounded"]  # the question's words are not there
    assert not grounding.judge("password?", [], lambda t: 1.0)("tern-4417")["grounded"]  # nothing was read


def test_rare_words_of_the_question_count_for_more():
    read = ["The harbour opened in 1902."]
    rare = {"harbour": 5.0, "opened": 1.0, "year": 0.1, "lindqvist": 5.0}
    weight = lambda t: rare.get(t, 1.0)  # noqa: E731
    found = grounding.judge("What year was the harbour opened?", read, weight)("1902")
    missing = grounding.judge("What year did Lindqvist open?", read, weight)("1902")
    assert found["relevance"] > 0.8 and missing["relevance"] < 0.2


def test_ask_flags_an_ungrounded_answer_and_strict_exits_8(tmp_path, env_model):
    notes = tmp_path / "notes.md"
    notes.write_text(PASSAGE + "\n")
    assert memllm("ingest", str(notes)).returncode == 0
    out = memllm("ask", "--max-tokens", "4", "--json", "Who won the 1998 world cup?")
    assert out.returncode == 0 and json.loads(out.stdout)["grounded"] is False
    assert out.stderr.decode().count("not grounded") == 1
    strict = memllm("ask", "--max-tokens", "4", "--strict", "Who won the 1998 world cup?")
    assert strict.returncode == 8 and strict.stdout.strip()  # the answer is still printed
    assert b"memllm: error: not grounded" in strict.stderr


def test_ask_skips_a_damaged_block_and_names_its_document(tmp_path, env_model, isolated_home):
    for name, text in (("wifi.md", PASSAGE), ("shed.md", "The tool shed code is 9021, says the garden group.")):
        (tmp_path / name).write_text(text + "\n")
        assert memllm("ingest", str(tmp_path / name)).returncode == 0
    blocks = isolated_home / "memories" / "default" / "blocks"
    [damaged] = [p for p in blocks.iterdir() if b"wifi.md" in p.read_bytes()[:4096]]
    data = bytearray(damaged.read_bytes())
    data[-64:] = b"\x7f" * 64  # garbage in the values
    damaged.write_bytes(bytes(data))
    out = memllm("ask", "--max-tokens", "4", "--json", "What is the password of the guest network?")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["damaged"][0]["source"].endswith("wifi.md") and answer["grounded"] is False
    assert b"wifi.md, chunk 0, is damaged" in out.stderr and b"memllm verify" in out.stderr
    whole = memllm("ask", "--max-tokens", "4", "--budget", "0", "password?")
    assert whole.returncode == 6 and b"wifi.md" in whole.stderr and b"nothing was read" in whole.stderr


def test_an_unreachable_hub_fails_in_one_line_within_seconds():
    started = time.perf_counter()
    out = memllm("--model", "someorg/no-such-model", "ingest", "-",
                 env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens there
    assert time.perf_counter() - started < 30
    assert out.returncode == 5 and b"Traceback" not in out.stderr
    lines = out.stderr.decode().splitlines()
    assert lines[0].startswith("memllm: error: cannot reach the Hugging Face hub") and len(lines) == 2  # + hint


def test_an_offline_hub_id_not_in_the_cache_says_so(env_model):
    out = memllm("--model", "someorg/no-such-model", "ingest", "-", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 5 and b"is not in the Hugging Face cache" in out.stderr


def test_a_hub_id_in_the_cache_loads_offline(tmp_path, tiny_dir, monkeypatch):
    snapshot = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in tiny_dir.iterdir():
        (snapshot / f.name).symlink_to(f)
    (tmp_path / "hub" / "models--someorg--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--tiny" / "refs" / "main").write_text("0" * 40)
    out = memllm("--model", "someorg/tiny", "ingest", "-", env={"HF_HUB_OFFLINE": "1",
                                                                "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert out.returncode == 0, out.stderr
