"""memllm bench's logic, on a fake model that counts calls (and on a tiny model end to end).

The fake memory holds words (its "tokens") in a pool of N with uniform random drops, and
answers a question right when the question's answer word is still in its pool (or, for the
prompt baselines, in the text it is given), so every measured figure has a known cause.
"""

import gzip
import json
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from memllm_cli import bench
from memllm_cli.errors import InputError


def write_data(path, rows=2100):
    """An NQ-open-oracle style file: row i asks for code i, which only passage i holds.
    Rows >= 2000 (reserved for acceptance in the real file) carry a marker."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(rows):
            marker = " RESERVED" if i >= 2000 else ""
            text = f"Item {i} is a thing. Its code is code{i}.{marker} " + " ".join(f"filler{i}w{j}" for j in range(40))
            f.write(json.dumps({"question": f"What is the code of item {i}?", "answers": [f"code{i}"],
                                "ctxs": [{"title": f"Item {i}", "text": text}]}) + "\n")
    return path


@dataclass
class FakeMemory:
    size: int
    seed: int
    words: list = field(default_factory=list)  # (source, word)
    log: list = field(default_factory=list)

    def __len__(self):
        return len(self.words)


class FakeSubject:
    name = "fake"
    trained = False

    def __init__(self, pool_size=600, window=2000, supports=bench.METHODS):
        self.pool_size, self.window, self._supports = pool_size, window, supports
        self.calls = Counter()
        self.writes = []

    def supports(self, method):
        return method in self._supports

    def count(self, text):
        return len(text.split())

    def new_memory(self, seed, *, archive=True):
        self.calls["new_memory"] += 1
        self.calls["archived"] += archive
        return FakeMemory(self.pool_size, seed)

    def new_prompt_memory(self):
        self.calls["new_prompt_memory"] += 1
        return FakeMemory(self.window, 0)

    def room(self, memory):
        return memory.size - len(memory)

    def held_tokens(self, memory):
        return len(memory)

    def fork(self, memory):
        return FakeMemory(memory.size, memory.seed, list(memory.words), list(memory.log))

    def write(self, memory, text, name):
        self.calls["write"] += 1
        self.writes.append(text)
        words = [(name, w) for w in text.split()]
        before = len(memory.words)
        overflow = max(0, before + len(words) - memory.size)
        if overflow:
            rng = random.Random(memory.seed + len(memory.log))
            keep = sorted(rng.sample(range(before), before - overflow))
            memory.words = [memory.words[i] for i in keep]
        memory.words += words
        memory.log.append({"source": name, "tokens": len(words), "dropped": overflow, "before": before})
        return 1

    @staticmethod
    def _answer(question, words):
        code = "code" + question.split("item ")[1].rstrip("?")
        return f"It is {code}." if any(w.rstrip(".") == code for w in words) else "I do not know."

    def ask(self, memory, question, *, whole_pool=False):
        self.calls["ask"] += 1
        self.calls["ask_whole_pool"] += whole_pool
        return self._answer(question, [w for _, w in memory.words])

    def ask_timed(self, memory, question):
        self.ask(memory, question)
        return 0.1, 5, 0.5

    def ask_text(self, texts, question):
        self.calls["ask_text"] += 1
        return self._answer(question, " ".join(texts).split())

    def ask_text_timed(self, texts, question):
        self.ask_text(texts, question)
        return 0.2, 5, 0.6

    def held(self, memory):
        count = Counter(s for s, _ in memory.words)
        written = Counter()
        for u in memory.log:
            written[u["source"]] += u["tokens"]
        return {s: count[s] / n for s, n in written.items()}

    def updates(self, memory):
        return memory.log

    def nll(self, memory, text):
        self.calls["nll"] += 1
        return 2.0 * len(text.split()), len(text.split())

    def pool_stats(self, memory):
        return [{"layer": 0, "mean_norm": 1.0, "max_norm": 2.0}]

    def plain_forward(self, text):
        self.calls["plain_forward"] += 1

    def disk_bytes_per_token(self, memory):
        return 42.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return bench.load_data(write_data(tmp_path_factory.mktemp("data") / "nq.jsonl.gz"))


def test_retention_measures_what_the_memory_still_holds(data):
    subject = FakeSubject(pool_size=600, window=700)
    result = bench.retention(subject, data, questions=12, seed=3, ks=[0, 1, 5, 50])
    acc = {m: {k: v["accuracy"] for k, v in r.items()} for m, r in result["results"].items()}
    assert acc["memllm"]["0"] == acc["prompt"]["0"] == acc["bm25"]["0"] == 1.0
    assert acc["closed-book"] == {"0": 0.0, "1": 0.0, "5": 0.0, "50": 0.0}
    assert acc["bm25"]["50"] == 1.0  # BM25 finds the passage that names the item
    assert acc["prompt"]["5"] == 1.0 and acc["prompt"]["50"] == 0.0  # ~2,500 words cut to 700: the gold is cut
    assert acc["memllm"]["50"] < 0.5  # ~2,500 words through a 600-word pool: the gold fades
    survival = result["survival"]
    assert survival["0"] == {"paper": 1.0, "expected": 1.0, "measured": 1.0}
    assert survival["50"]["measured"] < 0.5 and abs(survival["50"]["expected"] - survival["50"]["measured"]) < 0.15
    assert abs(survival["50"]["paper"] - survival["50"]["expected"]) < 0.1  # t counts updates on a full pool
    # standard errors are the binomial ones
    r = result["results"]["memllm"]["50"]
    assert r["stderr"] == pytest.approx((r["accuracy"] * (1 - r["accuracy"]) / 12) ** 0.5, abs=1e-4)


def test_retention_calls_and_updates(data):
    subject = FakeSubject()
    result = bench.retention(subject, data, questions=5, seed=0, ks=[0, 2, 10])
    # memllm, pool (whole_pool) and the prefilled prompt, at every k
    assert subject.calls["new_memory"] == 5 and subject.calls["ask"] == 3 * 5 * 3
    assert subject.calls["ask_whole_pool"] == 5 * 3
    assert subject.calls["ask_text"] == 5 * 3 + 5  # bm25 per k, closed book once per question
    assert max(subject.count(t) for t in subject.writes) <= bench.CHUNK_TOKENS  # packed updates stay <= 512
    assert result["settings"]["ks"] == [0, 2, 10] and result["scorer"] and len(result["data"]["sha256"]) == 64
    assert len(result["details"]) == 5 and set(result["details"][0]["k"]) == {0, 2, 10}


def test_reserved_rows_are_never_used(data):
    subject = FakeSubject()
    result = bench.retention(subject, data, questions=30, seed=1, ks=[0, 50])
    assert max(result["rows_used"]) < 2000 and result["data"]["rows"] == "0-1999"
    assert not any("RESERVED" in t for t in subject.writes)
    assert all(item.row < 2000 for item in data.items)


def test_unsupported_methods_are_reported_not_scored(data):
    subject = FakeSubject(supports=("memllm",))
    result = bench.retention(subject, data, questions=2, seed=0, ks=[0])
    assert list(result["results"]) == ["memllm"]
    assert result["settings"]["methods_not_supported"] == ["pool", "prompt", "bm25", "closed-book"]
    with pytest.raises(InputError, match="unknown method"):
        bench.retention(subject, data, questions=1, seed=0, methods=["oracle"])


def test_bm25_keeps_to_its_budget_and_the_original_order():
    subject = FakeSubject()
    chunks = ["apples are red fruit " * 5, "the code of item 7 is code7 " * 3, "bananas are yellow " * 5,
              "item 7 code code7 again"]
    top = bench.bm25_top(chunks, "What is the code of item 7?", subject, budget=30)
    assert top == [chunks[1], chunks[3]]  # both about item 7, in their order; the fruit left out


def test_integrity_measures_at_log_spaced_checkpoints_on_forks(data):
    subject = FakeSubject(pool_size=500)
    result = bench.integrity(subject, data, questions=6, seed=0, updates=120)
    points = [r["updates"] for r in result["results"]]
    assert points == [0, 10, 100, 120]
    assert subject.calls["write"] == 120 + 4 * 6  # the stream once; the facts on a fork at each checkpoint
    first, last = result["results"][0], result["results"][-1]
    assert first["retention"]["accuracy"] == 1.0 and last["retention"]["total"] == 6
    assert last["perplexity"] == pytest.approx(first["perplexity"]) and last["perplexity_ratio"] == 1.0
    assert last["held"] == 500 and first["held"] == 0  # the facts went to the forks, not the memory
    assert subject.calls["archived"] == 0  # the stream keeps no long-term tier (RAM stays flat)


def test_speed_fills_and_times_both_sides(data):
    subject = FakeSubject(pool_size=600, window=2000)
    result = bench.speed(subject, data, questions=3, seed=0)
    assert [r["fill"] for r in result["runs"]] == [0.25, 0.5, 1.0]
    assert all(r["held"] >= r["fill"] * 600 for r in result["runs"])
    assert result["runs"][0]["memllm"]["first_token_s"]["median"] == 0.1
    assert result["runs"][0]["prompt"]["first_token_s"]["median"] == 0.2
    assert subject.calls["plain_forward"] == 6 and result["disk_bytes_per_token"] == 42.0


def test_data_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no evaluation data"):
        bench.load_data(None)
    with pytest.raises(InputError, match="no such data file"):
        bench.load_data(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="bad row range"):
        bench.parse_rows("a-b")
    assert bench.parse_rows("0-1999") == range(0, 2000)


def test_cli_bench_on_a_tiny_model(tmp_path, env_model):
    data = write_data(tmp_path / "nq.jsonl.gz", rows=80)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "memllm_cli", "bench", "retention", "--data", str(data), "--questions", "2",
         "--k", "0", "--k", "1", "--max-tokens", "4", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["settings"]["questions"] == 2 and set(result["results"]) == set(bench.METHODS)
    assert result["environment"]["versions"]["memllm"] and result["environment"]["model"]["name"] == str(env_model)
    assert (out / "retention.json").is_file() and (out / "retention.png").read_bytes()[:4] == b"\x89PNG"
    proc = subprocess.run([sys.executable, "-m", "memllm_cli", "bench", "retention", "--questions", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "--data" in proc.stderr


class FakeScaleSubject:
    """A stored memory of words: a question is answered right when its passage was ingested."""

    def __init__(self):
        self.stores, self.closed, self.plain = [], [], 0

    def count(self, text):
        return len(text.split())

    def plain_forward(self, text):
        self.plain += 1

    def stored_memory(self):
        self.stores.append([])
        return self.stores[-1]

    def ingest(self, stored, notes):
        stored.extend(notes)
        return sum(self.count(text) for _, text in notes)

    def ask_stored(self, stored, question):
        code = question.split("item ")[1].rstrip("?")
        read = [name for name, text in stored if f"code{code}." in text]
        return (f"code{code}" if read else "no idea"), 0.01, read

    def ask_text(self, texts, question):
        return "code" + question.split("item ")[1].rstrip("?")

    def disk_bytes(self, stored):
        return 10 * sum(self.count(text) for _, text in stored)

    def close(self, stored):
        self.closed.append(stored)
        return None


def test_scale_grows_one_memory_and_asks_only_what_it_holds(data):
    subject = FakeScaleSubject()
    filler = iter([(f"f{i}", " ".join(["word"] * 30)) for i in range(400)])
    result = bench.scale(subject, data, sizes=[2000, 500], questions=5, filler=filler)
    runs = result["runs"]
    assert [r["tokens"] >= size for r, size in zip(runs, [500, 2000], strict=True)] == [True, True]
    assert all(r["memory_correct"] == r["prompt_correct"] == r["questions"] == min(5, r["gold_notes"]) for r in runs)
    assert runs[1]["gold_notes"] > runs[0]["gold_notes"] > 0  # gold passages spread over the whole memory
    assert all(r["disk_bytes_per_token"] == 10 for r in runs)
    assert all(r["read_gold"] == r["questions"] and all(a["read_gold"] for a in r["asked"]) for r in runs)
    assert len(subject.stores) == 1 and subject.closed == subject.stores  # one memory, removed at the end
    gold = sum(1 for name, _ in subject.stores[0] if name.startswith("nq/"))
    assert 0 < gold < len(subject.stores[0])  # gold among filler


def test_cli_bench_scale_on_a_tiny_model(tmp_path, env_model, monkeypatch):
    data = write_data(tmp_path / "nq.jsonl.gz", rows=80)
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("MEMLLM_BENCH_DIR", str(scratch))
    proc = subprocess.run(
        [sys.executable, "-m", "memllm_cli", "bench", "scale", "--data", str(data), "--size", "1000", "--size", "5000",
         "--questions", "2", "--max-tokens", "4", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout)["runs"]
    assert len(runs) == 2 and runs[0]["tokens"] >= 1000 and runs[1]["tokens"] >= 5000
    assert all(r["disk_bytes_per_token"] > 0 and r["ingest_over_plain"] > 0 for r in runs)
    assert (out / "scale.png").read_bytes()[:4] == b"\x89PNG"
    assert list(scratch.iterdir()) == []  # the benchmark's memory is removed
    assert all(r["read_gold"] is not None and len(r["asked"]) == r["questions"] for r in runs)
    kept = subprocess.run(
        [sys.executable, "-m", "memllm_cli", "bench", "scale", "--data", str(data), "--size", "1000",
         "--questions", "1", "--max-tokens", "2", "--json", "--keep"],
        capture_output=True, text=True, timeout=300,
    )
    assert kept.returncode == 0, kept.stderr
    home = json.loads(kept.stdout)["memory_home"]
    assert f"MEMLLM_HOME={home}" in kept.stderr and Path(home).parent == scratch
    status = subprocess.run([sys.executable, "-m", "memllm_cli", "-m", "scale", "status", "--json"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "MEMLLM_HOME": home})
    assert status.returncode == 0 and json.loads(status.stdout)["tokens"] > 0, status.stderr
