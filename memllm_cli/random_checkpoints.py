"""Random MemoryLLM and M+ checkpoints in the official format, for tests and benchmarks.

The tensor names, shapes and config fields are those of the official checkpoints (see
../shared/conformance/README.md); the weights are seeded random values scaled to keep
activations well conditioned. `trained_config("main", **MEMORYLLM_8B)` is the real 8B
configuration, for timing the official computation without the real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
MEMORYLLM_8B = {  # YuWangX/memoryllm-8b's config.json, the fields that shape the computation
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
    "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 1.8125}, "num_tokens": 256,
    "num_blocks": 50, "num_memory_tokens": 12800, "bos_token_id": 128000, "eos_token_id": 128001,
    "lora_config": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": list(LORA_TARGETS),
                    "inference_mode": True},
}


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


def trained_tensors(config: dict, seed: int = 0, initialized: bool = True, *, dtype: torch.dtype = torch.float32,
                    device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    L, d = config["num_hidden_layers"], config["hidden_size"]
    inter, V = config["intermediate_size"], config["vocab_size"]
    hd = d // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    r = config["lora_config"]["r"]
    n = config["num_tokens"] * config["num_blocks"]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=dtype) * scale)

    def ones(n):
        return torch.ones(n, device=device, dtype=dtype)

    t = {
        "memory": rand(L, n, d), "bos_embedding": rand(L, 1, d), "new_memory_positional_emb": rand(1, 1, d, scale=0.5),
        "model.embed_tokens.weight": rand(V, d), "model.norm.weight": ones(d),
        "lm_head.weight": rand(V, d, scale=d ** -0.5),
    }
    if "num_ltm_blocks" not in config:
        t["initialized"] = torch.tensor(int(initialized), dtype=torch.uint8)
    shapes = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
              "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
    for i in range(L):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = ones(d)
        t[f"{p}.post_attention_layernorm.weight"] = ones(d)
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
            t[f"ltm_recall_frequencies.{i}"] = torch.full((m,), 5.0, device=device, dtype=dtype)
            t[f"ltm_ages.{i}"] = torch.arange(m, dtype=torch.float32, device=device)
    return t


def save_trained(path: Path, variant: str = "main", *, seed: int = 0, chat: bool = False,
                 initialized: bool = True, **extra) -> Path:
    """A tiny checkpoint directory: config.json, model.safetensors and a byte-level BPE
    tokenizer trained on a few sentences (with a chat template if `chat`)."""
    path.mkdir(parents=True, exist_ok=True)
    config = trained_config(variant, **extra)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(trained_tensors(config, seed, initialized), str(path / "model.safetensors"), metadata={"format": "pt"})
    tiny_tokenizer(chat).save_pretrained(path)
    return path


TOKENIZER_CORPUS = [
    "The garden coordinator is Maria Okafor. Volunteers meet every Tuesday at six.",
    "The tool shed code is 4172. The key hangs inside the shed door.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Question: who is it? Answer: it is me.\n\nA new paragraph starts here.",
    "Numbers like 1901, 42 and 3.14 appear in text; so do commas, colons and quotes.",
]


def tiny_tokenizer(chat: bool):
    """A byte-level BPE tokenizer of 300 ids ("<s>" = 0, "</s>" = 1)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TOKENIZER_CORPUS * 3, vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")
    if chat:
        tok.chat_template = (
            "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}"
        )
    return tok


def save_tiny_model(path: Path, *, seed: int = 0, layers: int = 3, hidden: int = 64) -> Path:
    """A tiny random Llama (training-free kind) with the tiny tokenizer, for long runs such
    as `memllm --model PATH bench integrity --updates 1000000`:

        python -c "from memllm_cli.random_checkpoints import save_tiny_model as s; s('tiny')"
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    path = Path(path)
    model.save_pretrained(path)
    tiny_tokenizer(chat=True).save_pretrained(path)
    return path
