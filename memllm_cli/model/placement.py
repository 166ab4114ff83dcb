"""Where a checkpoint's parts go: one device, or an accelerate device map over several GPUs,
after checking that the tensors fit in the memory available."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from ..errors import ModelError


class Layered(Protocol):
    """What placement needs of a checkpoint's config (official.Config has it): its layer count."""

    layers: int


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


def use_threads(count: int) -> int:
    """Compute with `count` CPU threads from now on (cpus.threads decides how many)."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def plan_devices(config: Layered, shapes: dict[str, list[int]], dtype: torch.dtype, device: str) -> dict[str, str]:
    """Device of each checkpoint part: "model.embed_tokens", "model.layers.{i}" (with the
    layer's memory rows), "model.norm", "lm_head" and "bos_embedding".

    "cpu", "cuda", "cuda:N": everything there. "auto": the CPU without a GPU, the GPU with
    one, and with several an accelerate device map that balances whole layers over them."""
    parts = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(config.layers)), "model.norm", "lm_head"]
    if device == "auto":
        count = torch.cuda.device_count()
        device = "cpu" if count == 0 else "cuda:0" if count == 1 else "map"
    if device != "map":
        try:
            torch.device(device)
        except RuntimeError:
            raise ModelError(f"unknown device {device!r}", hint="use cpu, cuda, cuda:N or auto") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"device {device} was asked for, but no CUDA GPU is available")
        return {part: device for part in parts}
    return accelerate_map(config, shapes, dtype)


def accelerate_map(config: Layered, shapes: dict[str, list[int]], dtype: torch.dtype,
                   max_memory: dict | None = None) -> dict[str, str]:
    """accelerate's balanced device map over a weightless skeleton of the checkpoint, in which
    each layer owns its memory rows (and long-term rows), so a layer is never split."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory

    class Layer(torch.nn.Module):
        pass

    root = torch.nn.Module()
    with init_empty_weights():
        for name, shape in shapes.items():
            if name == "memory":
                for i in range(config.layers):
                    _attach(root, f"model.layers.{i}.memory_rows", shape[1:], dtype, Layer)
            elif name.split(".")[0] in ("ltm", "ltm_keys", "ltm_recall_frequencies", "ltm_ages"):
                _attach(root, f"model.layers.{name.split('.')[1]}.{name.split('.')[0]}", shape, dtype, Layer)
            elif name not in ("initialized", "bos_embedding", "new_memory_positional_emb"):
                _attach(root, name, shape, dtype, Layer)
    max_memory = max_memory or get_balanced_memory(root, dtype=dtype, no_split_module_classes=["Layer"])
    found = infer_auto_device_map(root, max_memory=max_memory, no_split_module_classes=["Layer"], dtype=dtype)
    out = {}
    for part in ["model.embed_tokens", *(f"model.layers.{i}" for i in range(config.layers)), "model.norm", "lm_head"]:
        where = next((d for prefix, d in sorted(found.items(), key=lambda kv: -len(kv[0]))
                      if part == prefix or part.startswith(prefix + ".") or prefix == ""), "cpu")
        if where == "disk":
            raise ModelError("the checkpoint does not fit in GPU and CPU memory together")
        out[part] = f"cuda:{where}" if isinstance(where, int) else str(where)
    return out


def _attach(root: torch.nn.Module, name: str, shape, dtype: torch.dtype, layer_class) -> None:
    *path, leaf = name.split(".")
    module = root
    for depth, part in enumerate(path):
        if not hasattr(module, part):
            is_layer = depth == 2 and path[:2] == ["model", "layers"]
            module.add_module(part, layer_class() if is_layer else torch.nn.Module())
        module = getattr(module, part)
    module.register_parameter(leaf, torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))
