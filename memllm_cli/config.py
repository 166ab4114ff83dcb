"""Settings: command-line flags over environment variables over the config file over defaults.

    MEMLLM_HOME      where memories live (default: platformdirs' user data dir)
    MEMLLM_MEMORY    the memory to use (default: "default")
    MEMLLM_MODEL     the model to use (default: the memory's own model, else the embedded one)
    MEMLLM_DEVICE    cpu, cuda, cuda:N or auto
    MEMLLM_DTYPE     float32, bfloat16 or float16
    MEMLLM_CONFIG    the config file (default: <user config dir>/config.toml)
    MEMLLM_CACHE     converted models (default: platformdirs' user cache dir)
    MEMLLM_THREADS   CPU threads to compute with (default: the usable CPUs nothing else is busy on)

The config file's keys are the fields of `Settings` (but home and cache_dir); each value is
checked against its field's type when the file is read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from . import cpus
from .errors import ConfigError

APP = "memllm"
DEFAULT_MEMORY = "default"


@dataclass(frozen=True)
class Settings:
    home: Path
    cache_dir: Path
    memory: str
    model: str | None  # None: the memory's own model, else the embedded default
    device: str = "cpu"
    dtype: str | None = None
    lock_timeout: float = 600.0  # seconds a writer waits for another writer of the same memory
    pool_size: int | None = None  # for new memories; None: the model's default
    write_context: int | None = None  # for new memories; None: the default (docs/design.md)
    block_format: str | None = None  # how new blocks store keys and values (_CHOICES); None: the default
    write_scope: str | None = None  # for new memories: what a chunk is written after (_CHOICES); None: "document"
    gc_keep_versions: int | None = None  # history gc keeps per ref; None: all of it
    read_budget: int | None = None  # tokens ask reads, retrieved from pool and long-term tier; 0: the whole pool
    gc_keep_long_term: int | None = None  # tokens of the long-term tier gc keeps; None: all of it
    max_disk: int | None = None  # bytes a memory may take ("1GB" in the file); beyond, old blocks keep only their ids
    threads: int | None = None  # CPU threads torch computes with; None: the usable CPUs nobody else uses (cpus.py)


ENVIRONMENT = {"memory": "MEMLLM_MEMORY", "model": "MEMLLM_MODEL", "device": "MEMLLM_DEVICE", "dtype": "MEMLLM_DTYPE"}
_TYPES = typing.get_type_hints(Settings)
KEYS = tuple(f.name for f in dataclasses.fields(Settings) if f.name not in ("home", "cache_dir"))
_NON_NEGATIVE = {"lock_timeout", "write_context", "read_budget", "gc_keep_long_term"}
_POSITIVE = {"pool_size", "gc_keep_versions", "threads"}
# a memory's (and a snapshot's) name: a folder name on every system (the store checks it; the
# CLI's server client too, before a name goes into a URL)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# memory/codec.py FORMATS (no torch here)
_CHOICES = {"block_format": ("float16", "int8", "int4", "int4-s8", "int4-s8-zstd"),
            "write_scope": ("document", "pool")}  # memory/free.py WRITE_SCOPES
_SIZES = {"max_disk"}  # bytes, or a string with a unit: "1GB", "500 MiB"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: object) -> int:
    """Bytes from 1000000, "1GB", "1.5 GiB" or "500mb" (decimal units, binary with an i);
    ValueError otherwise."""
    if isinstance(text, float) and text.is_integer():
        text = int(text)
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size must be >= 0, not {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a size (a whole number of bytes, or with a unit: 500MB, 1GB, 2GiB)")
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size (write it as 500MB, 1GB or 2GiB)")
    if unit in ("", "b") and "." in match.group(1):
        raise ValueError(f"{text!r} is not a size: without a unit it is bytes, a whole number (or write 1.5GB)")
    return int(float(match.group(1)) * _UNITS[unit])


def config_path() -> Path:
    env = os.environ.get("MEMLLM_CONFIG")
    return Path(env).expanduser() if env else Path(platformdirs.user_config_dir(APP)) / "config.toml"


def load_settings(*, memory: str | None = None, model: str | None = None, **overrides) -> Settings:
    path = config_path()
    if os.environ.get("MEMLLM_CONFIG") and not path.exists():  # named on purpose: a typo must not pass
        raise ConfigError(f"MEMLLM_CONFIG names {path}, which does not exist",
                          hint="create it, or unset MEMLLM_CONFIG to use the default")
    file = _read_config(path)
    home = os.environ.get("MEMLLM_HOME")
    cache = os.environ.get("MEMLLM_CACHE")
    values: dict = {
        "home": _folder("MEMLLM_HOME", Path(home).expanduser()) if home else Path(platformdirs.user_data_dir(APP)),
        "cache_dir": _folder("MEMLLM_CACHE", Path(cache).expanduser()) if cache else
        Path(platformdirs.user_cache_dir(APP)),
        "memory": DEFAULT_MEMORY,
        "model": None,
    }
    values.update(file)
    values.update({key: os.environ[var] for key, var in ENVIRONMENT.items() if os.environ.get(var)})
    try:
        if (threads := cpus.from_environment()) is not None:
            values["threads"] = threads
    except ValueError as err:
        raise ConfigError(str(err)) from None
    values.update({k: v for k, v in {"memory": memory, "model": model, **overrides}.items() if v is not None})
    return Settings(**values)


def private_folder(path: Path) -> Path:
    """Make `path` and any missing folder above it user-only (0700); folders that exist are
    left as they are (the user's own, or /tmp)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by another process
        folder.chmod(0o700)  # whatever the umask
    return path


def _folder(variable: str, path: Path) -> Path:
    """A folder named by an environment variable, which may not exist yet, but whose nearest
    existing ancestor must be a folder (MEMLLM_HOME=/etc/passwd/x can never hold memories)."""
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                raise ConfigError(f"{variable}={path}: {place} is not a folder",
                                  hint=f"point {variable} at a folder (it is created if missing)")
            return path
    return path


def _read_config(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory", hint="point MEMLLM_CONFIG at a TOML file")
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    unknown = set(data) - set(KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in {path}: {', '.join(sorted(unknown))}",
            hint=f"known keys: {', '.join(sorted(KEYS))}",
        )
    return {key: _checked(path, key, value) for key, value in data.items()}


def _checked(path: Path, key: str, value):
    """The value, if it has the type of the setting (an int for a float setting is fine)."""
    if key in _SIZES:
        try:
            return parse_size(value)
        except ValueError as err:
            raise ConfigError(f"{path}: {key}: {err}") from None
    allowed = typing.get_args(_TYPES[key]) if isinstance(_TYPES[key], types.UnionType) else (_TYPES[key],)
    allowed = tuple(t for t in allowed if t is not type(None))
    ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in allowed) or (
        float in allowed and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        wanted = " or ".join({int: "an integer", float: "a number", str: "a string"}[t] for t in allowed)
        raise ConfigError(f"{path}: {key} must be {wanted}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: {key} must be a finite number, not {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{path}: {key} must be one of {', '.join(_CHOICES[key])}, not {value!r}")
    if key in _POSITIVE and value < 1 or key in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{path}: {key} must be {'>= 1' if key in _POSITIVE else '>= 0'}, not {value!r}")
    return float(value) if float in allowed and not isinstance(value, str) else value
