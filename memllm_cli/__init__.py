"""memllm: a language model with a latent memory that keeps learning (MemoryLLM)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memllm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
