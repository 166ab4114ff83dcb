"""The retention and scale curves as PNGs (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(result: dict, path: Path) -> bool:
    """A PNG of the result's curves; False when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return False
    if result.get("benchmark") == "scale":
        return _scale(plt, result, path)
    return _retention(plt, result, path)


def _retention(plt, result: dict, path: Path) -> bool:
    """The retention curve: accuracy vs k per method, with standard errors, and the survival
    probability of a written token."""
    ks = result["settings"]["ks"]
    x = list(range(len(ks)))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    markers = "osD^v<>"
    for n, (method, series) in enumerate(result["results"].items()):
        acc = [series[str(k)]["accuracy"] for k in ks]
        err = [series[str(k)]["stderr"] for k in ks]
        shift = (n - (len(result["results"]) - 1) / 2) * 0.06  # side by side where curves coincide
        ax.errorbar([i + shift for i in x], acc, yerr=err, marker=markers[n % len(markers)], capsize=3,
                    label=method)
    paper = [result["survival"][str(k)]["paper"] for k in ks]
    measured = [result["survival"][str(k)]["measured"] for k in ks]
    if any(v is not None for v in paper):
        ax.plot(x, paper, linestyle="--", color="gray", label="survival (1-K/N)^t, t = updates on a full pool")
        ax.plot(x, measured, linestyle=":", color="black", label="gold tokens still held")
    ax.set_xticks(x, [str(k) for k in ks])
    ax.set_xlabel("unrelated passages written after the gold passage (k)")
    ax.set_ylabel("accuracy / share")
    ax.set_ylim(0, 1)
    ax.set_title(f"knowledge retention, {result['environment']['model']['name']}, "
                 f"{result['settings']['questions']} NQ questions")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True



def _scale(plt, result: dict, path: Path) -> bool:
    """Four panels against the tokens ingested: ingest over a plain forward pass, disk bytes
    per token, first-token latency (median, p95), and accuracy against the gold passage in the prompt."""
    runs = result["runs"]
    x = [r["tokens"] for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), dpi=120)
    panels = [
        (axes[0][0], "ingest / plain forward", [("ingest", [r["ingest_over_plain"] for r in runs])]),
        (axes[0][1], "disk bytes per token", [("disk", [r["disk_bytes_per_token"] for r in runs])]),
        (axes[1][0], "first token (s)", [("median", [(r["first_token_s"] or {}).get("median") for r in runs]),
                                         ("p95", [(r["first_token_s"] or {}).get("p95") for r in runs])]),
        (axes[1][1], "accuracy", [("memory", [r["memory_correct"] / max(1, r["questions"]) for r in runs]),
                                  ("gold passage in the prompt",
                                   [r["prompt_correct"] / max(1, r["questions"]) for r in runs])]),
    ]
    for ax, title, series in panels:
        for label, values in series:
            ax.plot(x, values, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("tokens ingested", fontsize=8)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"memllm bench scale, {result['environment']['model']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
