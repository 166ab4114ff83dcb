"""Render the tables of docs/benchmarks.md from the JSON that `memllm bench ... --out` wrote.

    python benchmarks/report.py docs/benchmarks
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def retention(r: dict) -> str:
    ks = r["settings"]["ks"]
    methods = list(r["results"])
    lines = ["| k | " + " | ".join(methods) + " | (1-K/N)^t | gold tokens held |",
             "|---" * (len(methods) + 3) + "|"]
    for k in ks:
        cells = [f"{pct(r['results'][m][str(k)]['accuracy'])} ± {pct(r['results'][m][str(k)]['stderr'])}"
                 for m in methods]
        s = r["survival"][str(k)]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {pct(s['paper'])} | {pct(s['measured'])} |")
    return "\n".join(lines)


def speed(r: dict) -> str:
    lines = ["| fill | held | ingest tok/s (x plain) | memllm first token | memllm decode tok/s | "
             "prompt tokens | prompt first token | prompt decode tok/s |", "|---" * 8 + "|"]

    def cell(side, key, digits):
        if not side or not side.get(key):
            return "-"
        v = side[key]
        return f"{v['median']:.{digits}f} ({v['min']:.{digits}f}-{v['max']:.{digits}f})"

    for run in r["runs"]:
        lines.append(
            f"| {pct(run['fill'])} | {run['held']} | "
            f"{run['ingest_tokens_per_s']:.0f} ({run['ingest_over_plain']:.2f}) | "
            f"{cell(run['memllm'], 'first_token_s', 2)} s | {cell(run['memllm'], 'decode_tokens_per_s', 1)} | "
            f"{run['prompt_tokens']} | {cell(run['prompt'], 'first_token_s', 2)} s | "
            f"{cell(run['prompt'], 'decode_tokens_per_s', 1)} |")
    return "\n".join(lines)


def integrity(r: dict) -> str:
    lines = ["| updates | pool tokens | fresh facts | within noise of U=0 | held-out perplexity (ratio) | "
             "max value norm (ratio) | mean value norm, min-max over layers |", "|---" * 7 + "|"]
    for x in r["results"]:
        a = x["retention"]
        p = x["pool"]
        lines.append(
            f"| {x['updates']} | {x['held']} | {pct(a['accuracy'])} ± {pct(a['stderr'])} | "
            f"{'yes' if x['retention_within_noise'] else 'no'} | "
            f"{x['perplexity']:.2f} ({x['perplexity_ratio']:.3f}) | "
            f"{p['max_norm']:.1f} ({x['max_norm_ratio']:.3f}) | "
            f"{p['mean_norm']['min']:.2f}-{p['mean_norm']['max']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks")
    for name, render in (("retention", retention), ("speed", speed), ("integrity", integrity)):
        path = folder / f"{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            env = result["environment"]
            print(f"### {name}\n\n{render(result)}\n")
            print(f"{result.get('seconds', '-')} s; model {env['model']['name']} (pool {env['model']['pool_size']}); "
                  f"{env['machine']['cpus']} CPUs, {env['machine']['gpu'] or 'no GPU'}; "
                  f"memllm {env['versions']['memllm']}, torch {env['versions']['torch']}, "
                  f"transformers {env['versions']['transformers']}\n")


if __name__ == "__main__":
    main()
