"""Models people already have on disk: GGUF files from llama.cpp, and ollama's model store."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from memllm_cli.errors import ModelError
from memllm_cli.model.loading import embedded_gguf, gguf_architecture, gguf_architectures, load_model, resolve


def write_gguf(path, architecture: str):
    """A GGUF file with metadata only (no tensors): enough for what memllm reads before converting."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def ollama_store(root, name: str, tag: str, blob_source) -> None:
    """An ollama models folder holding one model, laid out as ollama lays it out."""
    data = blob_source.read_bytes() if not blob_source.is_symlink() else None
    digest = hashlib.sha256(data or blob_source.name.encode()).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    blob = root / "blobs" / f"sha256-{digest}"
    if data is None:
        blob.symlink_to(blob_source.resolve())
    else:
        blob.write_bytes(data)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.license", "digest": "sha256:" + "0" * 64},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"},
    ]}))


def test_the_architecture_is_read_from_the_header_alone(tmp_path):
    assert gguf_architecture(embedded_gguf()) == "llama"
    assert gguf_architecture(write_gguf(tmp_path / "m.gguf", "qwen3moe")) == "qwen3_moe"  # llama.cpp's spelling
    assert {"llama", "qwen3", "gemma3", "phi3", "mistral"} <= set(gguf_architectures())
    assert "mamba" not in gguf_architectures()


@pytest.mark.parametrize("architecture, text", [
    ("rwkv7", "architecture 'rwkv7', which transformers cannot read"),
    ("mamba", "mamba model (no attention layers): a memory cannot hold its state exactly"),
])
def test_a_gguf_model_memllm_cannot_read_is_refused_before_converting(tmp_path, architecture, text):
    path = write_gguf(tmp_path / f"{architecture}.gguf", architecture)
    with pytest.raises(ModelError, match=re.escape(text)) as err:
        load_model(str(path), cache_dir=tmp_path / "cache")
    assert "llama" in err.value.hint and "qwen3" in err.value.hint  # the list of those it reads
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_an_ollama_model_by_name_and_by_blob(tmp_path, monkeypatch):
    store = tmp_path / "ollama"
    ollama_store(store, "rwkv", "7b", write_gguf(tmp_path / "r.gguf", "rwkv7"))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    name, blob = resolve("ollama:rwkv:7b")
    assert name == "ollama:rwkv:7b" and blob.parent == store / "blobs" and blob.name.startswith("sha256-")
    assert resolve(str(blob))[1] == blob.resolve()  # a blob named by path: no .gguf suffix, found by its magic
    with pytest.raises(ModelError, match="transformers cannot read"):
        load_model("ollama:rwkv:7b", cache_dir=tmp_path / "cache")
    with pytest.raises(ModelError, match="no ollama model rwkv:latest") as err:
        resolve("ollama:rwkv")
    assert "ollama pull rwkv" in err.value.hint
    with pytest.raises(ModelError, match="not an ollama model name"):
        resolve("ollama:../../etc:x")
    (store / "manifests" / "registry.ollama.ai" / "library" / "rwkv" / "7b").write_text("{damaged")
    with pytest.raises(ModelError, match="damaged"):
        resolve("ollama:rwkv:7b")


@pytest.mark.slow
def test_the_embedded_model_through_an_ollama_store_is_the_same_model(tmp_path):
    """Converted once like the embedded file; same weights, so the same fingerprint: a memory
    written with one opens with the other."""
    store = tmp_path / "ollama"
    link = tmp_path / "smollm2.gguf"
    link.symlink_to(embedded_gguf())
    ollama_store(store, "smollm2", "135m", link)
    # a cache of its own (the blob's conversion stays out of the shared one), holding the
    # embedded model's shared conversion by a link
    from memllm_cli.config import load_settings
    from memllm_cli.model.loading import _converted_gguf

    embedded = _converted_gguf(embedded_gguf(), load_settings().cache_dir)
    (tmp_path / "cache" / "models").mkdir(parents=True)
    (tmp_path / "cache" / "models" / embedded.name).symlink_to(embedded)
    env = {**os.environ, "OLLAMA_MODELS": str(store), "MEMLLM_CACHE": str(tmp_path / "cache")}

    def run(*args, stdin=b""):
        return subprocess.run([sys.executable, "-m", "memllm_cli", *args], input=stdin, capture_output=True, env=env,
                              timeout=600)

    out = run("--model", "ollama:smollm2:135m", "ingest", "-", stdin=b"The shed code is 4172.\n")
    assert out.returncode == 0, out.stderr.decode()
    answer = run("--model", "embedded", "ask", "--json", "--max-tokens", "8", "What is the shed code?")
    assert answer.returncode == 0, answer.stderr.decode()
    assert json.loads(answer.stdout)["model"] == "smollm2-135m-instruct"
