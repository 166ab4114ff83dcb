"""KIVI-style quantization of blocks (issue 12, compact blocks): round trips within half a
step, the grouping the literature uses, and 4-bit packing."""

import pytest
import torch

from memllm_cli.memory import codec
from memllm_cli.model.quant import dequantize, quantize, statistics, stored_bytes


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("axis, group", [("tokens", 32), ("channels", 16)])
def test_a_round_trip_is_within_half_a_step(bits, axis, group):
    torch.manual_seed(0)
    x = torch.randn(45, 3, 2, 32) * 4  # (T, L, Hkv, hd); 45 tokens: the last token group is shorter
    q = quantize(x, bits, group, axis)
    y = dequantize(q, bits, group, axis, tuple(x.shape), torch.float32)
    step = q["scale"].float().max()
    assert y.shape == x.shape and float((x - y).abs().max()) <= 0.5 * float(step) + 1e-2


def test_keys_are_grouped_per_channel_so_an_outlier_channel_costs_only_itself():
    x = torch.randn(64, 1, 1, 16)
    x[..., 3] *= 1000  # an outlier channel, as keys have
    per_channel = dequantize(quantize(x, 4, 64, "tokens"), 4, 64, "tokens", tuple(x.shape), torch.float32)
    per_token = dequantize(quantize(x, 4, 16, "channels"), 4, 16, "channels", tuple(x.shape), torch.float32)
    others = [c for c in range(16) if c != 3]
    assert (x - per_channel)[..., others].abs().max() < 0.5 < (x - per_token)[..., others].abs().max()


def test_four_bits_take_half_the_bytes_of_eight():
    x = torch.randn(64, 2, 2, 32)
    eight, four = quantize(x, 8, 32, "channels"), quantize(x, 4, 32, "channels")
    assert four["codes"].numel() * 2 == eight["codes"].numel()
    assert stored_bytes(four) < stored_bytes(eight) < x.numel() * 2  # both below fp16


def test_bad_settings_are_refused():
    x = torch.randn(8, 1, 1, 12)
    with pytest.raises(ValueError, match="bits"):
        quantize(x, 3, 4, "tokens")
    with pytest.raises(ValueError, match="multiple"):
        quantize(x, 8, 5, "channels")


def test_codes_are_token_major_and_unpadded_and_a_value_group_may_span_heads():
    x = torch.randn(45, 2, 3, 16)
    keys, values = quantize(x, 4, 32, "tokens"), quantize(x, 4, 48, "channels")
    assert keys["codes"].shape == (45, 2, 3, 8) and keys["scale"].shape == (2, 2, 3, 16)
    assert values["codes"].shape == (45, 2, 3, 8) and values["scale"].shape == (45, 2, 1)
    y = dequantize(values, 4, 48, "channels", tuple(x.shape), torch.float32)
    assert float((x - y).abs().max()) <= 0.5 * float(values["scale"].float().max()) + 1e-2


@pytest.mark.parametrize("axis, group", [("tokens", 20), ("channels", 16)])
def test_eight_bit_statistics_cover_every_group_and_round_trip_within_half_a_step(axis, group):
    torch.manual_seed(1)
    x = torch.randn(45, 3, 2, 32) * torch.tensor([0.1, 1.0, 30.0])[None, :, None, None]  # layers apart in range
    x[..., 7] += 50  # an outlier channel
    q = quantize(x, 4, group, axis, stat_bits=8)
    assert q["scale"].dtype == q["min"].dtype == torch.uint8
    assert q["scale.range"].shape == q["min.range"].shape == (3, 2) and q["scale.range"].dtype == torch.float16
    scale, low = statistics(q)
    y = dequantize(q, 4, group, axis, tuple(x.shape), torch.float32)
    # per layer: within half of that layer's largest step, so a small layer is not drowned by a large one
    for layer in range(3):
        step = float(scale[:, layer].max())
        assert float((x - y)[:, layer].abs().max()) <= 0.5 * step * 1.001 + 1e-6
    plain = quantize(x, 4, group, axis)
    assert stored_bytes(q) < stored_bytes(plain)
    with pytest.raises(ValueError, match="stat_bits"):
        quantize(x, 4, group, axis, stat_bits=4)


@pytest.mark.parametrize("block_format", ["int4-s8", "int4-s8-zstd"])
def test_a_block_with_eight_bit_statistics_reads_its_rows_as_it_reads_whole(block_format):
    torch.manual_seed(2)
    keys, values = torch.randn(3, 3, 2, 16), torch.randn(3, 3, 2, 16)  # as many tokens as layers
    found = codec.block_codec(block_format, values)
    stored = codec.encode(keys, values, found)
    rows = torch.tensor([0, 2])
    kept, kept_codec = codec.kept_rows(stored, found, rows)
    assert "entropy" not in kept_codec and kept["values.codes"].shape[0] == 2  # kept rows are plain codes
    whole = codec.decode(stored, found)
    some = codec.decode_rows(kept, kept_codec, rows)
    assert torch.equal(some["keys"], whole["keys"][rows]) and torch.equal(some["values"], whole["values"][rows])


def test_entropy_coded_codes_read_back_bit_for_bit_and_smaller():
    torch.manual_seed(3)
    keys, values = torch.randn(300, 4, 2, 32), torch.randn(300, 4, 2, 32)
    plain = codec.encode(keys, values, codec.block_codec("int4-s8", values))
    found = codec.block_codec("int4-s8-zstd", values)
    coded = codec.encode(keys, values, found)
    assert set(codec.names(found)) == set(coded) and "keys.codes.zstd" in coded and "keys.codes" not in coded
    for kv in ("keys", "values"):  # lossless: what the codes decode to is what int4-s8 stores
        assert coded[f"{kv}.codes.zstd"].numel() < 0.97 * plain[f"{kv}.codes"].numel()
    a, b = codec.decode(coded, found), codec.decode(plain, codec.block_codec("int4-s8", values))
    assert torch.equal(a["keys"], b["keys"]) and torch.equal(a["values"], b["values"])


def test_damaged_entropy_coded_codes_are_refused_not_misread():
    torch.manual_seed(4)
    keys, values = torch.randn(40, 2, 2, 16), torch.randn(40, 2, 2, 16)
    found = codec.block_codec("int4-s8-zstd", values)
    good = codec.encode(keys, values, found)
    flipped = good["values.codes.zstd"].clone()
    flipped[len(flipped) // 2] ^= 0xFF  # inside the compressed data: the frame checksum fails
    cut = good["keys.codes.zstd"][:-9]
    other = codec.encode(keys[:20], values[:20], found)["keys.codes.zstd"]  # a valid frame of another size
    for name, bad in (("values.codes.zstd", flipped), ("keys.codes.zstd", cut), ("keys.codes.zstd", other),
                      ("keys.codes.zstd", torch.zeros(3, dtype=torch.uint8))):
        with pytest.raises(codec.Undecodable):
            codec.decode({**good, name: bad}, found)
    with pytest.raises(codec.Undecodable, match="entropy coder"):
        codec.decode(good, {**found, "entropy": "brotli"})
