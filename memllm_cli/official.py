"""The trained MemoryLLM checkpoints (Wang et al., ICML 2024), computed as the official code does.

Plain torch over the checkpoint's own tensors (Hugging Face names, peft LoRA names), so no
remote code runs. Two branches of the official repository are covered:
    "main"  MemoryLLM-8B / 8B-chat: rope_theta (+ linear scaling), LoRA adapters, per-layer drops
    "7b"    MemoryLLM-7B: RoPE base 10000 with position interpolation, shared drops, no LoRA
See ../shared/conformance/README.md for the algorithm this file follows line by line.

Legend for the shape comments:
    L  layers   N  memory rows per layer   K  rows written per injection   d  hidden size
    S  rows a layer receives               P  prefix rows (bos + memory)    T  input tokens
    H  query heads   Hkv  key/value heads  hd head dim                     V  vocabulary
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from .errors import ModelError

ENCODER, DECODER = "default", "decoder_adapter"  # peft adapter names: writing, reading


@dataclass
class Config:
    variant: str  # "main" or "7b"
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    num_tokens: int  # K
    num_blocks: int
    add_bos: bool
    per_layer_drop: bool
    decoder_lora: bool
    lora_scale: float
    rope_base: float
    rope_scale: float  # positions are multiplied by this before the angles
    raw: dict | None = None  # the whole config.json, for variant-specific fields (M+)

    @classmethod
    def from_dict(cls, c: dict) -> Config:
        variant = "mplus" if "num_ltm_blocks" in c else "main" if "drop_memory_per_layer" in c else "7b"
        if variant == "mplus" and c.get("update_ltm_mode", "immediate") != "immediate":
            raise ModelError(f"M+ update_ltm_mode {c['update_ltm_mode']!r} is not supported (the official one crashes)")
        heads = c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads") or heads
        lora = c.get("lora_config") or {}
        if variant == "7b":
            if kv_heads != heads:
                raise ModelError("a MemoryLLM-7B checkpoint must have num_key_value_heads == num_attention_heads")
            base, scale = 10000.0, 1.0  # the 7B code ignores rope_theta
            if c.get("interpolate_position_ids"):
                max_pos = c["max_position_embeddings"]
                scale = max_pos / max(max_pos, (c["num_blocks"] + 1) * c["num_tokens"])
        else:
            base, scale = float(c.get("rope_theta", 10000.0)), 1.0
            rope_scaling = c.get("rope_scaling")
            if rope_scaling:
                kind = rope_scaling.get("type") or rope_scaling.get("rope_type")
                if kind != "linear":
                    raise ModelError(f"rope_scaling type {kind!r} is not supported for MemoryLLM checkpoints")
                scale = 1.0 / float(rope_scaling["factor"])
        return cls(
            variant=variant, layers=c["num_hidden_layers"], hidden=c["hidden_size"], heads=heads,
            kv_heads=kv_heads, head_dim=c.get("head_dim") or c["hidden_size"] // heads, eps=c["rms_norm_eps"],
            num_tokens=c["num_tokens"], num_blocks=c["num_blocks"], add_bos=bool(c.get("add_bos_embedding")),
            per_layer_drop=bool(c.get("drop_memory_per_layer")), decoder_lora=bool(c.get("add_decoder_lora")),
            lora_scale=(lora["lora_alpha"] / lora["r"]) if lora else 0.0, rope_base=base, rope_scale=scale,
            raw=c,
        )


def estimate_bytes(files: list[Path], dtype: torch.dtype) -> int:
    """Bytes the checkpoint's tensors take once loaded in `dtype` (integer tensors keep theirs),
    read from the safetensors headers without loading any tensor."""
    size = torch.finfo(dtype).bits // 8
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                view = f.get_slice(key)
                count = math.prod(view.get_shape())
                total += count * (size if view.get_dtype() in ("F32", "F16", "BF16", "F64") else 8)
    return total


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class OfficialMemoryLLM:
    """A MemoryLLM checkpoint: forward, greedy generation, injection and the memory update."""

    def __init__(self, config: Config, tensors: dict[str, torch.Tensor]) -> None:
        self.c = config
        self.w = tensors
        self.memory = tensors["memory"].clone()  # (L, N, d)
        self.initialized = bool(int(tensors.get("initialized", torch.tensor(1))))
        self.bos = tensors.get("bos_embedding")  # (L, 1, d) or None
        self.new_memory_emb = tensors["new_memory_positional_emb"]  # (1, 1, d)
        hd = config.head_dim
        self.inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))  # (hd/2,)

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype = torch.float32) -> OfficialMemoryLLM:
        """Load config.json and every *.safetensors shard of a checkpoint directory, after
        checking that the tensors fit in the memory available for this dtype."""
        path = Path(path)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ModelError(f"cannot read {path / 'config.json'}: {err}") from None
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelError(
                f"no .safetensors files in {path}", hint="a checkpoint has config.json and safetensors shards"
            )
        parsed = Config.from_dict(config)
        need = estimate_bytes(files, dtype)
        available = available_bytes()
        if available is not None and need > 0.9 * available:
            raise ModelError(
                f"{path.name} needs about {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}, "
                f"but only {available / 2**30:.1f} GiB of memory is available",
                hint="choose a smaller dtype (bfloat16) or a machine with more memory",
            )
        tensors = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    tensors[key] = t.to(dtype) if t.is_floating_point() else t
        return (MPlus if parsed.variant == "mplus" else cls)(parsed, tensors)

    # -- building blocks ---------------------------------------------------------------

    def _linear(self, x: torch.Tensor, name: str, adapter: str) -> torch.Tensor:
        w = self.w
        if f"{name}.weight" in w:
            return x @ w[f"{name}.weight"].T
        y = x @ w[f"{name}.base_layer.weight"].T
        a = w.get(f"{name}.lora_A.{adapter}.weight")
        if a is not None:  # y = W x + (alpha / r) B (A x)
            y = y + self.c.lora_scale * ((x @ a.T) @ w[f"{name}.lora_B.{adapter}.weight"].T)
        return y

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.c.eps)).to(x.dtype) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (heads, S, hd) rotated at positions (S,)."""
        angles = (positions.float() * self.c.rope_scale)[:, None] * self.inv_freq[None]  # (S, hd/2)
        emb = torch.cat([angles, angles], dim=-1)  # (S, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _adapter(self, injection: bool) -> str:
        return ENCODER if injection or not self.c.decoder_lora else DECODER

    def _layer(
        self, i: int, s: torch.Tensor, prefix: int, positions: torch.Tensor, adapter: str,
        cache: list | None = None,
    ) -> torch.Tensor:
        """One decoder layer under the prefix rule: s (S, d) -> (S - P, d).

        Keys and values come from all S rows (and the cache, if any); queries from the last
        S - P rows; query i sees the prefix, the cache and rows up to its own."""
        c, p = self.c, f"model.layers.{i}"
        x = self._norm(s, self.w[f"{p}.input_layernorm.weight"])  # (S, d)
        q = self._linear(x[prefix:], f"{p}.self_attn.q_proj", adapter)  # (S-P, H*hd)
        k = self._linear(x, f"{p}.self_attn.k_proj", adapter)  # (S, Hkv*hd)
        v = self._linear(x, f"{p}.self_attn.v_proj", adapter)
        q = self._rope(q.view(-1, c.heads, c.head_dim).transpose(0, 1), positions[prefix:])  # (H, S-P, hd)
        k = self._rope(k.view(-1, c.kv_heads, c.head_dim).transpose(0, 1), positions)  # (Hkv, S, hd)
        v = v.view(-1, c.kv_heads, c.head_dim).transpose(0, 1)  # (Hkv, S, hd)
        past = 0
        if cache is not None:
            if len(cache) > i:
                past = cache[i][0].shape[1]
                k = torch.cat([cache[i][0], k], dim=1)  # (Hkv, past+S, hd)
                v = torch.cat([cache[i][1], v], dim=1)
                cache[i] = (k, v)
            else:
                cache.append((k, v))
        groups = c.heads // c.kv_heads
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)  # (H, past+S, hd)
        queries, keys = q.shape[1], k.shape[1]
        allowed = torch.arange(keys)[None, :] <= (past + prefix + torch.arange(queries))[:, None]  # (S-P, past+S)
        scores = (q @ k.transpose(1, 2)) / math.sqrt(c.head_dim)  # (H, S-P, past+S)
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v  # (H, S-P, hd)
        attn = attn.transpose(0, 1).reshape(queries, c.heads * c.head_dim)  # (S-P, H*hd)
        h = s[prefix:] + self._linear(attn, f"{p}.self_attn.o_proj", adapter)  # (S-P, d)
        x = self._norm(h, self.w[f"{p}.post_attention_layernorm.weight"])
        mlp = self._linear(
            F.silu(self._linear(x, f"{p}.mlp.gate_proj", adapter)) * self._linear(x, f"{p}.mlp.up_proj", adapter),
            f"{p}.mlp.down_proj", adapter,
        )
        return h + mlp  # (S-P, d)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._norm(h, self.w["model.norm.weight"]) @ self.w["lm_head.weight"].T  # (T, V)

    def _read_rows(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """The memory rows layer i reads in front of the input h (T, d): its whole pool."""
        return self.memory[i]  # (N, d)

    def _prefix(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        """[bos[i] | rows] if the checkpoint has bos embeddings."""
        return torch.cat([self.bos[i], rows]) if self.c.add_bos else rows

    # -- reading -----------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: list | None = None, start: int = 0) -> torch.Tensor:
        """Logits (T, V) for ids (T,). With a cache, `start` is the position of ids[0] and the
        memory is already in the cache (decode steps); without, every layer prepends its memory."""
        h = self.w["model.embed_tokens.weight"][ids]  # (T, d)
        adapter = self._adapter(False)
        for i in range(self.c.layers):
            if cache is not None and len(cache) > i:
                positions = torch.arange(start, start + len(ids))
                h = self._layer(i, h, 0, positions, adapter, cache)
            elif self.initialized:
                s = torch.cat([self._prefix(i, self._read_rows(i, h)), h])  # (P+T, d)
                prefix = s.shape[0] - h.shape[0]
                h = self._layer(i, s, prefix, torch.arange(s.shape[0]), adapter, cache)  # (T, d)
            else:
                h = self._layer(i, h, 0, torch.arange(len(ids)), adapter, cache)
        return self._logits(h)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens and the logits that chose each, with a KV cache of bos + memory + tokens."""
        cache: list = []
        logits = self.forward(ids, cache)[-1]  # (V,)
        tokens, steps = [], [logits]
        for _ in range(max_new_tokens):
            tokens.append(int(logits.argmax()))
            if len(tokens) == max_new_tokens:
                break
            length = cache[0][0].shape[1]
            logits = self.forward(torch.tensor([tokens[-1]]), cache, start=length)[-1]
            steps.append(logits)
        return tokens, torch.stack(steps)  # (n_new, V)

    # -- writing -----------------------------------------------------------------------

    @torch.inference_mode()
    def inject(self, ids: torch.Tensor) -> torch.Tensor:
        """The new memory rows a context writes: delta (L, K', d); K' = K once initialized."""
        c = self.c
        h = self.w["model.embed_tokens.weight"][ids]  # (T, d)
        adapter = self._adapter(True)
        emb = self.new_memory_emb[0]  # (1, d)
        deltas = []
        for i in range(c.layers):
            if self.initialized:
                tail = self.memory[i][-c.num_tokens:]  # (K, d): only the memory tail is read
                s = torch.cat([self._prefix(i, tail), h])  # (1+K+T, d)
                s = torch.cat([s[: -c.num_tokens], s[-c.num_tokens:] + emb])  # the last K rows get the vector
                prefix = (1 if c.add_bos else 0) + min(c.num_tokens, len(ids))
                out = self._layer(i, s, prefix, torch.arange(s.shape[0]), adapter)  # (max(T, K), d)
                deltas.append(out[-c.num_tokens:])
                h = out[-len(ids):]  # the next layer gets the context rows
            else:
                n = min(c.num_tokens, len(ids))
                s = torch.cat([h[:-n], h[-n:] + emb]) if c.variant == "main" else h
                out = self._layer(i, s, 0, torch.arange(len(ids)), adapter)  # (T, d)
                deltas.append(out[-n:])
                h = out
        if not self.initialized and c.variant == "main":
            # Official quirk: the delta of layer l is a view into layer l's output, to which layer
            # l+1 adds the positional vector in place; so every layer but the last carries it.
            deltas = [d + emb if i < c.layers - 1 else d for i, d in enumerate(deltas)]
        return torch.stack(deltas)  # (L, K', d)

    def update(self, delta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Write delta (L, n, d) into the memory; returns the kept indices ((keep,) or (L, keep)),
        or None for the first write, which tiles the delta over the whole pool."""
        c = self.c
        if not self.initialized:
            n, size = delta.shape[1], self.memory.shape[1]
            if n < size:
                copies = [delta] * (size // n) + ([delta[:, n - size % n:]] if size % n else [])
                self.memory = torch.cat(copies, dim=1)  # (L, N, d)
            else:
                self.memory = delta[:, -size:].clone()
            self.initialized = True
            return None
        size = self.memory.shape[1]
        drop = int(size * (1 / c.num_blocks))  # float64, as the official code (K-1 for some B)
        if delta.shape[1] != c.num_tokens:
            drop = delta.shape[1]
        keep = size - drop

        def kept_rows() -> torch.Tensor:
            return torch.randperm(size, generator=generator)[:keep].sort().values

        if c.per_layer_drop:
            kept = torch.stack([kept_rows() for _ in range(c.layers)])  # (L, keep)
            rows = [self.memory[i][kept[i]] for i in range(c.layers)]
        else:
            kept = kept_rows()  # (keep,)
            rows = [self.memory[i][kept] for i in range(c.layers)]
        self.memory = torch.stack([torch.cat([rows[i], delta[i]]) for i in range(c.layers)])  # (L, keep+n, d)
        return kept


class MPlus(OfficialMemoryLLM):
    """M+ (Wang et al., ICML 2025): MemoryLLM plus a long-term memory (LTM) per layer.

    Rows dropped from the short-term pool wait in a cache and are merged into the LTM every
    `update_ltm_frequency` updates; before each layer reads, a trained retriever scores the
    LTM rows against the input and places the R best in front of the short-term pool.
    State that the official code keeps outside the checkpoint (STM ages, the cache, the
    update step) starts empty after loading, as there.
    """

    def __init__(self, config: Config, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(config, tensors)
        raw = config.raw
        k = config.num_tokens
        self.retrieve_count = raw["num_ltm_blocks"] * k  # R
        self.frequency = raw["update_ltm_frequency"]
        self.decay = raw["decay_frequency"]
        self.rf0 = raw["initial_rf_when_moving_stm_to_ltm"]
        self.initialized = True  # M+ has no `initialized` buffer: always initialized
        layers = range(config.layers)
        self.ltm = [tensors[f"ltm.{i}"].clone() for i in layers]  # (M, d) each
        self.ltm_keys = [tensors[f"ltm_keys.{i}"].clone() for i in layers]  # (M, s)
        self.ltm_rf = [tensors[f"ltm_recall_frequencies.{i}"].clone() for i in layers]  # (M,)
        self.ltm_ages = [tensors[f"ltm_ages.{i}"].to(torch.int64) for i in layers]  # (M,)
        n = self.memory.shape[1]
        self.ages = [torch.zeros(n, dtype=torch.int64) for _ in layers]  # STM ages (Ns,)
        dim = config.hidden
        width = self.ltm_keys[0].shape[1]
        self.cached = [torch.empty(0, dim, dtype=self.memory.dtype) for _ in layers]  # dropped rows
        self.cached_keys = [torch.empty(0, width, dtype=self.memory.dtype) for _ in layers]
        self.cached_ages = [torch.empty(0, dtype=torch.int64) for _ in layers]
        self.update_step = 0
        self.retrieved: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64) for _ in layers]

    def _selector(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if f"{name}.weight" in self.w:  # one layer
            return x @ self.w[f"{name}.weight"].T
        return F.silu(x @ self.w[f"{name}.0.weight"].T) @ self.w[f"{name}.2.weight"].T  # (.., s)

    def _keys(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        x = self._norm(rows, self.w[f"model.layers.{i}.input_layernorm.weight"])
        return self._selector(x, f"model.layers.{i}.self_attn.key_proj")  # (n, s)

    def _read_rows(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """[R retrieved LTM rows | short-term pool] for layer i, retrieved with h's queries."""
        x = self._norm(h, self.w[f"model.layers.{i}.input_layernorm.weight"])
        queries = self._selector(x, f"model.layers.{i}.self_attn.query_proj")  # (T, s)
        keys = torch.cat([self.ltm_keys[i], self.cached_keys[i]])  # (M', s)
        rows = torch.cat([self.ltm[i], self.cached[i]])  # (M', d)
        ages = torch.cat([self.ltm_ages[i], self.cached_ages[i]])  # (M',)
        r = self.retrieve_count
        if len(keys) >= r:
            scores = torch.sigmoid(queries @ keys.T).mean(dim=0)  # (M',)
            ids = torch.topk(scores, r).indices.sort().values  # (R,)
        else:  # degenerate: fewer rows than slots, filled cyclically
            ids = torch.arange(r) % max(len(keys), 1)
        # oldest first: numpy's argsort of the ages, reversed (for R <= 16 numpy sorts by
        # insertion, which is stable, so ties keep the official order)
        order = np.argsort(ages[ids].numpy())[::-1].copy()
        ids = ids[torch.from_numpy(order)]
        self.retrieved[i] = ids
        return torch.cat([rows[ids], self.memory[i]])  # (R + Ns, d)

    def update(self, delta: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """Drop K short-term rows per layer into the cache, append delta; merge into the LTM
        every `update_ltm_frequency` updates. Returns kept, dropped and the raw permutations."""
        k = self.c.num_tokens
        n = self.memory.shape[1]
        kept_all, dropped_all, perms, memory = [], [], [], []
        new_rows, new_keys, new_ages = [], [], []
        for i in range(self.c.layers):
            perm = torch.randperm(n, generator=generator)  # (Ns,)
            kept, dropped = perm[: n - k].sort().values, perm[n - k:].sort().values
            memory.append(torch.cat([self.memory[i][kept], delta[i]]))  # (Ns, d)
            new_rows.append(self.memory[i][dropped])
            new_keys.append(self._keys(i, self.memory[i][dropped]))
            new_ages.append(self.ages[i][dropped])  # dropped rows keep their STM ages
            self.ages[i] = torch.cat([self.ages[i][kept], torch.arange(k - 1, -1, -1)])
            kept_all.append(kept)
            dropped_all.append(dropped)
            perms.append(perm)
        self.memory = torch.stack(memory)  # (L, Ns, d)
        for i in range(self.c.layers):
            self.ltm_ages[i] = self.ltm_ages[i] + k
            self.cached_ages[i] = torch.cat([self.cached_ages[i] + k, new_ages[i]])
            self.cached[i] = torch.cat([self.cached[i], new_rows[i]])
            self.cached_keys[i] = torch.cat([self.cached_keys[i], new_keys[i]])
        self.update_step += k
        if self.update_step >= self.frequency * k:
            self._merge()
        return {"kept": torch.stack(kept_all), "dropped": torch.stack(dropped_all), "randperm": torch.stack(perms)}

    def _merge(self) -> None:
        """Move the cache into the LTM; decay recall frequencies and keep the rows still
        recalled, unless that would leave no more than R rows."""
        r = self.retrieve_count
        for i in range(self.c.layers):
            rows = torch.cat([self.ltm[i], self.cached[i]])
            keys = torch.cat([self.ltm_keys[i], self.cached_keys[i]])
            ages = torch.cat([self.ltm_ages[i], self.cached_ages[i]])
            rf = torch.cat([self.ltm_rf[i], torch.full((len(self.cached[i]),), float(self.rf0), dtype=rows.dtype)])
            rf = rf - self.decay
            alive = rf > 0.01
            if int(alive.sum()) > r:
                rows, keys, ages, rf = rows[alive], keys[alive], ages[alive], rf[alive]
            else:
                rf = rf + self.decay
            self.ltm[i], self.ltm_keys[i], self.ltm_ages[i], self.ltm_rf[i] = rows, keys, ages, rf
            self.cached[i] = self.cached[i][:0]
            self.cached_keys[i] = self.cached_keys[i][:0]
            self.cached_ages[i] = self.cached_ages[i][:0]
        self.update_step = 0
