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

    The engine is a function of its state, as nanoGPT's model is of its input: the memory a
    computation reads (`rows`, per layer a (N, d) tensor, so layers may live on different
    devices; `row_ids`, following every row on the CPU; `initialized`; M+'s tiers) is a dict
    passed as `state`, and `update`/`forget` write the new memory into the dict they are
    given (tensors are replaced, never written in place). Nothing a request reads is held on
    the engine, so two memories of one loaded checkpoint, read in two threads, never see each
    other's rows. Without a `state`, the engine's own (`own`: the checkpoint as loaded, then
    whatever was written into it) is used, as the official code keeps its memory.
    """

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
        self.own = OfficialMemoryLLM.initial_state(self)
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

    def __getattr__(self, name: str):
        """The engine's own state by name (`engine.rows`, `engine.ltm`), as the official code
        keeps its memory: for the conformance checks and the standalone engine."""
        own = self.__dict__.get("own", {})
        if (name in type(self).STATE or name == "retrieved") and name in own:
            return own[name]
        raise AttributeError(name)

    def _state(self, state: dict | None) -> dict:
        return self.own if state is None else state

    @property
    def memory(self) -> torch.Tensor:
        """The engine's own pool as one (L, N, d) tensor on the CPU."""
        return torch.stack([r.cpu() for r in self.own["rows"]])

    @staticmethod
    def copy(state: dict) -> dict:
        """A state that `update` and `forget` may write into without changing `state`."""
        return {k: list(v) if isinstance(v, list) else v for k, v in state.items()}

    def initial_state(self) -> dict:
        """The state of the freshly loaded checkpoint."""
        return {
            "rows": list(self.checkpoint_rows),
            "row_ids": [row_ids(CHECKPOINT, torch.arange(len(r))) for r in self.checkpoint_rows],
            "initialized": self.checkpoint_initialized,
        }

    def forget(self, gone, state: dict | None = None) -> int:
        """Replace the pool rows whose ids `gone(ids) -> bool mask` selects by the checkpoint's
        rows at the same positions; returns how many rows (over all layers) were replaced.
        When every row is the checkpoint's again, the memory is as freshly loaded."""
        state = self._state(state)
        count = 0
        for i in range(self.c.layers):
            mask = gone(state["row_ids"][i])
            if mask.any():
                where = torch.nonzero(mask).flatten()
                rows = state["rows"][i].clone()
                rows[where.to(rows.device)] = self.checkpoint_rows[i][where.to(rows.device)]
                ids = state["row_ids"][i].clone()
                ids[where] = row_ids(CHECKPOINT, where)
                state["rows"][i], state["row_ids"][i] = rows, ids
                count += len(where)
        if not self.checkpoint_initialized and all(
            bool((split_ids(ids)[0] == CHECKPOINT).all()) for ids in state["row_ids"]
        ):
            state["initialized"] = False
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

    def _read_rows(self, i: int, h: torch.Tensor, state: dict, retrieved: list | None) -> torch.Tensor:
        """The memory rows layer i reads in front of the input h (T, d): its whole pool."""
        return state["rows"][i]  # (N, d)

    def _prefix(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        """[bos[i] | rows] if the checkpoint has bos embeddings."""
        return torch.cat([self.bos[i], rows]) if self.c.add_bos else rows

    # -- reading -----------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: list | None = None, start: int = 0, *, state: dict | None = None,
                retrieved: list | None = None, memory: bool = True) -> torch.Tensor:
        """Logits (T, V) for ids (T,) after `state`'s memory. With a cache, `start` is the
        position of ids[0] and the memory is already in the cache (decode steps); without,
        every layer prepends its memory (none with `memory=False`: the plain checkpoint).
        M+ puts the long-term rows each layer retrieved into `retrieved` (a list), if given."""
        state = self._state(state)
        h = self._embed(ids)  # (T, d)
        adapter = self._adapter(False)
        for i in range(self.c.layers):
            h = h.to(self.layer_devices[i])
            if cache is not None and len(cache) > i:
                positions = torch.arange(start, start + len(ids))
                h = self._layer(i, h, 0, positions, adapter, cache)
            elif memory and state["initialized"]:
                s = torch.cat([self._prefix(i, self._read_rows(i, h, state, retrieved)), h])  # (P+T, d)
                prefix = s.shape[0] - h.shape[0]
                h = self._layer(i, s, prefix, torch.arange(s.shape[0]), adapter, cache)  # (T, d)
            else:
                h = self._layer(i, h, 0, torch.arange(len(ids)), adapter, cache)
        return self._logits(h)

    def stream(
        self, ids: torch.Tensor, max_new_tokens: int, *, stop_ids: frozenset[int] = frozenset(),
        temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
        state: dict | None = None, retrieved: list | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (token, the logits that chose it) one at a time, with a KV cache of
        bos + memory + tokens; greedy when temperature is 0; stops before a stop id."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        cache: list = []
        logits = self.forward(ids, cache, state=state, retrieved=retrieved)[-1]  # (V,)
        for n in range(max_new_tokens):
            token = pick(logits.float().cpu(), temperature, top_p, top_k, generator)
            if token in stop_ids:
                return
            yield token, logits
            if n == max_new_tokens - 1:
                return
            logits = self.forward(torch.tensor([token]), cache, start=cache[0][0].shape[1])[-1]

    def generate(self, ids: torch.Tensor, max_new_tokens: int, state: dict | None = None
                 ) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens and the logits that chose each (as the official generate)."""
        steps = list(self.stream(ids, max_new_tokens, state=state))
        return [t for t, _ in steps], torch.stack([logits.cpu() for _, logits in steps])  # (n_new, V)

    # -- writing -----------------------------------------------------------------------

    @torch.inference_mode()
    def inject(self, ids: torch.Tensor, state: dict | None = None) -> list[torch.Tensor]:
        """The new memory rows a context writes after `state`'s memory: L x (K', d); K' = K
        once initialized."""
        state = self._state(state)
        c = self.c
        h = self._embed(ids)  # (T, d)
        adapter = self._adapter(True)
        deltas = []
        for i in range(c.layers):
            h = h.to(self.layer_devices[i])
            emb = self.new_memory_emb.to(h.device)  # (1, d)
            if state["initialized"]:
                tail = state["rows"][i][-c.num_tokens:]  # (K, d): only the memory tail is read
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
        if not state["initialized"] and c.variant == "main":
            # Official quirk: the delta of layer l is a view into layer l's output, to which layer
            # l+1 adds the positional vector in place; so every layer but the last carries it.
            deltas = [d + self.new_memory_emb.to(d.device) if i < c.layers - 1 else d for i, d in enumerate(deltas)]
        return deltas

    def update(self, delta: list[torch.Tensor], generator: torch.Generator | None = None,
               ids: torch.Tensor | None = None, state: dict | None = None) -> torch.Tensor | None:
        """Write delta (L x (n, d)) into the memory `state` (its lists get new tensors: pass
        `copy(state)` to keep the old one); `ids` (n,) are the new rows' ids. Returns the kept
        indices ((keep,) or (L, keep)), or None for the first write, which tiles the delta
        over the whole pool."""
        state = self._state(state)
        c = self.c
        n = len(delta[0])
        ids = ids if ids is not None else torch.full((n,), -1, dtype=torch.int64)
        size = len(state["rows"][0])
        if not state["initialized"]:
            index = tile_index(n, size)  # the official code concatenates copies: the same rows
            state["rows"] = [d[index.to(d.device)] for d in delta]
            state["row_ids"] = [ids[index] for _ in delta]
            state["initialized"] = True
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
            pool = state["rows"][i]
            state["rows"][i] = torch.cat([pool[rows.to(pool.device)], delta[i]])  # (keep+n, d)
            state["row_ids"][i] = torch.cat([state["row_ids"][i][rows], ids])
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
        self.checkpoint_initialized = True  # M+ has no `initialized` buffer: always initialized
        layers = range(config.layers)
        dev = self.layer_devices
        self.checkpoint_ltm = [self.w.pop(f"ltm.{i}").to(dev[i]) for i in layers]  # (M, d) each
        self.checkpoint_ltm_keys = [self.w.pop(f"ltm_keys.{i}").to(dev[i]) for i in layers]  # (M, s)
        self.checkpoint_ltm_rf = [self.w.pop(f"ltm_recall_frequencies.{i}").to(dev[i]) for i in layers]  # (M,)
        self.checkpoint_ltm_ages = [self.w.pop(f"ltm_ages.{i}").to(torch.int64).cpu() for i in layers]  # (M,)
        self.checkpoint_keys = [self._keys(i, self.checkpoint_rows[i]) for i in layers]  # (N, s)
        self.own = self.initial_state()
        # what the last read of the engine's own state retrieved per layer (the conformance checks)
        self.own["retrieved"] = [torch.empty(0, dtype=torch.int64) for _ in layers]

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

    def forget(self, gone, state: dict | None = None) -> int:
        """As MemoryLLM's, and the long-term rows (and rows waiting to merge) that `gone`
        selects are removed."""
        state = self._state(state)
        before = [ids.clone() for ids in state["row_ids"]]
        count = super().forget(gone, state)
        for i in range(self.c.layers):
            replaced = before[i] != state["row_ids"][i]
            if replaced.any():
                keys = state["row_keys"][i].clone()
                where = torch.nonzero(replaced).flatten().to(keys.device)
                keys[where] = self.checkpoint_keys[i][where]
                state["row_keys"][i] = keys
            for prefix, parts in (("cached", ("cached", "cached_keys", "cached_ages")),
                                  ("ltm", ("ltm", "ltm_keys", "ltm_rf", "ltm_ages"))):
                ids = state[f"{prefix}_ids"][i]
                keep = ~gone(ids)
                if not keep.all():
                    count += int((~keep).sum())
                    for part in (*parts, f"{prefix}_ids"):
                        values = state[part]
                        values[i] = values[i][keep.to(values[i].device)]
        return count

    def _selector(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if f"{name}.weight" in self.w:  # one layer
            return x @ self.w[f"{name}.weight"].T
        return F.silu(x @ self.w[f"{name}.0.weight"].T) @ self.w[f"{name}.2.weight"].T  # (.., s)

    def _keys(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        x = self._norm(rows, self.w[f"model.layers.{i}.input_layernorm.weight"])
        return self._selector(x, f"model.layers.{i}.self_attn.key_proj")  # (n, s)

    def _read_rows(self, i: int, h: torch.Tensor, state: dict, retrieved: list | None) -> torch.Tensor:
        """[R retrieved LTM rows | short-term pool] for layer i, retrieved with h's queries;
        the indices chosen go into `retrieved` (and, reading the engine's own state, into it)."""
        x = self._norm(h, self.w[f"model.layers.{i}.input_layernorm.weight"])
        queries = self._selector(x, f"model.layers.{i}.self_attn.query_proj")  # (T, s)
        keys = torch.cat([state["ltm_keys"][i], state["cached_keys"][i]])  # (M', s)
        rows = torch.cat([state["ltm"][i], state["cached"][i]])  # (M', d)
        ages = torch.cat([state["ltm_ages"][i], state["cached_ages"][i]])  # (M',)
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
        for out in (retrieved, state.get("retrieved")):  # (L,) lists of the indices chosen
            if out is not None:
                out[i] = ids
        return torch.cat([rows[ids.to(rows.device)], state["rows"][i]])  # (R + Ns, d)

    def update(self, delta: list[torch.Tensor], generator: torch.Generator | None = None,
               ids: torch.Tensor | None = None, state: dict | None = None) -> dict:
        """Drop K short-term rows per layer into the cache, append delta; merge into the LTM
        every `update_ltm_frequency` updates. Returns kept, dropped and the raw permutations."""
        s = self._state(state)
        k = self.c.num_tokens
        n = len(s["rows"][0])
        ids = ids if ids is not None else torch.full((len(delta[0]),), -1, dtype=torch.int64)
        kept_all, dropped_all, perms = [], [], []
        for i in range(self.c.layers):
            perm = torch.randperm(n, generator=generator)  # (Ns,)
            kept, dropped = perm[: n - k].sort().values, perm[n - k:].sort().values
            rows, keys = s["rows"][i], s["row_keys"][i]
            on = rows.device
            s["cached"][i] = torch.cat([s["cached"][i], rows[dropped.to(on)]])
            s["cached_keys"][i] = torch.cat([s["cached_keys"][i], keys[dropped.to(on)]])
            # dropped rows keep their STM ages; everything already waiting ages by K
            s["cached_ages"][i] = torch.cat([s["cached_ages"][i] + k, s["ages"][i][dropped]])
            s["cached_ids"][i] = torch.cat([s["cached_ids"][i], s["row_ids"][i][dropped]])
            s["rows"][i] = torch.cat([rows[kept.to(on)], delta[i]])  # (Ns, d)
            s["row_keys"][i] = torch.cat([keys[kept.to(on)], self._keys(i, delta[i])])
            s["row_ids"][i] = torch.cat([s["row_ids"][i][kept], ids])
            s["ages"][i] = torch.cat([s["ages"][i][kept], torch.arange(k - 1, -1, -1)])
            s["ltm_ages"][i] = s["ltm_ages"][i] + k
            kept_all.append(kept)
            dropped_all.append(dropped)
            perms.append(perm)
        s["update_step"] += k
        if s["update_step"] >= self.frequency * k:
            self._merge(s)
        return {"kept": torch.stack(kept_all), "dropped": torch.stack(dropped_all), "randperm": torch.stack(perms)}

    def _merge(self, s: dict) -> None:
        """Move the cache into the LTM; decay recall frequencies and keep the rows still
        recalled, unless that would leave no more than R rows."""
        r = self.retrieve_count
        for i in range(self.c.layers):
            rows = torch.cat([s["ltm"][i], s["cached"][i]])
            keys = torch.cat([s["ltm_keys"][i], s["cached_keys"][i]])
            ages = torch.cat([s["ltm_ages"][i], s["cached_ages"][i]])
            ids = torch.cat([s["ltm_ids"][i], s["cached_ids"][i]])
            rf = torch.cat([s["ltm_rf"][i], torch.full((len(s["cached"][i]),), float(self.rf0), dtype=rows.dtype,
                                                       device=rows.device)])
            rf = rf - self.decay
            alive = rf > 0.01
            if int(alive.sum()) > r:
                on = alive.to(rows.device)
                rows, keys, rf = rows[on], keys[on], rf[on]
                ages, ids = ages[alive.cpu()], ids[alive.cpu()]
            else:
                rf = rf + self.decay
            s["ltm"][i], s["ltm_keys"][i], s["ltm_ages"][i], s["ltm_rf"][i], s["ltm_ids"][i] = rows, keys, ages, rf, ids
            for part in ("cached", "cached_keys", "cached_ages", "cached_ids"):
                s[part][i] = s[part][i][:0]
        s["update_step"] = 0
