"""The memory-augmented forward pass for any Hugging Face decoder-only model (training-free).

A memory is a pool of tokens; per layer, each token is stored as its *pre-rotary* key and
its value. Reading presents the stored tokens to every layer as a key/value prefix, with
rotary positions assigned at read time; writing runs one forward pass over a chunk after a
context of stored tokens and captures the chunk's keys and values in every layer.

Legend for the shape comments:
    L    decoder layers                 Hkv  key/value heads        hd  head dim
    n    tokens in a pool               m    tokens in a read/write context
    T    tokens of the input            V    vocabulary size

Why pre-rotary keys: RoPE rotates a key by its position, and a memory token's position
changes every time tokens before it are dropped. Storing un-rotated keys lets us assign
positions at read time with one elementwise rotation per token, and costs no projection
(against the layer-input hidden state, which would need norm + k/v projections per read).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
from transformers import DynamicCache

from ..errors import ModelError
from .pool import Pool
from .sampling import pick


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)



class MemoryModel:
    """Wraps a Hugging Face causal LM to read from and write to a token pool."""

    def __init__(self, model, *, device: str | torch.device = "cpu") -> None:
        config = model.config.get_text_config(decoder=True)
        inner = getattr(model, "model", None)
        rotary = getattr(inner, "rotary_emb", None)
        if rotary is None or not hasattr(inner, "layers"):
            raise ModelError(
                f"{type(model).__name__} is not a decoder-only model with rotary positions",
                hint="use a Llama, Mistral, Qwen2 or similar model",
            )
        if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
            raise ModelError(
                f"{config.model_type} rotates only part of each head (partial_rotary_factor "
                f"{config.partial_rotary_factor}); memllm needs fully rotary heads"
            )
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            # A sliding window would hide most of the pool from every layer.
            raise ModelError(
                f"{config.model_type} uses sliding-window attention ({config.sliding_window} tokens)",
                hint="set sliding_window to null in the model's config.json",
            )
        self.model = model.eval()
        self.device = torch.device(device)
        self.config = config
        self.layers = config.num_hidden_layers
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.max_positions = getattr(config, "max_position_embeddings", None) or 2048
        self.dtype = next(model.parameters()).dtype
        self._rotary = rotary
        # transformers 5.2x renamed `past_key_values` to `cache`; accept both.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # -- positions -------------------------------------------------------------------

    def _cos_sin(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, start + count, device=self.device)[None]  # (1, m)
        probe = torch.empty(0, dtype=torch.float32, device=self.device)
        cos, sin = self._rotary(probe, positions)  # (1, m, hd) each
        return cos[0], sin[0]  # (m, hd)

    def rotate(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Apply RoPE for positions start.. to pre-rotary keys (..., m, hd)."""
        cos, sin = self._cos_sin(start, keys.shape[-2])
        return keys * cos + rotate_half(keys) * sin  # (..., m, hd)

    def unrotate(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Invert `rotate`. Divides by cos^2 + sin^2, which is 1 unless the RoPE variant scales."""
        cos, sin = self._cos_sin(start, keys.shape[-2])
        return (keys * cos - rotate_half(keys) * sin) / (cos * cos + sin * sin)  # (..., m, hd)

    # -- the forward pass ----------------------------------------------------------------

    def _cache(self, context: Pool | None) -> DynamicCache:
        """A KV cache holding `context` at positions 0..m-1 in every layer."""
        if context is None or len(context) == 0:
            return DynamicCache()
        keys = self.rotate(context.keys.to(self.device, torch.float32), 0).to(self.dtype)  # (L, Hkv, m, hd)
        values = context.values.to(self.device, self.dtype)  # (L, Hkv, m, hd)
        return DynamicCache([(keys[i][None], values[i][None]) for i in range(self.layers)])

    def _run(
        self, ids: torch.Tensor, cache: DynamicCache, logits_to_keep: int = 0, start: int | None = None
    ) -> torch.Tensor:
        extra = {}
        if start is not None:  # rotary positions other than "right after the cache"
            extra["position_ids"] = torch.arange(start, start + len(ids), device=self.device)[None]
        out = self.model(
            input_ids=ids.to(self.device)[None],  # (1, T)
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_kw: cache},
            **extra,
        )
        return out.logits[0]  # (T or logits_to_keep, V)

    def _check_length(self, context: Pool | None, extra: int) -> None:
        total = (len(context) if context is not None else 0) + extra
        if total > self.max_positions:
            raise ModelError(
                f"{total} tokens of memory and input exceed the model's window of {self.max_positions}",
                hint="use a smaller pool or a shorter question",
            )

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, context: Pool | None = None) -> torch.Tensor:
        """Logits (T, V) for token ids (T,) read after `context` (the memory prefix)."""
        self._check_length(context, len(ids))
        return self._run(ids, self._cache(context)).float()

    @torch.inference_mode()
    def encode(self, ids: torch.Tensor, context: Pool | None = None, start: int | None = None) -> Pool:
        """Write: one forward over ids (T,) after `context`; the chunk's pre-rotary K/V in every layer.

        The chunk sits at positions m..m+T-1 right after the context, unless `start` places
        it elsewhere (used by the experiments in benchmarks/, not by memllm itself).
        """
        m = len(context) if context is not None else 0
        start = m if start is None else start
        self._check_length(None, start + len(ids))
        cache = self._cache(context)
        self._run(ids, cache, logits_to_keep=1, start=start)  # logits unused; the cache now holds m + T tokens
        keys = torch.stack([layer.keys[0, :, m:] for layer in cache.layers])  # (L, Hkv, T, hd)
        values = torch.stack([layer.values[0, :, m:] for layer in cache.layers])  # (L, Hkv, T, hd)
        return Pool(self.unrotate(keys.float(), start), values.float())

    @torch.inference_mode()
    def generate(
        self,
        ids: torch.Tensor,
        context: Pool | None = None,
        *,
        max_new_tokens: int = 128,
        stop_ids: frozenset[int] = frozenset(),
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids one at a time: greedy when temperature is 0."""
        self._check_length(context, len(ids) + max_new_tokens)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        cache = self._cache(context)
        logits = self._run(ids, cache, logits_to_keep=1)[-1]  # (V,)
        for _ in range(max_new_tokens):
            token = pick(logits.float(), temperature, top_p, top_k, generator)
            if token in stop_ids:
                return
            yield token
            logits = self._run(torch.tensor([token]), cache, logits_to_keep=1)[-1]  # (V,)
