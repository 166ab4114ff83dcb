"""The store: memories as content-addressed files (tensors and JSON only; it knows no model)."""

from .repo import FORMAT, Repo, Store, Verification

__all__ = ["FORMAT", "Repo", "Store", "Verification"]
