"""How a block stores its keys and values: float16, or quantized (compact blocks).

A block's metadata names its codec (`"codec": {"bits", "key_group", "value_group",
"stat_bits"}`); a block without one is float16, as every block written before compact blocks
is, so a memory may mix formats and old memories read as they always did. Quantized blocks
hold KIVI-style codes (model/quant.py): keys per channel over groups of `key_group` tokens,
values per token over groups of `value_group` channels of a layer, their scales and minimums
in float16 or (`stat_bits` 8) in 8 bits over each layer's range. With `"entropy": "zstd"` the
two code tensors are stored zstd-compressed (a lossless 7% of a 4-bit block: the codes of a
group cluster around its middle), decoded whole at every read at 0.65-1.1 GB/s.

    tensors of a float16 block:   keys, values (T, L, Hkv, hd) in the memory's dtype, ids (T,)
    tensors of a quantized block: keys.codes, keys.scale, keys.min, values.codes,
                                  values.scale, values.min, ids
                   and with 8-bit statistics: keys.scale.range, keys.min.range,
                                  values.scale.range, values.min.range (L, 2)
                   and entropy-coded: keys.codes.zstd, values.codes.zstd (1-D uint8, one
                                  zstd frame each) in place of keys.codes, values.codes
"""

from __future__ import annotations

import torch
import zstandard

from ..errors import StoreError
from ..model.quant import dequantize, dequantize_rows, quantize

# The formats a memory can choose (`block_format`); the groups are fixed when a block is
# written and recorded in it, so changing them here never changes how old blocks read.
FORMATS: dict[str, dict | None] = {
    "float16": None,
    "int8": {"bits": 8, "key_group": 128, "value_group": 64},
    "int4": {"bits": 4, "key_group": 128, "value_group": 64},
    "int4-s8": {"bits": 4, "key_group": 128, "value_group": 64, "stat_bits": 8},
    "int4-s8-zstd": {"bits": 4, "key_group": 128, "value_group": 64, "stat_bits": 8, "entropy": "zstd"},
}
DEFAULT_FORMAT = "int4-s8-zstd"  # see docs/design.md, "Compact blocks"
PARTS = ("codes", "scale", "min")
STAT_RANGES = ("scale.range", "min.range")  # with 8-bit statistics
ZSTD = ".zstd"  # the suffix of an entropy-coded tensor's name
ZSTD_LEVEL = 3  # level 9 gains under 0.2% at half the speed, 19 1.5% at 5 MB/s (design.md)


class Undecodable(StoreError):
    """A block's tensors do not decode (damaged entropy-coded codes, or shapes that disagree):
    a StoreError, so every path that reads or evicts blocks treats it as damage."""


