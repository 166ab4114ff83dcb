"""Tiny random MemoryLLM and M+ checkpoints in the official format, with a tokenizer.

The tensor names, shapes and config fields are those of the official checkpoints (see
../shared/conformance/README.md); the weights are seeded random values scaled to keep
activations well conditioned, so that greedy decoding is not a tie between tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def trained_config(variant: str = "main", **extra) -> dict:
    config = {
        "architectures": ["MemoryLLM"], "model_type": "llama", "vocab_size": 320, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 500000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "num_tokens": 8, "num_blocks": 4, "num_memory_tokens": 32, "add_bos_embedding": True,
        "drop_memory_per_layer": True, "add_decoder_lora": True,
        "lora_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": list(LORA_TARGETS),
                        "inference_mode": True},
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
    }
    if variant == "mplus":
        config.update({"architectures": ["MPlus"], "num_blocks": 6, "num_ltm_blocks": 2, "update_ltm_frequency": 2,
                       "update_ltm_mode": "immediate", "decay_frequency": 1, "initial_rf_when_moving_stm_to_ltm": 10,
                       "ltm_initial_size": 40, "selector_hidden_dim": 16, "num_selector_layers": 2})
    config.update(extra)
    return config


def trained_tensors(config: dict, seed: int = 0, initialized: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L, d = config["num_hidden_layers"], config["hidden_size"]
    inter, V = config["intermediate_size"], config["vocab_size"]
    hd = d // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    r = config["lora_config"]["r"]
    n = config["num_tokens"] * config["num_blocks"]

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    t = {
        "memory": rand(L, n, d), "bos_embedding": rand(L, 1, d), "new_memory_positional_emb": rand(1, 1, d, scale=0.5),
        "model.embed_tokens.weight": rand(V, d), "model.norm.weight": torch.ones(d),
        "lm_head.weight": rand(V, d, scale=d ** -0.5),
    }
    if "num_ltm_blocks" not in config:
        t["initialized"] = torch.tensor(int(initialized), dtype=torch.uint8)
    shapes = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
              "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
    for i in range(L):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(d)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(d)
        for name, (out, inp) in shapes.items():
            where = f"{p}.{'mlp' if name in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{name}"
            weight = rand(out, inp, scale=inp ** -0.5)
            if name not in LORA_TARGETS:
                t[f"{where}.weight"] = weight
                continue
            t[f"{where}.base_layer.weight"] = weight
            for adapter in ("default", "decoder_adapter"):
                t[f"{where}.lora_A.{adapter}.weight"] = rand(r, inp, scale=inp ** -0.5)
                t[f"{where}.lora_B.{adapter}.weight"] = rand(out, r, scale=0.1)
        if "num_ltm_blocks" in config:
            s, m = config["selector_hidden_dim"], config["ltm_initial_size"]
            for sel in ("query_proj", "key_proj"):
                t[f"{p}.self_attn.{sel}.0.weight"] = rand(2 * s, d, scale=d ** -0.5)
                t[f"{p}.self_attn.{sel}.2.weight"] = rand(s, 2 * s, scale=(2 * s) ** -0.5)
            t[f"ltm.{i}"] = rand(m, d)
            t[f"ltm_keys.{i}"] = rand(m, s)
            t[f"ltm_recall_frequencies.{i}"] = torch.full((m,), 5.0)
            t[f"ltm_ages.{i}"] = torch.arange(m, dtype=torch.float32)
    return t


def save_trained(path: Path, variant: str = "main", *, seed: int = 0, chat: bool = False,
                 initialized: bool = True, **extra) -> Path:
    from tests.conftest import _tokenizer

    path.mkdir(parents=True, exist_ok=True)
    config = trained_config(variant, **extra)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(trained_tensors(config, seed, initialized), str(path / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer(chat).save_pretrained(path)
    return path
