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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..errors import ModelError
from .placement import available_bytes, estimate_bytes, plan_devices
from .sampling import pick

ENCODER, DECODER = "default", "decoder_adapter"  # peft adapter names: writing, reading
ROW_SPAN = 1 << 32  # row id = block index * ROW_SPAN + row in the block
CHECKPOINT, CHECKPOINT_LTM = 0, 1  # block indices of the checkpoint's own pool and long-term rows


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


def row_ids(block: int, rows: torch.Tensor) -> torch.Tensor:
    """Ids of memory rows: block index * 2^32 + row in the block. The engine carries them
    through every selection so the store can say where each row of the pool came from."""
    return block * ROW_SPAN + rows.to(torch.int64)


def split_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, row) of row ids; pending blocks have negative indices."""
    return torch.div(ids, ROW_SPAN, rounding_mode="floor"), torch.remainder(ids, ROW_SPAN)


def tile_index(n: int, size: int) -> torch.Tensor:
    """Rows of an n-row delta that fill a size-row pool at the first write, as the official
    code tiles it: whole copies, then the last size % n rows (or the last size rows)."""
    if n >= size:
        return torch.arange(n - size, n)
    return torch.cat([torch.arange(n)] * (size // n) + [torch.arange(n - size % n, n)])  # (size,)


class OfficialMemoryLLM:
    """A MemoryLLM checkpoint: forward, generation, injection and the memory update.

    The pool is kept per layer (a list of (N, d) tensors), so that layers may live on
    different devices; `row_ids` follow every row (see `row_ids`), on the CPU."""

    STATE = ("rows", "row_ids", "initialized")

    def __init__(self, config: Config, tensors: dict[str, torch.Tensor], devices: dict[str, str] | None = None) -> None:
        self.c = config
        layers = range(config.layers)
        devices = devices or {}
        self.layer_devices = [torch.device(devices.get(f"model.layers.{i}", "cpu")) for i in layers]
        self.devices = devices
        self.w = {name: t.to(self._device_of(name)) for name, t in tensors.items()}
        memory = self.w.pop("memory")  # (L, N, d)
        self.checkpoint_rows = [memory[i].to(self.layer_devices[i]) for i in layers]  # L x (N, d)
        self.checkpoint_initialized = bool(int(tensors.get("initialized", torch.tensor(1))))
        self.rows = list(self.checkpoint_rows)
        self.row_ids = [row_ids(CHECKPOINT, torch.arange(len(self.rows[0]))) for _ in layers]
        self.initialized = self.checkpoint_initialized
        bos = self.w.get("bos_embedding")  # (L, 1, d) or None
        self.bos = [bos[i].to(self.layer_devices[i]) for i in layers] if bos is not None else None
        self.new_memory_emb = self.w["new_memory_positional_emb"][0]  # (1, d)
        hd = config.head_dim
        inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))  # (hd/2,)
        self.inv_freq = {d: inv_freq.to(d) for d in set(self.layer_devices)}

    def weight_bytes(self) -> int:
        """RAM (or GPU memory) the checkpoint's tensors take: its weights and its own pool."""
        tensors = [*self.w.values(), *self.checkpoint_rows, *(self.bos or [])]
        tensors += [t for name in ("checkpoint_ltm", "checkpoint_ltm_keys") for t in getattr(self, name, [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _device_of(self, name: str) -> torch.device:
        for part, device in self.devices.items():
            if name == part or name.startswith(part + "."):
                return torch.device(device)
        if name.startswith(("ltm", "bos_embedding")):
            return torch.device("cpu")  # placed per layer later
        return torch.device(self.devices.get("model.embed_tokens", "cpu"))

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> OfficialMemoryLLM:
        """Load config.json and every *.safetensors shard of a checkpoint directory, after
        checking that the tensors fit in the memory available for this dtype and device."""
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
        try:
            parsed = Config.from_dict(config)
        except KeyError as err:
            raise ModelError(f"{path / 'config.json'} lacks {err}: not a MemoryLLM checkpoint") from None
        shapes = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                shapes.update({key: f.get_slice(key).get_shape() for key in f.keys()})
        missing = {"memory", "new_memory_positional_emb", "model.embed_tokens.weight"} - set(shapes)
        if missing:
            raise ModelError(f"{path.name} is not a MemoryLLM checkpoint: it lacks {', '.join(sorted(missing))}")
        devices = plan_devices(parsed, shapes, dtype, device)
        need = estimate_bytes(files, dtype)
        on_gpu = sorted({d for d in devices.values() if d.startswith("cuda")})
        if on_gpu:
            available = sum(torch.cuda.mem_get_info(torch.device(d))[0] for d in on_gpu)
            where = "GPU memory"
        else:
            available, where = available_bytes(), "memory"
        if available is not None and need > 0.9 * available:
            raise ModelError(
                f"{path.name} needs about {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}, "
                f"but only {available / 2**30:.1f} GiB of {where} is available",
                hint="choose a smaller dtype (bfloat16) or a machine with more memory",
            )
        tensors = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    tensors[key] = t.to(dtype) if t.is_floating_point() else t
        return (MPlus if parsed.variant == "mplus" else cls)(parsed, tensors, devices)

    # -- state -------------------------------------------------------------------------

    @property
    def memory(self) -> torch.Tensor:
        """The pool as one (L, N, d) tensor on the CPU."""
        return torch.stack([r.cpu() for r in self.rows])

    def state(self) -> dict:
        """The mutable memory state (shallow: tensors are replaced, never written in place)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in ((k, getattr(self, k)) for k in self.STATE)}

    def set_state(self, state: dict) -> None:
        for k in self.STATE:
            v = state[k]
            setattr(self, k, list(v) if isinstance(v, list) else v)

    def initial_state(self) -> dict:
        """The state of the freshly loaded checkpoint."""
        return {
            "rows": list(self.checkpoint_rows),
            "row_ids": [row_ids(CHECKPOINT, torch.arange(len(r))) for r in self.checkpoint_rows],
            "initialized": self.checkpoint_initialized,
        }

    def forget(self, gone) -> int:
        """Replace the pool rows whose ids `gone(ids) -> bool mask` selects by the checkpoint's
        rows at the same positions; returns how many rows (over all layers) were replaced.
        When every row is the checkpoint's again, the memory is as freshly loaded."""
        count = 0
        for i in range(self.c.layers):
            mask = gone(self.row_ids[i])
            if mask.any():
                where = torch.nonzero(mask).flatten()
                rows = self.rows[i].clone()
                rows[where.to(rows.device)] = self.checkpoint_rows[i][where.to(rows.device)]
                ids = self.row_ids[i].clone()
                ids[where] = row_ids(CHECKPOINT, where)
                self.rows[i], self.row_ids[i] = rows, ids
                count += len(where)
        if not self.checkpoint_initialized and all(
            bool((split_ids(ids)[0] == CHECKPOINT).all()) for ids in self.row_ids
        ):
            self.initialized = False
        return count

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
        angles = (positions.float() * self.c.rope_scale)[:, None] * self.inv_freq[x.device][None]  # (S, hd/2)
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
        device = s.device
        positions = positions.to(device)
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
        queries, keys = q.shape[1], k.shape[1]
        mask = None
        if queries > 1:  # one query (a decode step) sees every key
            mask = torch.arange(keys, device=device)[None, :] <= (
                past + prefix + torch.arange(queries, device=device)
            )[:, None]  # (S-P, past+S)
        attn = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]
        attn = attn.transpose(0, 1).reshape(queries, c.heads * c.head_dim)  # (S-P, H*hd)
        h = s[prefix:] + self._linear(attn, f"{p}.self_attn.o_proj", adapter)  # (S-P, d)
        x = self._norm(h, self.w[f"{p}.post_attention_layernorm.weight"])
        mlp = self._linear(
            F.silu(self._linear(x, f"{p}.mlp.gate_proj", adapter)) * self._linear(x, f"{p}.mlp.up_proj", adapter),
            f"{p}.mlp.down_proj", adapter,
        )
        return h + mlp  # (S-P, d)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.w["model.embed_tokens.weight"]
        return table[ids.to(table.device)]  # (T, d)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        norm = self.w["model.norm.weight"]
        return self._norm(h.to(norm.device), norm) @ self.w["lm_head.weight"].T  # (T, V)

    def _read_rows(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """The memory rows layer i reads in front of the input h (T, d): its whole pool."""
        return self.rows[i]  # (N, d)

    def _prefix(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        """[bos[i] | rows] if the checkpoint has bos embeddings."""
        return torch.cat([self.bos[i], rows]) if self.c.add_bos else rows

    # -- reading -----------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: list | None = None, start: int = 0) -> torch.Tensor:
        """Logits (T, V) for ids (T,). With a cache, `start` is the position of ids[0] and the
        memory is already in the cache (decode steps); without, every layer prepends its memory."""
        h = self._embed(ids)  # (T, d)
        adapter = self._adapter(False)
        for i in range(self.c.layers):
            h = h.to(self.layer_devices[i])
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

    def stream(
        self, ids: torch.Tensor, max_new_tokens: int, *, stop_ids: frozenset[int] = frozenset(),
        temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (token, the logits that chose it) one at a time, with a KV cache of
        bos + memory + tokens; greedy when temperature is 0; stops before a stop id."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        cache: list = []
        logits = self.forward(ids, cache)[-1]  # (V,)
        for n in range(max_new_tokens):
            token = pick(logits.float().cpu(), temperature, top_p, top_k, generator)
            if token in stop_ids:
                return
            yield token, logits
            if n == max_new_tokens - 1:
                return
            logits = self.forward(torch.tensor([token]), cache, start=cache[0][0].shape[1])[-1]

    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens and the logits that chose each (as the official generate)."""
        steps = list(self.stream(ids, max_new_tokens))
        return [t for t, _ in steps], torch.stack([logits.cpu() for _, logits in steps])  # (n_new, V)

    # -- writing -----------------------------------------------------------------------

    @torch.inference_mode()
    def inject(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The new memory rows a context writes: L x (K', d); K' = K once initialized."""
        c = self.c
        h = self._embed(ids)  # (T, d)
        adapter = self._adapter(True)
        deltas = []
        for i in range(c.layers):
            h = h.to(self.layer_devices[i])
            emb = self.new_memory_emb.to(h.device)  # (1, d)
            if self.initialized:
                tail = self.rows[i][-c.num_tokens:]  # (K, d): only the memory tail is read
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
            deltas = [d + self.new_memory_emb.to(d.device) if i < c.layers - 1 else d for i, d in enumerate(deltas)]
        return deltas

    def update(self, delta: list[torch.Tensor], generator: torch.Generator | None = None,
               ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Write delta (L x (n, d)) into the memory; `ids` (n,) are the new rows' ids. Returns
        the kept indices ((keep,) or (L, keep)), or None for the first write, which tiles
        the delta over the whole pool."""
        c = self.c
        n = len(delta[0])
        ids = ids if ids is not None else torch.full((n,), -1, dtype=torch.int64)
        size = len(self.rows[0])
        if not self.initialized:
            index = tile_index(n, size)  # the official code concatenates copies: the same rows
            self.rows = [d[index.to(d.device)] for d in delta]
            self.row_ids = [ids[index] for _ in delta]
            self.initialized = True
            return None
        drop = int(size * (1 / c.num_blocks))  # float64, as the official code (K-1 for some B)
        if n != c.num_tokens:
            drop = n
        keep = size - drop

        def kept_rows() -> torch.Tensor:
            return torch.randperm(size, generator=generator)[:keep].sort().values

        kept = torch.stack([kept_rows() for _ in range(c.layers)]) if c.per_layer_drop else kept_rows()
        for i in range(c.layers):
            rows = kept[i] if c.per_layer_drop else kept  # (keep,)
            self.rows[i] = torch.cat([self.rows[i][rows.to(self.rows[i].device)], delta[i]])  # (keep+n, d)
            self.row_ids[i] = torch.cat([self.row_ids[i][rows], ids])
        return kept


class MPlus(OfficialMemoryLLM):
    """M+ (Wang et al., ICML 2025): MemoryLLM plus a long-term memory (LTM) per layer.

    Rows dropped from the short-term pool wait in a cache and are merged into the LTM every
    `update_ltm_frequency` updates; before each layer reads, a trained retriever scores the
    LTM rows against the input and places the R best in front of the short-term pool.
    State that the official code keeps outside the checkpoint (STM ages, the cache, the
    update step) starts empty after loading, as there.

    A row's retrieval key is computed once, when the row enters the short-term pool (the
    official code computes it when the row is dropped, from the same row; the values agree
    to float rounding), so that stored rows carry their keys and reload bit for bit.
    """

    STATE = OfficialMemoryLLM.STATE + (
        "row_keys", "ages", "cached", "cached_keys", "cached_ages", "cached_ids",
        "ltm", "ltm_keys", "ltm_rf", "ltm_ages", "ltm_ids", "update_step",
    )

    def __init__(self, config: Config, tensors: dict[str, torch.Tensor], devices: dict[str, str] | None = None) -> None:
        super().__init__(config, tensors, devices)
        raw = config.raw
        k = config.num_tokens
        self.retrieve_count = raw["num_ltm_blocks"] * k  # R
        self.frequency = raw["update_ltm_frequency"]
        self.decay = raw["decay_frequency"]
        self.rf0 = raw["initial_rf_when_moving_stm_to_ltm"]
        self.initialized = self.checkpoint_initialized = True  # M+ has no `initialized` buffer: always initialized
        layers = range(config.layers)
        dev = self.layer_devices
        self.checkpoint_ltm = [self.w.pop(f"ltm.{i}").to(dev[i]) for i in layers]  # (M, d) each
        self.checkpoint_ltm_keys = [self.w.pop(f"ltm_keys.{i}").to(dev[i]) for i in layers]  # (M, s)
        self.checkpoint_ltm_rf = [self.w.pop(f"ltm_recall_frequencies.{i}").to(dev[i]) for i in layers]  # (M,)
        self.checkpoint_ltm_ages = [self.w.pop(f"ltm_ages.{i}").to(torch.int64).cpu() for i in layers]  # (M,)
        self.checkpoint_keys = [self._keys(i, self.checkpoint_rows[i]) for i in layers]  # (N, s)
        self.set_state(self.initial_state())
        self.retrieved: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64) for _ in layers]

    def initial_state(self) -> dict:
        state = super().initial_state()
        layers = range(self.c.layers)
        n = len(self.checkpoint_rows[0])
        width = self.checkpoint_ltm_keys[0].shape[1]

        def empty(i: int, *shape: int) -> torch.Tensor:
            return torch.empty(0, *shape, dtype=self.checkpoint_rows[i].dtype, device=self.layer_devices[i])

        return state | {
            "row_keys": list(self.checkpoint_keys),
            "ages": [torch.zeros(n, dtype=torch.int64) for _ in layers],  # STM ages (Ns,)
            "cached": [empty(i, self.c.hidden) for i in layers],  # dropped rows waiting for the merge
            "cached_keys": [empty(i, width) for i in layers],
            "cached_ages": [torch.empty(0, dtype=torch.int64) for _ in layers],
            "cached_ids": [torch.empty(0, dtype=torch.int64) for _ in layers],
            "ltm": list(self.checkpoint_ltm),
            "ltm_keys": list(self.checkpoint_ltm_keys),
            "ltm_rf": list(self.checkpoint_ltm_rf),
            "ltm_ages": list(self.checkpoint_ltm_ages),
            "ltm_ids": [row_ids(CHECKPOINT_LTM, torch.arange(len(r))) for r in self.checkpoint_ltm],
            "update_step": 0,
        }

    def forget(self, gone) -> int:
        """As MemoryLLM's, and the long-term rows (and rows waiting to merge) that `gone`
        selects are removed."""
        before = [ids.clone() for ids in self.row_ids]
        count = super().forget(gone)
        for i in range(self.c.layers):
            replaced = before[i] != self.row_ids[i]
            if replaced.any():
                keys = self.row_keys[i].clone()
                where = torch.nonzero(replaced).flatten().to(keys.device)
                keys[where] = self.checkpoint_keys[i][where]
                self.row_keys[i] = keys
            for prefix, parts in (("cached", ("cached", "cached_keys", "cached_ages")),
                                  ("ltm", ("ltm", "ltm_keys", "ltm_rf", "ltm_ages"))):
                ids = getattr(self, f"{prefix}_ids")[i]
                keep = ~gone(ids)
                if not keep.all():
                    count += int((~keep).sum())
                    for part in (*parts, f"{prefix}_ids"):
                        values = getattr(self, part)
                        values[i] = values[i][keep.to(values[i].device)]
        return count

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
            ids = torch.topk(scores, r).indices.sort().values.cpu()  # (R,)
        else:  # degenerate: fewer rows than slots, filled cyclically
            ids = torch.arange(r) % max(len(keys), 1)
        # oldest first: numpy's argsort of the ages, reversed (for R <= 16 numpy sorts by
        # insertion, which is stable, so ties keep the official order)
        order = np.argsort(ages[ids].numpy())[::-1].copy()
        ids = ids[torch.from_numpy(order)]
        self.retrieved[i] = ids
        return torch.cat([rows[ids.to(rows.device)], self.rows[i]])  # (R + Ns, d)

    def update(self, delta: list[torch.Tensor], generator: torch.Generator | None = None,
               ids: torch.Tensor | None = None) -> dict:
        """Drop K short-term rows per layer into the cache, append delta; merge into the LTM
        every `update_ltm_frequency` updates. Returns kept, dropped and the raw permutations."""
        k = self.c.num_tokens
        n = len(self.rows[0])
        ids = ids if ids is not None else torch.full((len(delta[0]),), -1, dtype=torch.int64)
        kept_all, dropped_all, perms = [], [], []
        for i in range(self.c.layers):
            perm = torch.randperm(n, generator=generator)  # (Ns,)
            kept, dropped = perm[: n - k].sort().values, perm[n - k:].sort().values
            rows, keys = self.rows[i], self.row_keys[i]
            on = rows.device
            self.cached[i] = torch.cat([self.cached[i], rows[dropped.to(on)]])
            self.cached_keys[i] = torch.cat([self.cached_keys[i], keys[dropped.to(on)]])
            # dropped rows keep their STM ages; everything already waiting ages by K
            self.cached_ages[i] = torch.cat([self.cached_ages[i] + k, self.ages[i][dropped]])
            self.cached_ids[i] = torch.cat([self.cached_ids[i], self.row_ids[i][dropped]])
            self.rows[i] = torch.cat([rows[kept.to(on)], delta[i]])  # (Ns, d)
            self.row_keys[i] = torch.cat([keys[kept.to(on)], self._keys(i, delta[i])])
            self.row_ids[i] = torch.cat([self.row_ids[i][kept], ids])
            self.ages[i] = torch.cat([self.ages[i][kept], torch.arange(k - 1, -1, -1)])
            self.ltm_ages[i] = self.ltm_ages[i] + k
            kept_all.append(kept)
            dropped_all.append(dropped)
            perms.append(perm)
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
            ids = torch.cat([self.ltm_ids[i], self.cached_ids[i]])
            rf = torch.cat([self.ltm_rf[i], torch.full((len(self.cached[i]),), float(self.rf0), dtype=rows.dtype,
                                                       device=rows.device)])
            rf = rf - self.decay
            alive = rf > 0.01
            if int(alive.sum()) > r:
                on = alive.to(rows.device)
                rows, keys, rf = rows[on], keys[on], rf[on]
                ages, ids = ages[alive.cpu()], ids[alive.cpu()]
            else:
                rf = rf + self.decay
            self.ltm[i], self.ltm_keys[i], self.ltm_ages[i], self.ltm_rf[i], self.ltm_ids[i] = rows, keys, ages, rf, ids
            self.cached[i] = self.cached[i][:0]
            self.cached_keys[i] = self.cached_keys[i][:0]
            self.cached_ages[i] = self.cached_ages[i][:0]
            self.cached_ids[i] = self.cached_ids[i][:0]
        self.update_step = 0
