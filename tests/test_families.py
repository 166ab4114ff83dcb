"""Every decoder family in tests/families.py: read exactly, or refused at load.

The checks are the engine's parity tests, on each family's tiny random model in float32:
an empty memory is the plain model; a chunk in memory is that chunk in the prompt; chunks
written one after another are one long prompt; greedy generation is `generate()`; and a
chunk written at another position (as after drops, or a budgeted read) reads the same,
which is what layers without positions and partial rotary get wrong when treated alike.
"""

from __future__ import annotations

import functools

import pytest
import torch

from memllm_cli.errors import ModelError
from memllm_cli.model.engine import MemoryModel
from memllm_cli.model.pool import Pool

from .families import FAMILIES, VOCAB, WINDOW, build

WORKS = [f for f in FAMILIES if f.refused is None]
REFUSED = [f for f in FAMILIES if f.refused is not None]
ATOL = 1e-4


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@functools.cache
def loaded(name: str) -> tuple[object, MemoryModel]:
    family = next(f for f in FAMILIES if f.name == name)
    model = build(family)
    return model, MemoryModel(model)


def prompt_logits(model, tokens: torch.Tensor, last: int) -> torch.Tensor:
    with torch.inference_mode():
        return model(tokens[None]).logits[0, -last:].float()


@pytest.mark.parametrize("family", WORKS, ids=lambda f: f.name)
def test_empty_memory_equals_plain_model(family):
    model, engine = loaded(family.name)
    q = ids(11, 1)
    empty = Pool.empty(engine.layers, engine.kv_heads, engine.head_dim, torch.float32)
    torch.testing.assert_close(engine.forward(q, empty), prompt_logits(model, q, 11), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("family", WORKS, ids=lambda f: f.name)
def test_one_chunk_in_memory_equals_chunk_in_prompt(family):
    model, engine = loaded(family.name)
    chunk, q = ids(40, 2), ids(9, 3)  # longer than the shrunk sliding windows (16)
    torch.testing.assert_close(engine.forward(q, engine.encode(chunk)),
                               prompt_logits(model, torch.cat([chunk, q]), 9), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("family", WORKS, ids=lambda f: f.name)
def test_chunks_written_after_the_pool_equal_one_long_prompt(family):
    model, engine = loaded(family.name)
    sink, a, b, q = ids(4, 4), ids(30, 5), ids(25, 6), ids(7, 7)
    sink_pool = engine.encode(sink)
    pool = engine.encode(a, sink_pool)
    pool = pool + engine.encode(b, sink_pool + pool)
    torch.testing.assert_close(engine.forward(q, sink_pool + pool),
                               prompt_logits(model, torch.cat([sink, a, b, q]), 7), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("family", WORKS, ids=lambda f: f.name)
def test_a_chunk_written_elsewhere_reads_the_same(family):
    """Drops and budgeted reads move a token to another position than it was written at."""
    model, engine = loaded(family.name)
    chunk, q = ids(24, 12), ids(6, 13)
    moved = engine.encode(chunk, start=300)
    torch.testing.assert_close(engine.forward(q, moved), prompt_logits(model, torch.cat([chunk, q]), 6),
                               atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("family", WORKS, ids=lambda f: f.name)
def test_greedy_generation_matches_hugging_face_generate(family):
    model, engine = loaded(family.name)
    chunk, q = ids(20, 8), ids(6, 9)
    ours = list(engine.generate(q, engine.encode(chunk), max_new_tokens=8))
    with torch.inference_mode():
        theirs = model.generate(torch.cat([chunk, q])[None], attention_mask=torch.ones(1, 26, dtype=torch.long),
                                max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, -8:].tolist()


@pytest.mark.parametrize("family", REFUSED, ids=lambda f: f.name)
def test_families_memllm_cannot_read_exactly_are_refused_at_load(family):
    with pytest.raises(ModelError, match=family.refused) as err:
        MemoryModel(build(family))
    assert "\n" not in err.value.message


def test_layers_without_positions_store_keys_as_they_are():
    _, engine = loaded("SmolLM3 (layers without positions)")
    assert engine.layout.rope == ("", "", "", None)  # no_rope_layers [1, 1, 1, 0]
    keys = torch.randn(4, engine.kv_heads, 5, engine.head_dim)
    turned = engine.rotate(keys, 9)
    assert torch.equal(turned[3], keys[3]) and not torch.allclose(turned[:3], keys[:3])


def test_partial_rotary_rotates_only_its_part():
    _, engine = loaded("GPT-NeoX / Pythia (partial rotary)")  # rotary_pct 0.25 of 16 dims
    keys = torch.randn(4, 4, 5, 16)
    turned = engine.rotate(keys, 9)
    assert torch.equal(turned[..., 4:], keys[..., 4:]) and not torch.allclose(turned[..., :4], keys[..., :4])
    torch.testing.assert_close(engine.unrotate(turned, 9), keys, atol=1e-5, rtol=1e-5)


def test_sliding_windows_are_measured_per_model():
    assert loaded("Gemma 3 (local and global rotary)")[1].sliding_window == WINDOW
    assert loaded("Gemma 3 (local and global rotary)")[1].layout.rope[-1] == "full_attention"
    assert loaded("Mistral (sliding window)")[1].sliding_window == WINDOW
    assert loaded("Qwen2.5")[1].sliding_window is None  # use_sliding_window false
    assert loaded("Phi-4-mini (partial rotary, longrope)")[1].sliding_window is None  # wider than the model


def test_rope_that_changes_with_length_caps_the_window():
    """longrope rotates by other frequencies beyond original_max_position_embeddings."""
    assert loaded("Phi-4-mini (partial rotary, longrope)")[1].max_positions == 4096


def test_a_model_whose_memory_would_read_wrong_is_refused(monkeypatch):
    """The load-time check: break the engine's rotation and the model is refused."""
    model = build(WORKS[0])
    monkeypatch.setattr(MemoryModel, "unrotate", lambda self, keys, start: keys)
    with pytest.raises(ModelError, match="refuses a memory it would read wrong"):
        MemoryModel(model)


def test_docs_models_table_lists_every_family_as_the_tests_find_it():
    """docs/models.md is written by benchmarks/families.py; it cannot drift from this table."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    table = text.split("<!-- families: begin")[1].split("<!-- families: end")[0]
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) - {"family", "---|---|---|---|---|---|---|"} == {f.name for f in FAMILIES}
    for family in FAMILIES:
        assert ("| refused: " in rows[family.name]) == (family.refused is not None), family.name


def test_the_cli_refuses_such_a_model_in_one_line(tmp_path):
    import subprocess
    import sys

    from memllm_cli.random_checkpoints import tiny_tokenizer

    refused = next(f for f in REFUSED if "GPT-2" in f.name)
    build(refused).save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer(True).save_pretrained(tmp_path / "gpt2")
    out = subprocess.run([sys.executable, "-m", "memllm_cli", "--model", str(tmp_path / "gpt2"), "ingest", "-"],
                         input=b"some notes", capture_output=True, timeout=300)
    err = out.stderr.decode()
    assert out.returncode == 5 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("memllm: error: ")] == [
        "memllm: error: gpt2 is not a decoder-only model with rotary positions"], err
    assert "hint: see docs/models.md" in err


def test_the_fingerprint_is_the_weights_not_the_dtype_even_where_transformers_renames_them(tmp_path):
    """transformers 5 fuses Mixtral's experts under names the files do not have."""
    from memllm_cli.model.loading import load_model
    from memllm_cli.random_checkpoints import tiny_tokenizer

    build(next(f for f in FAMILIES if f.name == "Mixtral")).save_pretrained(tmp_path / "mixtral")
    tiny_tokenizer(True).save_pretrained(tmp_path / "mixtral")
    prints = {load_model(str(tmp_path / "mixtral"), cache_dir=tmp_path / "cache", dtype=d).fingerprint
              for d in ("float32", "bfloat16")}
    assert len(prints) == 1


def test_head_counts_come_from_the_model_not_from_config_keys_it_ignores(tmp_path):
    """A GPT-NeoX config carrying num_key_value_heads (GPT-NeoX has none: every head has its own
    keys) once crashed ingest with a tensor-size error: the engine measures the cache instead."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from memllm_cli.random_checkpoints import tiny_tokenizer
    from memllm_cli.service import Memllm

    from .families import shrink

    family = next(f for f in FAMILIES if f.name.startswith("GPT-NeoX"))
    config = AutoConfig.for_model(**{**shrink(family.raw(), family.layers), "num_key_value_heads": 2})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    engine = MemoryModel(model)
    assert (engine.kv_heads, engine.head_dim) == (4, 16) and config.num_key_value_heads == 2
    chunk, q = ids(40, 2), ids(9, 3)
    torch.testing.assert_close(engine.forward(q, engine.encode(chunk)),
                               prompt_logits(model, torch.cat([chunk, q]), 9), atol=ATOL, rtol=ATOL)
    model.save_pretrained(tmp_path / "neox")
    tiny_tokenizer(True).save_pretrained(tmp_path / "neox")
    service = Memllm(model=str(tmp_path / "neox"), pool_size=512)
    from memllm_cli.text.sources import Document

    assert service.ingest_documents([Document.of("a", "The shed code is 4417. " * 20)]).chunks == 1
    assert len(list(service.ask("code?", max_new_tokens=3))) >= 0


def test_a_window_too_small_for_a_memory_is_said_in_the_models_terms(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from memllm_cli.random_checkpoints import tiny_tokenizer
    from memllm_cli.service import Memllm
    from memllm_cli.text.sources import Document

    from .families import shrink

    family = next(f for f in FAMILIES if f.name.startswith("Mistral"))
    config = AutoConfig.for_model(**{**shrink(family.raw(), family.layers), "sliding_window": 512})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "small")
    tiny_tokenizer(True).save_pretrained(tmp_path / "small")
    with pytest.raises(ModelError, match=r"sees 512 tokens at a time \(every layer attends through a sliding "
                                         r"window that long\); a memory needs at least") as refused:
        Memllm(model=str(tmp_path / "small")).ingest_documents([Document.of("a", "Some text. " * 10)])
    assert "-" not in refused.value.message.split("needs at least")[1].split()[0]


MOE = [f for f in WORKS if any(k in f.name for k in ("MoE", "Mixtral", "gpt-oss"))]


@pytest.mark.parametrize("family", MOE, ids=lambda f: f.name)
def test_mixture_of_experts_logits_match_along_the_same_tokens(family):
    """What "exact" means for MoE (docs/models.md): the logits from memory are the prompt's within
    float32 rounding at every position of the same token sequence, for several random seeds.
    Greedy sequences may still part where two tokens' logits tie within rounding (random tiny
    models tie often), so they are compared token by token along the prompt's own continuation:
    a real difference (a wrong key, a flipped expert) shows here, ties do not hide it."""
    model, engine = loaded(family.name)
    for seed in range(6):
        chunk, q = ids(20, 20 + seed), ids(6, 40 + seed)
        with torch.inference_mode():
            prompt = torch.cat([chunk, q])
            path = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, -8:]
        tail = torch.cat([q, path])
        torch.testing.assert_close(engine.forward(tail, engine.encode(chunk)),
                                   prompt_logits(model, torch.cat([chunk, tail]), len(tail)), atol=ATOL, rtol=ATOL)
