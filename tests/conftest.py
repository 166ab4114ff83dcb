"""Shared fixtures: an isolated home per test, and tiny random models built from a config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLLM_HOME", str(tmp_path / "home"))
    config = tmp_path / ".memllm-test" / "config.toml"  # hidden: tests ingest tmp_path's folders
    config.parent.mkdir()
    config.write_text("")  # an empty config file: the defaults
    monkeypatch.setenv("MEMLLM_CONFIG", str(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MEMLLM_MODEL", raising=False)
    monkeypatch.delenv("MEMLLM_MEMORY", raising=False)
    return tmp_path / "home"


def tiny_config(kind: str = "llama", **extra):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )
    base.update(extra)
    if kind == "llama":
        return LlamaConfig(**base)
    if kind == "qwen2":
        return Qwen2Config(**base)
    if kind == "mistral":
        return MistralConfig(**{"sliding_window": None, **base})
    if kind == "gemma2":  # sliding-window layers interleaved with global ones
        from transformers import Gemma2Config

        return Gemma2Config(**{"sliding_window": 64, "head_dim": 16, **base})
    raise ValueError(kind)


def tiny_model(kind: str = "llama", seed: int = 0, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, **extra)).eval()


def _tokenizer(chat: bool):
    from memllm_cli.random_checkpoints import tiny_tokenizer

    return tiny_tokenizer(chat)


def save_tiny(path: Path, kind: str = "llama", seed: int = 0, chat: bool = True) -> Path:
    model = tiny_model(kind, seed)
    model.generation_config.eos_token_id = None  # random weights: generate the full length
    model.save_pretrained(path)
    _tokenizer(chat).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer and a chat template, on disk."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory) -> Path:
    """Same shapes as tiny_dir, other weights: a different model."""
    return save_tiny(tmp_path_factory.mktemp("tiny-other"), seed=1)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 without a chat template (a base model)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), kind="qwen2", chat=False)


@pytest.fixture
def env_model(monkeypatch, tiny_dir):
    monkeypatch.setenv("MEMLLM_MODEL", str(tiny_dir))
    return tiny_dir


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