def spec(name: str) -> dict | None:
    if name not in FORMATS:
        raise ValueError(f"unknown block format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def of(meta: dict) -> dict | None:
    """The codec a block's metadata records (None: float16)."""
    codec = meta.get("codec")
    return codec if isinstance(codec, dict) else None


def names(codec: dict | None) -> tuple[str, ...]:
    """The tensors holding a block's keys and values."""
    if codec is None:
        return ("keys", "values")
    coded = ZSTD if _entropy(codec) else ""
    return tuple(f"{kv}.{part}{coded if part == 'codes' else ''}"
                 for kv in ("keys", "values") for part in _parts(codec))


def _parts(codec: dict) -> tuple[str, ...]:
    return PARTS + STAT_RANGES if codec.get("stat_bits", 16) == 8 else PARTS


def _entropy(codec: dict | None) -> bool:
    """Whether the codec stores its codes entropy-coded; refuses a coder it does not know."""
    coder = (codec or {}).get("entropy")
    if coder not in (None, "zstd"):
        raise Undecodable(f"unknown entropy coder {coder!r}")
    return coder == "zstd"


def kept_rows(tensors: dict[str, torch.Tensor], codec: dict | None,
              rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Some rows of a block (its tensors but ids, as `names` lists them), to keep when the
    block is evicted: its token-major tensors' rows and the rest whole (key statistics,
    statistics' ranges), codes no longer entropy-coded; and the codec they decode with
    (`decode_rows`)."""
    if codec is not None and _entropy(codec):
        tensors, codec = plain_codes(tensors, codec), {k: v for k, v in codec.items() if k != "entropy"}
    return {name: t if _whole(name) else t[rows] for name, t in tensors.items()}, codec


def _whole(name: str) -> bool:
    """Whether a block tensor is not token-major (key statistics, statistics' ranges)."""
    return (name.startswith("keys.") and not name.endswith(".codes")) or name.endswith(".range")


def encode(keys: torch.Tensor, values: torch.Tensor, codec: dict | None) -> dict[str, torch.Tensor]:
    """The block tensors for keys and values (T, L, Hkv, hd)."""
    if codec is None:
        return {"keys": keys, "values": values}  # as the memory holds them (float16, or float32 in evaluations)
    bits, stat_bits = codec["bits"], codec.get("stat_bits", 16)
    out = {}
    for kv, x, group, axis in (("keys", keys, codec["key_group"], "tokens"),
                               ("values", values, _value_group(codec, values), "channels")):
        out.update({f"{kv}.{part}": t for part, t in quantize(x, bits, group, axis, stat_bits).items()})
    return entropy_coded(out) if _entropy(codec) else out


def entropy_coded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A quantized block's tensors with its two code tensors zstd-compressed (one frame each)."""
    out = dict(tensors)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
    for kv in ("keys", "values"):
        codes = out.pop(f"{kv}.codes").contiguous()
        out[f"{kv}.codes{ZSTD}"] = torch.frombuffer(bytearray(compressor.compress(codes.numpy().data)),
                                                    dtype=torch.uint8)
    return out


def plain_codes(tensors: dict[str, torch.Tensor], codec: dict) -> dict[str, torch.Tensor]:
    """The tensors with entropy-coded codes decoded, checked against the shape the block's
    statistics give them: T from the value statistics (T, L, groups), (L, Hkv, hd) from the
    key statistics (G, L, Hkv, hd)."""
    if not _entropy(codec):
        return tensors
    try:
        t = tensors["values.scale"].shape[0]
        layers, heads, hd = tensors["keys.scale"].shape[1:]
    except (KeyError, ValueError) as err:
        raise Undecodable(f"its statistics are missing or misshapen: {err}") from None
    shape = (t, layers, heads, hd // 2 if codec["bits"] == 4 else hd)
    size = t * layers * heads * shape[-1]
    out = {name: x for name, x in tensors.items() if not name.endswith(ZSTD)}
    decompressor = zstandard.ZstdDecompressor()
    for kv in ("keys", "values"):
        packed = tensors[f"{kv}.codes{ZSTD}"].contiguous().numpy().data
        codes = torch.empty(shape, dtype=torch.uint8)
        try:
            if zstandard.frame_content_size(packed) != size:  # checked first: a damaged header may claim anything
                raise Undecodable(f"its {kv} codes do not hold the {size} bytes of {shape}")
            with decompressor.stream_reader(packed) as reader:
                done = reader.readinto(codes.numpy().data.cast("B"))
                if done != size or reader.read(1):
                    raise Undecodable(f"its {kv} codes decode to other than the {size} bytes of {shape}")
        except zstandard.ZstdError as err:
            raise Undecodable(f"its {kv} codes do not decode: {err}") from None
        out[f"{kv}.codes"] = codes
    return out


def decode(tensors: dict[str, torch.Tensor], codec: dict | None) -> dict[str, torch.Tensor]:
    """Keys and values (T, L, Hkv, hd) from a block's tensors (see `names`); float16 when quantized.
    The shape is the block's own: T from the value codes, (L, Hkv, hd) from the key scales."""
    if codec is None:
        return {"keys": tensors["keys"], "values": tensors["values"]}
    tensors = plain_codes(tensors, codec)
    full = (tensors["values.codes"].shape[0], *tensors["keys.scale"].shape[1:])
    out = {}
    for kv, group, axis in (("keys", codec["key_group"], "tokens"), ("values", codec["value_group"], "channels")):
        out[kv] = dequantize(_of(tensors, kv, codec), codec["bits"], group, axis, full)
    return out


def _of(tensors: dict[str, torch.Tensor], kv: str, codec: dict) -> dict[str, torch.Tensor]:
    return {part: tensors[f"{kv}.{part}"] for part in _parts(codec)}


def decode_rows(tensors: dict[str, torch.Tensor], codec: dict | None, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keys and values of some rows of a block, from those rows of its token-major tensors and,
    for a quantized block, its whole key scales: bit for bit what `decode` gives those rows."""
    if codec is None:
        return {"keys": tensors["keys"], "values": tensors["values"]}
    tensors = plain_codes(tensors, codec)
    keys = dequantize_rows(_of(tensors, "keys", codec), codec["bits"], codec["key_group"], rows)
    count, layers, heads, hd = keys.shape
    values = dequantize(_of(tensors, "values", codec), codec["bits"], codec["value_group"], "channels",
                        (count, layers, heads, hd))
    return {"keys": keys, "values": values}


def block_codec(name: str, values: torch.Tensor) -> dict | None:
    """The codec recorded in a new block of this format."""
    return resolved(spec(name), values)


def resolved(codec: dict | None, values: torch.Tensor) -> dict | None:
    """The codec with its groups fitted to these values (T, L, Hkv, hd)."""
    return None if codec is None else {**codec, "value_group": _value_group(codec, values)}


def _value_group(codec: dict, values: torch.Tensor) -> int:
    """Channels per value scale: the configured group where it divides a layer's channels, else one head."""
    channels = values.shape[2] * values.shape[3]
    group = codec["value_group"]
    return group if group <= channels and channels % group == 0 else values.shape[3]
