"""Choosing the next token: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

import torch


def pick(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature  # (V,)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        outside = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))

