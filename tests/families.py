"""The decoder families memllm reads exactly, or refuses, as tiny random models.

Each family is built from the public `config.json` of one real checkpoint (tests/fixtures/
configs/, configs only) with its layers and widths shrunk, so the tests exercise the options
users' models have (rope scaling dicts, head_dim overrides, tied embeddings, layer types,
partial rotary, sliding windows); a few more families come from their config class's
defaults. tests/test_families.py checks each one, benchmarks/families.py measures the
parity errors, and docs/models.md is checked against this table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
VOCAB = 320
WINDOW = 16  # sliding windows shrink to this, below the tests' chunk lengths


@dataclass(frozen=True)
class Family:
    name: str  # as docs/models.md names it
    source: str  # a fixture (hub id with "/" as "--") or "defaults:<model_type>"
    refused: str | None = None  # a pattern of the load-time refusal, for families memllm refuses
    layers: int = 4

    def raw(self) -> dict:
        if self.source.startswith("defaults:"):
            from transformers import AutoConfig

            return AutoConfig.for_model(self.source.removeprefix("defaults:")).to_dict()
        return json.loads((CONFIGS / f"{self.source.replace('/', '--')}.json").read_text())


FAMILIES = [
    Family("Llama 3.2 (llama3 rope scaling)", "meta-llama/Llama-3.2-1B-Instruct"),
    Family("SmolLM2", "HuggingFaceTB/SmolLM2-360M-Instruct"),
    Family("SmolLM3 (layers without positions)", "HuggingFaceTB/SmolLM3-3B"),
    Family("Qwen2.5", "Qwen/Qwen2.5-0.5B-Instruct"),
    Family("Qwen3", "Qwen/Qwen3-0.6B"),
    Family("Qwen3-MoE", "Qwen/Qwen3-30B-A3B"),
    Family("Mistral (sliding window)", "mistralai/Mistral-7B-v0.1"),
    Family("Mixtral", "mistralai/Mixtral-8x7B-Instruct-v0.1"),
    Family("Gemma 2 (interleaved sliding window, soft-capping)", "google/gemma-2-2b-it"),
    Family("Gemma 3 (local and global rotary)", "google/gemma-3-1b-it", layers=6),
    Family("Phi-3 (sliding window)", "microsoft/Phi-3-mini-4k-instruct"),
    Family("Phi-4-mini (partial rotary, longrope)", "microsoft/Phi-4-mini-instruct"),
    Family("Phi-2 (partial rotary)", "microsoft/phi-2"),
    Family("StableLM 2 (partial rotary)", "stabilityai/stablelm-2-1_6b"),
    Family("GPT-NeoX / Pythia (partial rotary)", "EleutherAI/pythia-160m"),
    Family("OLMo 2", "allenai/OLMo-2-0425-1B"),
    Family("Granite 3 (multipliers)", "ibm-granite/granite-3.3-2b-instruct"),
    Family("Command R7B (interleaved rotary, global layers without positions)",
           "CohereForAI/c4ai-command-r7b-12-2024"),
    # more transformers decoders, from their config classes' defaults
    Family("OLMo 3 (interleaved sliding window)", "defaults:olmo3"),
    Family("EXAONE 4 (global layers without positions)", "defaults:exaone4"),
    Family("gpt-oss (attention sinks, MoE)", "defaults:gpt_oss"),
    Family("Gemma", "defaults:gemma"),
    Family("Cohere Command R (interleaved rotary)", "defaults:cohere"),
    Family("GLM", "defaults:glm"),
    Family("GLM-4", "defaults:glm4"),
    Family("StarCoder2", "defaults:starcoder2"),
    Family("Qwen2-MoE", "defaults:qwen2_moe"),
    Family("Granite MoE", "defaults:granitemoe"),
    Family("Seed-OSS", "defaults:seed_oss"),
    Family("Apertus", "defaults:apertus"),
    Family("Arcee", "defaults:arcee"),
    Family("ERNIE 4.5", "defaults:ernie4_5"),
    Family("Falcon (rotary)", "defaults:falcon"),
    # refused at load, with one line saying why
    Family("DeepSeek-V3 (multi-head latent attention)", "defaults:deepseek_v3", refused="latent attention"),
    Family("Qwen3-Next (linear attention layers)", "defaults:qwen3_next", refused="not attention"),
    Family("GPT-2 (absolute positions)", "defaults:gpt2", refused="rotary positions"),
    Family("Llama 4 text (chunked attention)", "defaults:llama4_text", refused="rotary positions"),
]


def shrink(raw: dict, layers: int) -> dict:
    """The same options at test size: 4-6 layers, 64 wide, 4 heads, a 320-token vocabulary."""
    drop = ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "id2label", "label2id")
    cfg = {k: v for k, v in raw.items() if k not in drop}
    heads = 4
    kv = heads if raw.get("num_key_value_heads", heads) == raw.get("num_attention_heads", heads) else 2
    cfg.update(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, bos_token_id=None, eos_token_id=None,
               pad_token_id=None, use_cache=True)
    if "head_dim" in raw:  # an override that differs from hidden / heads, as real ones often do
        cfg["head_dim"] = 24
    for key in ("moe_intermediate_size",):
        if key in raw:
            cfg[key] = 32
    for key, small in (("num_experts", 4), ("num_local_experts", 4), ("num_experts_per_tok", 2)):
        if key in raw:
            cfg[key] = small
    window = raw.get("sliding_window")
    if window and (window < raw.get("max_position_embeddings", 1 << 30) or "sliding_attention" in
                   (raw.get("layer_types") or [])):
        cfg["sliding_window"] = WINDOW
    for key in ("layer_types", "no_rope_layers"):
        if key in raw:
            cfg[key] = raw[key][:layers]
    scaling = raw.get("rope_scaling")
    if isinstance(scaling, dict) and "short_factor" in scaling:  # longrope: one factor per rotary pair
        head_dim = cfg.get("head_dim", 64 // heads)
        pairs = int(head_dim * raw.get("partial_rotary_factor", 1.0)) // 2
        cfg["rope_scaling"] = {**scaling, "short_factor": scaling["short_factor"][:pairs],
                               "long_factor": scaling["long_factor"][:pairs]}
    return cfg


def build(family: Family, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The family's tiny random model, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = family.raw()
    config = AutoConfig.for_model(**shrink(raw, family.layers))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
