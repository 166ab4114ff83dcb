"""memllm: a language model with a latent memory that keeps learning (MemoryLLM)."""

# the one place the version is written: pyproject.toml reads it (importlib.metadata took a
# fifth of the CLI client's start)
__version__ = "0.1.0"
