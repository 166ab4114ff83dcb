"""Parity of the memory-augmented forward pass with the plain Hugging Face model."""

import pytest
import torch

from memllm_cli.errors import ModelError
from memllm_cli.model.engine import MemoryModel
from memllm_cli.model.pool import Pool, drop_uniform

from .conftest import tiny_model

KINDS = ["llama", "qwen2", "mistral"]


def ids(n, seed):
    return torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_empty_memory_equals_plain_model(kind):
    model = tiny_model(kind)
    engine = MemoryModel(model)
    q = ids(11, 1)
    plain = model(q[None]).logits[0]
    empty = Pool.empty(engine.layers, engine.kv_heads, engine.head_dim, torch.float32)
    torch.testing.assert_close(engine.forward(q), plain, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.forward(q, empty), plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_one_chunk_in_memory_equals_chunk_in_prompt(kind):
    model = tiny_model(kind)
    engine = MemoryModel(model)
    chunk, q = ids(40, 2), ids(9, 3)
    pool = engine.encode(chunk)
    assert pool.keys.shape == (3, 2, 40, 16)
    in_prompt = model(torch.cat([chunk, q])[None]).logits[0, -9:]
    torch.testing.assert_close(engine.forward(q, pool), in_prompt, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_chunks_written_after_the_pool_equal_one_long_prompt(kind):
    model = tiny_model(kind)
    engine = MemoryModel(model)
    sink, a, b, q = ids(4, 4), ids(30, 5), ids(25, 6), ids(7, 7)
    sink_pool = engine.encode(sink)
    pool = engine.encode(a, sink_pool)
    pool = pool + engine.encode(b, sink_pool + pool)
    reference = model(torch.cat([sink, a, b, q])[None]).logits[0, -7:]
    torch.testing.assert_close(engine.forward(q, sink_pool + pool), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_hugging_face_generate(kind):
    model = tiny_model(kind)
    engine = MemoryModel(model)
    chunk, q = ids(20, 8), ids(6, 9)
    ours = list(engine.generate(q, engine.encode(chunk), max_new_tokens=8))
    theirs = model.generate(
        torch.cat([chunk, q])[None], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, -8:].tolist()
    assert ours == theirs


def test_generation_stops_at_a_stop_token():
    engine = MemoryModel(tiny_model())
    q = ids(6, 10)
    first = next(iter(engine.generate(q, max_new_tokens=5)))
    assert list(engine.generate(q, max_new_tokens=5, stop_ids=frozenset({first}))) == []


def test_sampling_is_reproducible_with_a_seed():
    engine = MemoryModel(tiny_model())
    q = ids(6, 11)
    one = list(engine.generate(q, max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=3))
    two = list(engine.generate(q, max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=3))
    assert one == two and len(one) == 10


def test_rotate_then_unrotate_is_identity():
    engine = MemoryModel(tiny_model())
    keys = torch.randn(3, 2, 50, 16)
    torch.testing.assert_close(engine.unrotate(engine.rotate(keys, 17), 17), keys, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(engine.rotate(keys, 17), keys)


def test_drop_uniform_keeps_order_and_count_and_replays():
    kept = drop_uniform(100, 30, seed=5)
    assert kept.shape == (70,)
    assert torch.equal(kept, kept.sort().values)
    assert len(set(kept.tolist())) == 70 and kept.max() < 100
    assert torch.equal(kept, drop_uniform(100, 30, seed=5))
    assert not torch.equal(kept, drop_uniform(100, 30, seed=6))


def test_pool_select_tail_and_concat_carry_tags():
    keys = torch.arange(2 * 1 * 5 * 2, dtype=torch.float32).reshape(2, 1, 5, 2)
    pool = Pool(keys, keys + 100, {"source": torch.arange(5)})
    assert pool.tail(2).tags["source"].tolist() == [3, 4]
    assert pool.select(torch.tensor([0, 4])).tags["source"].tolist() == [0, 4]
    joined = pool + Pool(keys[:, :, :1], keys[:, :, :1])
    assert len(joined) == 6 and joined.tags["source"].tolist() == [0, 1, 2, 3, 4, -1]
    with pytest.raises(ValueError):
        Pool(keys, keys, {"source": torch.arange(4)})


def test_window_overflow_is_a_clear_error():
    engine = MemoryModel(tiny_model(max_position_embeddings=64))
    with pytest.raises(ModelError, match="exceed the model's window of 64"):
        engine.forward(ids(40, 1), engine.encode(ids(30, 2)))
