"""Parity of the memory-augmented forward pass with the plain Hugging Face model."""

import itertools

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


def test_loglik_is_the_prompts_log_probability_of_the_span():
    model = tiny_model("llama")
    engine = MemoryModel(model)
    chunk, q = ids(30, 8), ids(12, 9)
    full = torch.cat([chunk, q])
    with torch.no_grad():
        logp = model(full[None]).logits[0].float().log_softmax(-1)  # row i predicts token i + 1
    start, end = 3, 10  # of q
    expected = sum(float(logp[30 + i - 1, full[30 + i]]) for i in range(start, end))
    assert engine.loglik(q, engine.encode(chunk), start, end) == pytest.approx(expected, abs=1e-3)
    # the context is read: without it the span's likelihood is another number
    assert engine.loglik(q, None, start, end) != pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_judging_contexts_in_one_batch_equals_each_alone_and_generation_resumes(kind):
    engine = MemoryModel(tiny_model(kind))
    sink = engine.encode(ids(4, 10))
    contexts = [sink + engine.encode(ids(n, 11 + n), sink) for n in (25, 9, 40)]  # of different lengths
    q = ids(10, 12)
    fits, resume = engine.judge(q, contexts, 2, 8)
    alone = [engine.loglik(q, c, 2, 8) for c in contexts]
    assert fits == pytest.approx(alone, abs=1e-3)
    for r, context in enumerate(contexts):
        plain = list(engine.generate(q, context, max_new_tokens=6))
        assert list(engine.generate(q, context, max_new_tokens=6, prefilled=resume(r, 6))) == plain


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


class Counting(MemoryModel):
    def _run(self, ids, cache, logits_to_keep=0, start=None):
        self.passes = getattr(self, "passes", 0) + 1
        return super()._run(ids, cache, logits_to_keep, start)


@pytest.mark.parametrize("kind", KINDS)
def test_looked_up_drafts_give_the_plain_greedy_tokens_in_fewer_passes(kind):
    engine = Counting(tiny_model(kind))
    chunk, q = ids(20, 8), ids(6, 9)
    pool = engine.encode(chunk)
    plain = list(engine.generate(q, pool, max_new_tokens=24, lookup=False))
    engine.passes = 0
    # a note holding the answer: every draft from it is right
    assert list(engine.generate(q, pool, max_new_tokens=24, draft_from=[[*q[-2:].tolist(), *plain]])) == plain
    assert engine.passes < 24 // 2
    # a note whose every bigram of the answer is followed by wrong tokens: every draft is refused
    # and its tail cropped from the cache
    wrong = [t for a, b in itertools.pairwise(plain) for t in (a, b, (b + 1) % 320, (b + 7) % 320)]
    assert list(engine.generate(q, pool, max_new_tokens=24, draft_from=[wrong])) == plain


def test_drafts_follow_the_longest_latest_match_and_stay_inside_their_text():
    from memllm_cli.model.lookup import Drafts

    drafts = Drafts([[1, 2, 3, 4, 5], [9, 2, 3, 7, 8], [6]], longest=3)
    drafts.extend([9, 2, 3])
    assert drafts.propose(5) == [7, 8]  # "9 2 3" matches the second text longer; it ends there
    drafts.extend([7, 8, 1, 2, 3])
    assert drafts.propose(5) == [4, 5]  # "1 2 3" the first text
    assert drafts.propose(1) == [4]
    drafts.extend([42, 43])
    assert drafts.propose(5) == []  # nothing followed "42 43"


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
