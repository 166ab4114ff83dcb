"""Quantized keys and values (KIVI-style), for compact blocks.

KIVI (Liu et al., 2024) found that a KV cache's keys have outlier *channels* and its values
outlier *tokens*: so keys are quantized per channel (over groups of tokens) and values per
token (over groups of channels), each group with its own scale and minimum (asymmetric
uniform quantization). Codes are unsigned 8- or 4-bit integers, kept token-major like the
block (4-bit codes packed two a byte along the channels), so a block's rows can still be
sliced and nothing is padded: the last group of tokens may be shorter than the others.
Everything is a plain tensor, so a quantized block is still one safetensors file.

The scales and minimums can themselves be stored in 8 bits (`stat_bits=8`; "double
quantization", as QLoRA does for its scales): log-scales and minimums each uniform over
their layer's range, the range kept as two float16 numbers a layer (`scale.range`,
`min.range`, (L, 2)). The codes are then computed against the 8-bit statistics, with the
minimum rounded down and the scale rounded up so that every group's span is still covered.

Shapes follow blocks: token-major (T, L, Hkv, hd).
"""

from __future__ import annotations

import torch

BITS = (8, 4)
STAT_BITS = (16, 8)


def quantize(x: torch.Tensor, bits: int, group: int, axis: str, stat_bits: int = 16) -> dict[str, torch.Tensor]:
    """Codes (T, L, Hkv, hd or hd/2), scales and minimums of `x` (T, L, Hkv, hd): per
    channel over groups of `group` tokens (`axis="tokens"`, keys: scales (G, L, Hkv, hd)),
    or per token over groups of `group` channels of a layer (`axis="channels"`, values:
    scales (T, L, Hkv*hd/group); a group may span heads). Scales and minimums are float16,
    or with `stat_bits=8` uint8 codes plus their layers' ranges (`scale.range`, `min.range`)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if stat_bits not in STAT_BITS:
        raise ValueError(f"stat_bits must be one of {STAT_BITS}, got {stat_bits}")
    x = x.float()
    low, high = _group_range(x, group, axis)
    levels = (1 << bits) - 1
    if stat_bits == 16:
        scale = ((high - low) / levels).clamp_min(1e-8).to(torch.float16)
        low = low.to(torch.float16)
        out = {"scale": scale, "min": low}
    else:
        low_codes, low_range = _stat_codes(low, log=False, up=False)
        low = _stat_values(low_codes, low_range, log=False)
        scale_codes, scale_range = _stat_codes(((high - low) / levels).clamp_min(1e-8), log=True, up=True)
        scale = _stat_values(scale_codes, scale_range, log=True)
        out = {"scale": scale_codes, "min": low_codes, "scale.range": scale_range, "min.range": low_range}
    per_scale, per_low = _expand(scale, group, axis, x.shape), _expand(low, group, axis, x.shape)
    codes = torch.round((x - per_low) / per_scale).clamp_(0, levels).to(torch.uint8)  # (T, L, Hkv, hd)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (T, L, Hkv, hd/2)
    return {"codes": codes, **out}


def statistics(q: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales and minimums of quantized tensors as float32, whether stored in 16 or 8 bits."""
    if "scale.range" not in q:
        return q["scale"].float(), q["min"].float()
    return _stat_values(q["scale"], q["scale.range"], log=True), _stat_values(q["min"], q["min.range"], log=False)


