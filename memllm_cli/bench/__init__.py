"""memllm bench: the paper's measurements (protocols), the real subject, the plot."""

from .plot import plot
from .protocols import (
    CHUNK_TOKENS,
    DEFAULT_KS,
    DEFAULTS,
    DEV_ROWS,
    METHODS,
    Data,
    Subject,
    accuracy,
    bm25_top,
    integrity,
    load_data,
    pack,
    parse_rows,
    peak_rss,
    retention,
    speed,
    unrelated,
)
from .scale import DEFAULT_SIZES, scale
from .subject import ServiceSubject, environment

__all__ = ["CHUNK_TOKENS", "DEFAULTS", "DEFAULT_KS", "DEFAULT_SIZES", "DEV_ROWS", "METHODS", "Data", "ServiceSubject",
           "Subject",
           "accuracy", "bm25_top", "environment", "integrity", "load_data", "pack", "parse_rows", "peak_rss", "plot",
           "retention", "scale", "speed", "unrelated"]
