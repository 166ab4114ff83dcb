"""memllm bench: retention, speed and integrity, rendered as tables (or JSON, or files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .app import app, service
from .render import disk_size, emit, err, progress_for, show, size, table

bench_app = typer.Typer(
    help="The MemoryLLM paper's measurements on local data, with baselines: retention, speed, integrity.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")

DataOption = Annotated[
    Path | None,
    typer.Option("--data", envvar="MEMLLM_BENCH_DATA", help="NQ-open with gold passages (.jsonl or .jsonl.gz), "
                 "as ../shared/data/nq-open-oracle.jsonl.gz [env: MEMLLM_BENCH_DATA]; never downloaded."),
]
RowsOption = Annotated[str, typer.Option("--rows", help="Rows of the data to draw from (0-based, inclusive); "
                                         "rows 2000 and up of nq-open-oracle are reserved for acceptance.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for drawing questions and distractors.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the full result as JSON.")]
OutOption = Annotated[Path | None, typer.Option("--out", help="Also write NAME.json (and NAME.png) in this folder.")]
TokensOption = Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens generated per answer.")]


def _bench(ctx: typer.Context, name: str, run, *, data: Path | None, rows: str, out: Path | None,
           max_tokens: int, base_memory: str | None = None, keep: bool = False, **settings) -> dict:
    from .. import bench

    dataset = bench.load_data(data, bench.parse_rows(rows))
    subject = bench.ServiceSubject(service(ctx, **settings), max_new_tokens=max_tokens, base_memory=base_memory,
                                   keep_memory=keep)
    progress = progress_for(False, False, "steps")
    result = run(bench, subject, dataset, progress)
    result["environment"] = bench.environment(subject)
    result["settings"]["max_new_tokens"] = max_tokens
    result["settings"].update({k: v for k, v in settings.items() if v is not None})
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
        if name in ("retention", "scale") and not bench.plot(result, out / f"{name}.png"):
            err("memllm: no plot: matplotlib is not installed (pip install matplotlib)")
    return result


@bench_app.command("retention")
def bench_retention(
    ctx: typer.Context,
    data: DataOption = None,
    rows: RowsOption = "0-1999",
    questions: Annotated[int, typer.Option("--questions", min=1, help="Questions (one memory each).")] = 10,
    k: Annotated[list[int] | None, typer.Option("--k", help="Unrelated passages after the gold one; repeat "
                                                "(default 0 1 2 5 10 20 50).")] = None,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: memllm (reading within the budget), "
                                         "pool (the whole pool), prompt, bm25, closed-book.")]
    = "memllm,pool,prompt,bm25,closed-book",
    bm25_budget: Annotated[int, typer.Option("--bm25-budget", min=1, help="Prompt tokens of BM25's top chunks.")]
    = 1024,
    from_memory: Annotated[str | None, typer.Option("--from-memory", help="Start each question from this stored "
                                                    "memory (a copy; it is not changed) instead of an empty one.")]
    = None,
    seed: SeedOption = 0,
    max_tokens: TokensOption = 32,
    as_json: JsonOption = False,
    out: OutOption = None,
) -> None:
    """Knowledge retention (the paper's protocol): write a question's gold passage, then k
    unrelated passages in updates of up to 512 tokens, then ask; beside the prompt, BM25 and
    closed-book baselines. Accuracy with its standard error per k.

    Examples:
      memllm bench retention --data nq-open-oracle.jsonl.gz
      memllm bench retention --data nq.jsonl.gz --questions 50 --k 0 --k 10 --out results/
    """
    from .. import bench as b

    ks = k or list(b.DEFAULT_KS)
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    result = _bench(ctx, "retention", lambda bench, subject, dataset, progress: bench.retention(
        subject, dataset, questions=questions, seed=seed, ks=ks, methods=chosen, bm25_budget=bm25_budget,
        progress=progress), data=data, rows=rows, out=out, max_tokens=max_tokens,
        base_memory=from_memory)
    emit(result, as_json, lambda: _retention_table(result))


@bench_app.command("speed")
def bench_speed(
    ctx: typer.Context,
    data: DataOption = None,
    rows: RowsOption = "0-1999",
    questions: Annotated[int, typer.Option("--questions", min=1, help="Asks per fill (after one warm-up).")] = 3,
    seed: SeedOption = 0,
    max_tokens: TokensOption = 32,
    as_json: JsonOption = False,
    out: OutOption = None,
) -> None:
    """Speed: ingest tokens/s against a plain forward pass, and time to first token and
    decode tokens/s at 25, 50 and 100% of the pool beside the prompt holding the same text;
    peak RSS; disk bytes per memory token. Medians and spreads.

    Examples:
      memllm bench speed --data nq-open-oracle.jsonl.gz
    """
    result = _bench(ctx, "speed", lambda bench, subject, dataset, progress: bench.speed(
        subject, dataset, questions=questions, seed=seed, progress=progress),
        data=data, rows=rows, out=out, max_tokens=max_tokens)
    emit(result, as_json, lambda: _speed_table(result))


@bench_app.command("integrity")
def bench_integrity(
    ctx: typer.Context,
    data: DataOption = None,
    rows: RowsOption = "0-1999",
    questions: Annotated[int, typer.Option("--questions", min=1, help="Fresh facts written and asked.")] = 20,
    updates: Annotated[int, typer.Option("--updates", min=1, help="Updates of unrelated text (one passage each).")]
    = 1000,
    seed: SeedOption = 0,
    max_tokens: TokensOption = 32,
    as_json: JsonOption = False,
    out: OutOption = None,
) -> None:
    """Integrity after many updates (the paper's "no degradation"): fresh-fact retention,
    held-out perplexity and per-layer pool statistics at U = 0, 10, 100, ... updates.

    Examples:
      memllm bench integrity --data nq-open-oracle.jsonl.gz
      memllm --model ./tiny-random bench integrity --data nq.jsonl.gz --updates 1000000
    """
    result = _bench(ctx, "integrity", lambda bench, subject, dataset, progress: bench.integrity(
        subject, dataset, questions=questions, seed=seed, updates=updates, progress=progress),
        data=data, rows=rows, out=out, max_tokens=max_tokens)
    emit(result, as_json, lambda: _integrity_table(result))


@bench_app.command("scale")
def bench_scale(
    ctx: typer.Context,
    data: DataOption = None,
    rows: RowsOption = "0-1999",
    sizes: Annotated[list[int] | None, typer.Option("--size", min=1, help="Tokens to grow the memory to and measure "
                                                    "at; repeat (default 10000 100000 1000000).")] = None,
    questions: Annotated[int, typer.Option("--questions", min=1, help="Gold questions asked at each size (all "
                                           "there are, where fewer).")] = 200,
    seed: SeedOption = 0,
    max_tokens: TokensOption = 32,
    max_disk: Annotated[str | None, typer.Option("--max-disk", metavar="SIZE", help="The memory's disk budget "
                                                 "(1GB): evicted blocks are recomputed when read.")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the grown memory (its home is printed) to ask "
                                       "it more: MEMLLM_HOME=that memllm -m scale ask ...")] = False,
    as_json: JsonOption = False,
    out: OutOption = None,
) -> None:
    """Scale: grow one stored memory of note-sized files (NQ passages among filler notes of
    real text) to each size, and report there ingest tokens/s against a plain forward pass,
    disk bytes per token, resident memory, ask first-token latency (median, p95) and the
    accuracy of the gold questions against the gold passage alone in the prompt. The memory
    lives in a temporary folder (under $MEMLLM_BENCH_DIR if set) and is removed after,
    unless --keep.

    Examples:
      memllm bench scale --data nq-open-oracle.jsonl.gz --out results/
      memllm bench scale --data nq.jsonl.gz --size 10000 --size 100000 --questions 20
    """
    chosen = sorted(sizes or [])
    result = _bench(ctx, "scale", lambda bench, subject, dataset, progress: bench.scale(
        subject, dataset, sizes=chosen or bench.DEFAULT_SIZES, questions=questions, seed=seed, progress=progress),
        data=data, rows=rows, out=out, max_tokens=max_tokens, keep=keep, max_disk=disk_size(max_disk))
    emit(result, as_json, lambda: _scale_table(result))
    if keep and result.get("memory_home"):
        err(f"memllm: the memory is kept: MEMLLM_HOME={result['memory_home']} memllm -m scale status")


def _scale_table(result: dict) -> None:
    rows = table("tokens", "ingest tok/s", "x plain", "disk B/token", "disk", "RSS", "first token (median, p95)",
                 "memory / prompt correct", "read own note",
                 title=f"memllm bench scale, {result['environment']['model']['name']}")
    for r in result["runs"]:
        first = r["first_token_s"] or {}
        rows.add_row(f"{r['tokens']:,}", f"{r['ingest_tokens_per_s'] or 0:.0f}", f"{r['ingest_over_plain'] or 0:.2f}",
                     f"{r['disk_bytes_per_token']:,.0f}", size(r["disk_bytes"]),
                     size(r["rss_bytes"]) if r["rss_bytes"] else "-",
                     f"{first.get('median', 0):.2f} s, {first.get('p95', 0):.2f} s",
                     f"{r['memory_correct']}/{r['prompt_correct']} of {r['questions']}",
                     "-" if r.get("read_gold") is None else f"{r['read_gold']} of {r['questions']}")
    show(rows)
    print(f"{result['seconds']:.0f} s; data {result['data']['path']} rows {result['data']['rows']}")


def _retention_table(result: dict) -> None:
    settings, model = result["settings"], result["environment"]["model"]
    rows = table("k", *result["results"], "(1-K/N)^t", "gold held",
                 title=f"knowledge retention: {settings['questions']} questions, model {model['name']}, "
                       f"pool {model['pool_size']}")
    for k in settings["ks"]:
        cells = [f"{r[str(k)]['accuracy']:.0%} ± {r[str(k)]['stderr']:.0%}" for r in result["results"].values()]
        survival = result["survival"][str(k)]
        rows.add_row(str(k), *cells, *(f"{survival[n]:.0%}" if survival[n] is not None else "-"
                                        for n in ("paper", "measured")))
    show(rows)
    if settings.get("methods_not_supported"):
        err(f"memllm: not measured for this model: {', '.join(settings['methods_not_supported'])}")
    print(f"{result['seconds']:.0f} s; data {result['data']['path']} rows {result['data']['rows']}; "
          f"scorer {result['scorer']}")


def _speed_table(result: dict) -> None:
    print(f"plain forward {result['plain_forward_tokens_per_s']:.0f} tokens/s; ingest "
          f"{result['ingest_tokens_per_s']:.0f} tokens/s ({result['ingest_over_plain']:.2f}x); peak RSS "
          f"{size(result['peak_rss_bytes'])}; disk {result['disk_bytes_per_token'] or '-'} B per memory token")
    rows = table("fill", "held", "ingest tok/s", "memllm first token", "memllm decode tok/s", "prompt first token",
                 "prompt decode tok/s")

    def cell(side, key, fmt):
        value = (side or {}).get(key)
        return fmt.format(value["median"]) + f" ({fmt.format(value['min'])}-{fmt.format(value['max'])})" \
            if value else "-"

    for r in result["runs"]:
        rows.add_row(f"{r['fill']:.0%}", str(r["held"]), f"{r['ingest_tokens_per_s'] or 0:.0f}",
                     cell(r["memllm"], "first_token_s", "{:.2f}"), cell(r["memllm"], "decode_tokens_per_s", "{:.1f}"),
                     cell(r["prompt"], "first_token_s", "{:.2f}"), cell(r["prompt"], "decode_tokens_per_s", "{:.1f}"))
    show(rows)


def _integrity_table(result: dict) -> None:
    rows = table("updates", "held", "fresh facts", "within noise", "perplexity", "ratio", "max norm", "ratio")
    for r in result["results"]:
        acc = r["retention"]
        rows.add_row(str(r["updates"]), str(r["held"]), f"{acc['accuracy']:.0%} ± {acc['stderr']:.0%}",
                     "yes" if r["retention_within_noise"] else "no", f"{r['perplexity']:.2f}",
                     f"{r['perplexity_ratio']:.3f}", f"{r['pool']['max_norm']:.1f}", f"{r['max_norm_ratio']:.3f}")
    show(rows)
    print(f"{result['seconds']:.0f} s; data {result['data']['path']} rows {result['data']['rows']}")