def dequantize(q: dict[str, torch.Tensor], bits: int, group: int, axis: str, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The tensor `quantize` was given, to within half a quantization step per element.
    Scales are broadcast over their groups, never expanded (this runs at every read)."""
    t, layers, heads, hd = shape
    codes = q["codes"]
    if bits == 4:
        codes = torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2)  # (T, L, Hkv, hd)
    x = codes.to(torch.float32)
    scale, low = statistics(q)
    if axis == "tokens":  # scale, low: (G, L, Hkv, hd); the last group may be shorter
        full = (t // group) * group
        head = x[:full].view(-1, group, layers, heads, hd)
        head.mul_(scale[: full // group, None]).add_(low[: full // group, None])
        if full < t:
            x[full:].mul_(scale[-1]).add_(low[-1])
        return x.to(dtype)
    grouped = x.view(t, layers, heads * hd // group, group)  # scale, low: (T, L, groups)
    grouped.mul_(scale[..., None]).add_(low[..., None])
    return x.to(dtype)


def dequantize_rows(q: dict[str, torch.Tensor], bits: int, group: int, rows: torch.Tensor,
                    dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Keys (`axis="tokens"`) of some rows of a block: `q` holds those rows' codes and the
    block's whole scales and minimums (G, L, Hkv, hd); the same values `dequantize` gives them."""
    codes = q["codes"]
    if bits == 4:
        codes = torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2)
    which = rows // group  # each row's group
    scale, low = statistics(q)
    return (codes.to(torch.float32) * scale[which] + low[which]).to(dtype)


def _stat_codes(stat: torch.Tensor, log: bool, up: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of a statistic (layer on dim 1), uniform over each layer's range (of its log
    for scales), rounded up or down; and the ranges, (L, 2) float16, widened to cover it."""
    y = stat.log() if log else stat
    dims = [d for d in range(y.dim()) if d != 1]
    inf = torch.tensor(float("inf"), dtype=torch.float16)
    lowest, highest = y.amin(dim=dims), y.amax(dim=dims)
    low, high = lowest.to(torch.float16), highest.to(torch.float16)
    low = torch.where(low.float() > lowest, torch.nextafter(low, -inf), low)  # float16 rounded inwards
    high = torch.where(high.float() < highest, torch.nextafter(high, inf), high)
    ranges = torch.stack((low, high), dim=1)  # (L, 2)
    at, step = _stat_grid(ranges, y.dim())
    position = (y - at) / step
    codes = (position - 1e-4).ceil() if up else (position + 1e-4).floor()
    return codes.clamp_(0, 255).to(torch.uint8), ranges


def _stat_values(codes: torch.Tensor, ranges: torch.Tensor, log: bool) -> torch.Tensor:
    at, step = _stat_grid(ranges, codes.dim())
    y = at + codes.float() * step
    return y.exp() if log else y


def _stat_grid(ranges: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's lowest value and step, shaped to broadcast over a statistic (layer on dim 1)."""
    shape = [1, -1] + [1] * (dims - 2)
    low, high = ranges[:, 0].float().view(shape), ranges[:, 1].float().view(shape)
    return low, ((high - low) / 255).clamp_min(1e-12)


def _group_range(x: torch.Tensor, group: int, axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    t, layers, heads, hd = x.shape
    if axis == "tokens":
        pad = (-t) % group  # the last token repeated: it changes no minimum or maximum
        if pad:
            x = torch.cat((x, x[-1:].expand(pad, layers, heads, hd)))
        grouped = x.reshape(-1, group, layers, heads, hd)  # (G, group, L, Hkv, hd)
        return grouped.amin(dim=1), grouped.amax(dim=1)  # (G, L, Hkv, hd)
    if axis == "channels":
        if (heads * hd) % group:
            raise ValueError(f"a layer's {heads * hd} channels are not a multiple of the group {group}")
        grouped = x.reshape(t, layers, heads * hd // group, group)
        return grouped.amin(dim=-1), grouped.amax(dim=-1)  # (T, L, groups)
    raise ValueError(f"axis must be 'tokens' or 'channels', got {axis!r}")


def _expand(stat: torch.Tensor, group: int, axis: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A group statistic repeated over its group: (T, L, Hkv, hd), float32."""
    t, layers, heads, hd = shape
    stat = stat.float()
    if axis == "tokens":
        return stat.repeat_interleave(group, dim=0)[:t]
    return stat.repeat_interleave(group, dim=-1).reshape(t, layers, heads, hd)


def stored_bytes(q: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in q.values())
