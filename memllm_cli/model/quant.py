"""Quantized keys and values (KIVI-style), for compact blocks.

KIVI (Liu et al., 2024) found that a KV cache's keys have outlier *channels* and its values
outlier *tokens*: so keys are quantized per channel (over groups of tokens) and values per
token (over groups of channels), each group with its own scale and minimum (asymmetric
uniform quantization). Codes are unsigned 8- or 4-bit integers; 4-bit codes are packed two
a byte. Everything is a plain tensor, so a quantized block is still one safetensors file.

Shapes follow blocks: token-major (T, L, Hkv, hd).
"""

from __future__ import annotations

import torch

BITS = (8, 4)


def quantize(x: torch.Tensor, bits: int, group: int, axis: str) -> dict[str, torch.Tensor]:
    """Codes, scales and minimums of `x` (T, L, Hkv, hd): per channel over groups of `group`
    tokens (`axis="tokens"`, keys), or per token over groups of `group` channels
    (`axis="channels"`, values)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    t, layers, heads, hd = x.shape
    grouped = _groups(x.float(), group, axis)  # (..., groups, group) with the grouped axis last
    low = grouped.amin(dim=-1, keepdim=True)
    high = grouped.amax(dim=-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((high - low) / levels).clamp_min(1e-8)
    codes = torch.round((grouped - low) / scale).clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return {"codes": codes, "scale": scale.to(torch.float16), "min": low.to(torch.float16)}


def dequantize(q: dict[str, torch.Tensor], bits: int, group: int, axis: str, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The tensor `quantize` was given, to within half a quantization step per element."""
    codes = q["codes"]
    if bits == 4:
        low_nibble, high_nibble = codes & 0x0F, codes >> 4
        codes = torch.stack((low_nibble, high_nibble), dim=-1).flatten(-2)
    grouped = codes.float() * q["scale"].float() + q["min"].float()
    return _ungroup(grouped, group, axis, shape).to(dtype)


def _groups(x: torch.Tensor, group: int, axis: str) -> torch.Tensor:
    t, layers, heads, hd = x.shape
    if axis == "tokens":  # per channel: groups of tokens, padded with the last token
        pad = (-t) % group
        if pad:
            x = torch.cat((x, x[-1:].expand(pad, layers, heads, hd)))
        return x.reshape(-1, group, layers, heads, hd).permute(0, 2, 3, 4, 1)  # (G, L, Hkv, hd, group)
    if axis == "channels":  # per token: groups of channels
        if hd % group:
            raise ValueError(f"the head dim {hd} is not a multiple of the group {group}")
        return x.reshape(t, layers, heads, hd // group, group)
    raise ValueError(f"axis must be 'tokens' or 'channels', got {axis!r}")


def _ungroup(grouped: torch.Tensor, group: int, axis: str, shape: tuple[int, ...]) -> torch.Tensor:
    t, layers, heads, hd = shape
    if axis == "tokens":
        return grouped.permute(0, 4, 1, 2, 3).reshape(-1, layers, heads, hd)[:t]
    return grouped.reshape(t, layers, heads, hd)


def stored_bytes(q: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in q.values())
