"""The retention curve as a PNG (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path


def plot(result: dict, path: Path) -> bool:
    """A PNG of the retention curve (accuracy vs k per method, with standard errors, and the
    survival probability of a written token); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
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

