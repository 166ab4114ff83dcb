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
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..errors import ModelError
from .lookup import Drafts
from .pool import Pool
from .sampling import pick

ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention"})
PROBE_TOKENS = 12  # tokens of the load-time check (see `check`)
PROBE_SHIFT = 37  # positions the check moves them by
DRAFT_TOKENS = 5  # most tokens a looked-up draft proposes at once (lookup.py)


@dataclass(frozen=True)
class Prefilled:
    """A cache holding a context and a prompt after it, and the logits that follow: where
    generation continues (MemoryModel.judge)."""

    cache: DynamicCache
    logits: torch.Tensor  # (V,)


@dataclass(frozen=True)
class Layout:
    """How each layer places a token: by a rotary embedding (of which layer type, for models
    with one per type), or not at all (layers without positions store keys as they are)."""

    rope: tuple[str | None, ...]  # per layer: "" rotary, a layer type's rotary, or None (no positions)

    def groups(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, kind in enumerate(self.rope):
            if kind is not None:
                out.setdefault(kind, []).append(i)
        return out

    def to_json(self) -> list:
        return list(self.rope)

    @classmethod
    def from_json(cls, data: list) -> Layout:
        return cls(tuple(data))


class GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values live in a buffer with room to grow: appending a
    token writes it in place, where transformers' DynamicLayer copies the whole layer
    (torch.cat) for every generated token (a third of the decode time of the embedded model
    at 1,100 tokens of memory)."""

    def __init__(self, room: int = 0) -> None:
        super().__init__()
        self.room = room
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._keys is None or end > self._keys.shape[-2]:
            self._keys = self._grow(self._keys, key_states, end + self.room)
            self._values = self._grow(self._values, value_states, end + self.room)
        self._keys[..., self.length : end, :] = key_states
        self._values[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values

    def _grow(self, old: torch.Tensor | None, new: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
        if old is not None:
            buffer[..., : self.length, :] = old[..., : self.length, :]
        return buffer

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.length = self.get_seq_length()


class MemoryModel:
    """Wraps a Hugging Face causal LM to read from and write to a token pool.

    Per-layer differences are honoured, not assumed away: each layer's keys are un-rotated
    with that layer's rotary embedding (partial rotary rotates only its part, through the
    model's own `apply_rotary_pos_emb`), layers without positions store keys as they are,
    and sliding-window layers see what they would see in a prompt. Which layers rotate is
    measured at load (`check`): a model whose keys cannot be moved exactly is refused.
    """

    def __init__(self, model, *, device: str | torch.device = "cpu", layout: Layout | None = None) -> None:
        config = model.config.get_text_config(decoder=True)
        inner = getattr(model, "base_model", None)
        rotary = getattr(inner, "rotary_emb", None)
        layers = getattr(inner, "layers", None) or getattr(inner, "h", None)
        module = sys.modules.get(type(model).__module__)
        apply = getattr(module, "apply_rotary_pos_emb", None)
        if rotary is None or layers is None or apply is None:
            raise ModelError(
                f"{config.model_type} is not a decoder-only model with rotary positions",
                hint="see docs/models.md for the families memllm reads exactly",
            )
        if getattr(config, "kv_lora_rank", None):
            raise ModelError(
                f"{config.model_type} uses multi-head latent attention: its cache holds compressed keys and "
                "values, not per-head tokens memllm can move",
                hint="see docs/models.md for the families memllm reads exactly",
            )
        types = list(getattr(config, "layer_types", None) or [])
        if odd := sorted(set(types) - ATTENTION_LAYERS):
            raise ModelError(
                f"{config.model_type} has layers that are not attention ({', '.join(odd)}): "
                "their state is not a set of tokens a pool can hold",
                hint="see docs/models.md for the families memllm reads exactly",
            )
        self.model = model.eval()
        self.device = torch.device(device)
        self.config = config
        self.layers = config.num_hidden_layers
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.dtype = next(model.parameters()).dtype
        self.layer_types = types or ["full_attention"] * self.layers
        window = getattr(config, "sliding_window", None)
        if not types and window and getattr(config, "use_sliding_window", True):
            self.layer_types = ["sliding_attention"] * self.layers  # Mistral-style: every layer slides
        self.max_positions = self._positions(config, rotary)
        # the window of the sliding layers (None: every layer sees the whole context)
        sliding = window and "sliding_attention" in self.layer_types and window < self.max_positions
        self.sliding_window = window if sliding else None
        self._rotary = rotary
        self._apply = apply
        self._split: bool | None = None  # measured on first use (_turn_group)
        # rotary modules with one embedding per layer type (Gemma 3: local and global)
        self._typed = "layer_type" in inspect.signature(rotary.forward).parameters and \
            bool(getattr(rotary, "layer_types", None))
        # transformers 5.2x renamed `past_key_values` to `cache`; accept both.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.check_error: float | None = None  # relative logit error the load-time check measured
        self._measure_heads()
        if layout is not None and len(layout.rope) != self.layers:
            layout = None  # a record of another shape: measure again
        self.layout = layout or Layout(tuple(self._rope_kind(i) for i in range(self.layers)))
        if layout is None:
            self.layout = self.check()

    def _measure_heads(self) -> None:
        """Key/value heads and head size as the model's own attention writes them to its cache
        (one token through the model): configs carry keys their model ignores (a GPT-NeoX
        config with num_key_value_heads), so they are read from the config only as a first guess."""
        try:
            with torch.inference_mode():
                cache = self._cache(None, room=1)
                self._run(torch.zeros(1, dtype=torch.int64), cache, logits_to_keep=1, start=0)
            shapes = {(tuple(layer.keys.shape[1::2]), tuple(layer.values.shape[1::2])) for layer in cache.layers}
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as err:
            raise ModelError(f"{self.config.model_type}: memllm cannot read this model's memory: {_first(err)}",
                             hint="see docs/models.md for the families memllm reads exactly") from None
        if len(shapes) != 1 or len(cache.layers) != self.layers:
            raise ModelError(
                f"{self.config.model_type}: its layers cache keys and values of different shapes "
                f"({', '.join(sorted(str(s) for s in shapes))}): a pool needs one shape in every layer",
                hint="see docs/models.md for the families memllm reads exactly")
        (kv_heads, head_dim), (value_heads, value_dim) = next(iter(shapes))
        if (kv_heads, head_dim) != (value_heads, value_dim):
            raise ModelError(f"{self.config.model_type}: its keys ({kv_heads} heads of {head_dim}) and values "
                             f"({value_heads} of {value_dim}) differ in shape: a pool holds both alike",
                             hint="see docs/models.md for the families memllm reads exactly")
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def weight_bytes(self) -> int:
        """RAM (or GPU memory) the model's parameters and buffers take."""
        return sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))

    @staticmethod
    def _positions(config, rotary) -> int:
        """The positions a context may use: the model's window, or, for RoPE variants whose
        frequencies change with the length (dynamic, longrope), the length they were trained
        at, beyond which keys written earlier would have been rotated differently."""
        positions = getattr(config, "max_position_embeddings", None) or 2048
        kinds = rotary.rope_type if isinstance(getattr(rotary, "rope_type", None), dict) else \
            {"": getattr(rotary, "rope_type", "default")}
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        for kind, rope_type in kinds.items():
            if rope_type in ("dynamic", "longrope"):
                own = params.get(kind, params) if kind else params
                original = (own or {}).get("original_max_position_embeddings") or \
                    getattr(config, "original_max_position_embeddings", None)
                positions = min(positions, original or positions)
        return positions

    @property
    def pool_window(self) -> int:
        """Positions a pool, question and answer may use: the model's window, or where every
        layer slides (Mistral 7B v0.1, Phi-3 mini), that window, so every layer sees the pool."""
        if self.sliding_window and all(t == "sliding_attention" for t in self.layer_types):
            return self.sliding_window
        return self.max_positions

    def _rope_kind(self, layer: int) -> str:
        return self.layer_types[layer] if self._typed else ""

    # -- positions -------------------------------------------------------------------

    def _cos_sin(self, kind: str, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, start + count, device=self.device)[None]  # (1, m)
        probe = torch.empty(0, dtype=torch.float32, device=self.device)
        args = (kind,) if self._typed else ()
        cos, sin = self._rotary(probe, positions, *args)  # (1, m, rd) each; rd < hd for partial rotary
        return cos.float(), sin.float()

    def _turn_group(self, keys: torch.Tensor, kind: str, start: int, inverse: bool) -> torch.Tensor:
        cos, sin = self._cos_sin(kind, start, keys.shape[-2])
        if inverse:  # rotate back by the same angle; divide by the scale some variants apply
            norm = cos * cos + sin * sin
            cos, sin = cos / norm, -sin / norm
        shape = keys.shape
        keys = keys.reshape(-1, *shape[-3:]) if keys.dim() != 4 else keys  # (B, Hkv, m, hd), as attention has them
        rd = cos.shape[-1]
        if self._split is None:  # does the model's apply_rotary_pos_emb take whole heads, or only their rotary part?
            try:
                self._apply(keys, keys, cos, sin)
                self._split = False
            except RuntimeError:
                self._split = rd < keys.shape[-1]
                if not self._split:
                    raise
        if self._split:  # partial rotary applied by the attention itself (Phi-2, StableLM): the first rd dims
            turned = torch.cat([self._apply(keys[..., :rd], keys[..., :rd], cos, sin)[1], keys[..., rd:]], dim=-1)
        else:
            turned = self._apply(keys, keys, cos, sin)[1]
        return turned.reshape(shape)  # (..., m, hd)

    def _turn(self, keys: torch.Tensor, start: int, inverse: bool) -> torch.Tensor:
        groups = self.layout.groups()
        if len(groups) == 1 and len(next(iter(groups.values()))) == self.layers:
            return self._turn_group(keys, next(iter(groups)), start, inverse)
        out = keys.clone()
        for kind, layers in groups.items():
            index = torch.tensor(layers, device=keys.device)
            out[index] = self._turn_group(keys[index], kind, start, inverse).to(out.dtype)
        return out

    def rotate(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Place pre-rotary keys (L, Hkv, m, hd) at positions start.. in every layer that has positions."""
        return self._turn(keys, start, inverse=False)

    def unrotate(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Invert `rotate`."""
        return self._turn(keys, start, inverse=True)

    # -- the load-time check ----------------------------------------------------------------

    @torch.inference_mode()
    def check(self) -> Layout:
        """Measure which layers rotate, then check that a chunk written at one position and read
        at another gives the plain model's logits for that chunk in the prompt. Refuses the model
        (ModelError) when it does not: a memory that reads wrong keys gives plausible wrong answers."""
        count = min(PROBE_TOKENS, (self.sliding_window or PROBE_TOKENS) // 2 or 1)
        shift = min(PROBE_SHIFT, self.max_positions - 2 * count)
        ids = torch.randint(0, self.config.vocab_size, (2 * count,), generator=torch.Generator().manual_seed(0))
        chunk, question = ids[:count], ids[count:]
        try:
            here, _ = self._write(chunk, None, 0)  # as the cache holds them: rotated where rotary
            there, _ = self._write(chunk, None, shift)
            rope = []
            for i in range(self.layers):
                kind = self._rope_kind(i)
                moved = _error(self._turn_group(there[i], kind, shift, True), self._turn_group(here[i], kind, 0, True))
                rope.append(kind if moved <= _error(there[i], here[i]) else None)
            self.layout = Layout(tuple(rope))
            stored = self.encode(chunk, start=shift)
            in_prompt = self.model(ids.to(self.device)[None]).logits[0, count:]  # (count, V)
            error = _error(self.forward(question, stored), in_prompt)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ModelError(f"{self.config.model_type}: memllm cannot read this model's memory: {_first(err)}",
                             hint="see docs/models.md for the families memllm reads exactly") from None
        self.check_error = error
        if error > self.tolerance:
            raise ModelError(
                f"{self.config.model_type}: a chunk read from memory gives logits {error:.2g} away from the same "
                "chunk in the prompt (relative); memllm refuses a memory it would read wrong",
                hint="see docs/models.md for the families memllm reads exactly",
            )
        return self.layout

    @property
    def tolerance(self) -> float:
        """Relative logit error the load-time check allows: float32 agrees to ~1e-6."""
        return 1e-3 if self.dtype == torch.float32 else 0.05

    # -- the forward pass ----------------------------------------------------------------

    def _cache(self, context: Pool | None, room: int = 0) -> DynamicCache:
        """A KV cache holding `context` at positions 0..m-1 in every layer, with room for
        `room` more tokens per layer before it has to grow."""
        cache = DynamicCache()
        cache.layers = [GrowingLayer(room) for _ in range(self.layers)]
        cache.layer_class_to_replicate = None
        if context is None or len(context) == 0:
            return cache
        keys = self.rotate(context.keys.to(self.device, torch.float32), 0).to(self.dtype)  # (L, Hkv, m, hd)
        values = context.values.to(self.device, self.dtype)  # (L, Hkv, m, hd)
        for i, layer in enumerate(cache.layers):
            layer.update(keys[i][None], values[i][None])
        return cache

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
    def loglik(self, ids: torch.Tensor, context: Pool | None, start: int, end: int) -> float:
        """The log-likelihood of ids[start:end] (1 <= start < end <= T) read after `context`
        and ids[:start]: how well a context predicts a text."""
        self._check_length(context, len(ids))
        rows = self._run(ids, self._cache(context), logits_to_keep=len(ids) - start + 1)  # predict ids[start:]
        logp = rows[: end - start].float().log_softmax(-1)
        return float(logp.gather(1, ids[start:end, None].to(logp.device)).sum())

    @torch.inference_mode()
    def judge(self, ids: torch.Tensor, contexts: Sequence[Pool], start: int, end: int
              ) -> tuple[list[float], Callable[[int, int], Prefilled]]:
        """Read ids (T,) after each of `contexts` in one batched forward pass: the
        log-likelihood of ids[start:end] after each (as `loglik`), and a function that gives,
        for the context chosen, the cache and logits to generate from (`generate(prefilled=)`),
        so the chosen context's prompt is not run twice.

        Contexts of different lengths are left-padded with masked slots; each context's
        tokens sit at positions 0..m_i-1 and ids right after them, so every row computes
        what `loglik` computes alone."""
        lengths = [len(c) for c in contexts]
        m, T, K = max(lengths), len(ids), len(contexts)
        self._check_length(None, m + T)
        keys = torch.zeros(self.layers, K, self.kv_heads, m, self.head_dim, dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        mask = torch.ones(K, m + T, dtype=torch.long, device=self.device)
        for r, context in enumerate(contexts):
            pad = m - lengths[r]
            keys[:, r, :, pad:] = self.rotate(context.keys.to(self.device, torch.float32), 0).to(self.dtype)
            values[:, r, :, pad:] = context.values.to(self.device, self.dtype)
            mask[r, :pad] = 0
        cache = self._cache(None, room=T)
        for i, layer in enumerate(cache.layers):
            layer.update(keys[i], values[i])
        positions = torch.stack([torch.arange(n, n + T) for n in lengths]).to(self.device)  # (K, T)
        out = self.model(input_ids=ids.to(self.device)[None].expand(K, T), attention_mask=mask,
                         position_ids=positions, use_cache=True, logits_to_keep=T - start + 1,
                         **{self._cache_kw: cache})
        logp = out.logits[:, : end - start].float().log_softmax(-1)  # (K, end - start, V)
        target = ids[start:end].to(self.device)[None, :, None].expand(K, -1, 1)
        fits = logp.gather(2, target).sum((1, 2)).tolist()
        last = out.logits[:, -1]  # (K, V): the next token's logits after ids, per context

        def resume(r: int, max_new_tokens: int) -> Prefilled:
            chosen = self._cache(None, room=max_new_tokens + DRAFT_TOKENS)
            pad = m - lengths[r]
            for mine, batched in zip(chosen.layers, cache.layers, strict=True):
                mine.update(batched.keys[r : r + 1, :, pad:], batched.values[r : r + 1, :, pad:])
            return Prefilled(chosen, last[r])

        return fits, resume

    def _write(self, ids: torch.Tensor, context: Pool | None, start: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over ids (T,) after `context`: the chunk's keys (as the cache holds them)
        and values in every layer, (L, Hkv, T, hd) each."""
        m = len(context) if context is not None else 0
        start = m if start is None else start
        self._check_length(None, start + len(ids))
        cache = self._cache(context, room=len(ids))
        self._run(ids, cache, logits_to_keep=1, start=start)  # logits unused; the cache now holds m + T tokens
        keys = torch.stack([layer.keys[0, :, m:] for layer in cache.layers])  # (L, Hkv, T, hd)
        values = torch.stack([layer.values[0, :, m:] for layer in cache.layers])  # (L, Hkv, T, hd)
        return keys.float(), values.float()

    @torch.inference_mode()
    def encode(self, ids: torch.Tensor, context: Pool | None = None, start: int | None = None) -> Pool:
        """Write: one forward over ids (T,) after `context`; the chunk's pre-rotary K/V in every layer.

        The chunk sits at positions m..m+T-1 right after the context, unless `start` places
        it elsewhere (the load-time check, and the experiments in benchmarks/).
        """
        m = len(context) if context is not None else 0
        keys, values = self._write(ids, context, start)
        return Pool(self.unrotate(keys, m if start is None else start), values)

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
        draft_from: Sequence[list[int]] = (),
        lookup: bool = True,
        prefilled: Prefilled | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids one at a time: greedy when temperature is 0.

        Greedy decoding checks tokens looked up in the input, the answer so far and
        `draft_from` (token ids of the notes the answer reads) several at a time
        (lookup.py): the tokens are the ones plain greedy decoding picks, in fewer forward
        passes. `lookup=False` decodes one token a forward pass. `prefilled`: the cache
        already holds `context` and `ids` (`judge`), and generation starts from its logits."""
        self._check_length(context, len(ids) + max_new_tokens)
        if prefilled is not None:
            cache, logits = prefilled.cache, prefilled.logits
        else:
            cache = self._cache(context, room=len(ids) + max_new_tokens + DRAFT_TOKENS)
            logits = self._run(ids, cache, logits_to_keep=1)[-1]  # (V,)
        if temperature <= 0 and lookup:
            yield from self._lookup_greedy(logits, cache, ids, max_new_tokens, stop_ids, draft_from)
            return
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for _ in range(max_new_tokens):
            token = pick(logits.float(), temperature, top_p, top_k, generator)
            if token in stop_ids:
                return
            yield token
            logits = self._run(torch.tensor([token]), cache, logits_to_keep=1)[-1]  # (V,)

    def _lookup_greedy(self, logits, cache, ids, max_new_tokens, stop_ids, draft_from) -> Iterator[int]:
        drafts = Drafts([*draft_from, ids.tolist()], longest=DRAFT_TOKENS)
        token = int(logits.argmax())
        left = max_new_tokens
        while left > 0 and token not in stop_ids:
            yield token
            left -= 1
            if left == 0:
                return
            drafts.extend([token])
            proposal = drafts.propose(left - 1)  # (k,)
            rows = self._run(torch.tensor([token, *proposal]), cache, logits_to_keep=len(proposal) + 1)
            picks = rows.argmax(-1).tolist()  # picks[i]: the greedy token after proposal[:i]
            kept = 0
            while kept < len(proposal) and picks[kept] == proposal[kept] and proposal[kept] not in stop_ids:
                yield proposal[kept]
                kept += 1
                left -= 1
            if kept < len(proposal):
                cache.crop(kept - len(proposal))  # the proposal's unchecked tail leaves the cache
            drafts.extend(proposal[:kept])
            token = picks[kept]


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference of two tensors (Frobenius)."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _first(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
