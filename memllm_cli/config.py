"""Settings: command-line flags over environment variables over the config file over defaults.

    MEMLLM_HOME      where memories live (default: platformdirs' user data dir)
    MEMLLM_MEMORY    the memory to use (default: "default")
    MEMLLM_MODEL     the model to use (default: the memory's own model, else the embedded one)
    MEMLLM_CONFIG    the config file (default: <user config dir>/config.toml)
    MEMLLM_CACHE     converted models (default: platformdirs' user cache dir)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from .errors import ConfigError

APP = "memllm"
DEFAULT_MEMORY = "default"
_KEYS = {"model", "memory", "device", "dtype", "lock_timeout", "pool_size", "write_context", "gc_keep_versions",
         "read_budget", "gc_keep_long_term"}


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
    write_context: int | None = None  # for new memories; None: the whole pool
    gc_keep_versions: int | None = None  # history gc keeps per ref; None: all of it
    read_budget: int | None = None  # tokens ask reads, retrieved from pool and long-term tier; 0: the whole pool
    gc_keep_long_term: int | None = None  # tokens of the long-term tier gc keeps; None: all of it


def config_path() -> Path:
    env = os.environ.get("MEMLLM_CONFIG")
    return Path(env).expanduser() if env else Path(platformdirs.user_config_dir(APP)) / "config.toml"


def load_settings(*, memory: str | None = None, model: str | None = None, **overrides) -> Settings:
    file = _read_config(config_path())
    home = os.environ.get("MEMLLM_HOME")
    cache = os.environ.get("MEMLLM_CACHE")
    values = {
        "home": Path(home).expanduser() if home else Path(platformdirs.user_data_dir(APP)),
        "cache_dir": Path(cache).expanduser() if cache else Path(platformdirs.user_cache_dir(APP)),
        "memory": memory or os.environ.get("MEMLLM_MEMORY") or file.get("memory") or DEFAULT_MEMORY,
        "model": model or os.environ.get("MEMLLM_MODEL") or file.get("model"),
    }
    for key in ("device", "dtype", "lock_timeout", "pool_size", "write_context", "gc_keep_versions", "read_budget",
                "gc_keep_long_term"):
        if key in file:
            values[key] = file[key]
    for key in ("device", "dtype"):
        if os.environ.get(f"MEMLLM_{key.upper()}"):
            values[key] = os.environ[f"MEMLLM_{key.upper()}"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    unknown = set(data) - _KEYS
    if unknown:
        raise ConfigError(
            f"unknown key(s) in {path}: {', '.join(sorted(unknown))}",
            hint=f"known keys: {', '.join(sorted(_KEYS))}",
        )
    return data
