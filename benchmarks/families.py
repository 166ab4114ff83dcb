"""Parity errors per decoder family, and the window and default pool each real model gets.

    python benchmarks/families.py --json docs/benchmarks/families.json --docs docs/models.md

For each family in tests/families.py, on its tiny random model (float32, the real
checkpoint's config.json shrunk): the largest absolute logit difference of the four parity
checks (empty memory vs the plain model, a chunk in memory vs in the prompt, sequential
writes vs one long prompt, a chunk written at another position vs in the prompt) and whether
greedy generation equals `generate()`. For the real checkpoint's config (built on the meta
device: no weights), the positions a pool may use, the sliding window and the default pool
size. --docs rewrites the table in docs/models.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memllm_cli.errors import ModelError  # noqa: E402
from memllm_cli.memory.free import ANSWER_RESERVE, DEFAULT_POOL_SIZE  # noqa: E402
from memllm_cli.model.engine import Layout, MemoryModel  # noqa: E402
from tests.families import FAMILIES, VOCAB, Family, build  # noqa: E402

BEGIN, END = "<!-- families: begin (benchmarks/families.py writes this table) -->", "<!-- families: end -->"


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def parity(family: Family) -> dict:
    model = build(family)
    try:
        engine = MemoryModel(model)
    except ModelError as err:
        return {"refused": err.message}

    def prompt(tokens, last):
        return model(tokens[None]).logits[0, -last:].float()

    def gap(a, b):
        return float((a - b).abs().max())

    q, chunk = ids(9, 3), ids(40, 2)
    sink, a, b = ids(4, 4), ids(30, 5), ids(25, 6)
    sink_pool = engine.encode(sink)
    pool = engine.encode(a, sink_pool)
    pool = pool + engine.encode(b, sink_pool + pool)
    ours = list(engine.generate(q, engine.encode(chunk[:20]), max_new_tokens=8))
    theirs = model.generate(torch.cat([chunk[:20], q])[None], attention_mask=torch.ones(1, 29, dtype=torch.long),
                            max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, -8:].tolist()
    return {
        "layout": ["rotary" if k is not None else "no positions" for k in engine.layout.rope],
        "check_error": engine.check_error,
        "empty": gap(engine.forward(q), prompt(q, 9)),
        "chunk": gap(engine.forward(q, engine.encode(chunk)), prompt(torch.cat([chunk, q]), 9)),
        "sequential": gap(engine.forward(q, sink_pool + pool), prompt(torch.cat([sink, a, b, q]), 9)),
        "moved": gap(engine.forward(q, engine.encode(chunk, start=300)), prompt(torch.cat([chunk, q]), 9)),
        "generate_equal": ours == theirs,
    }


def real_window(family: Family) -> dict:
    """What the real checkpoint's config gives, without its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family.source.startswith("defaults:"):
        return {}
    raw = {k: v for k, v in family.raw().items() if k not in ("architectures", "transformers_version", "torch_dtype")}
    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = config.get_text_config(decoder=True).num_hidden_layers
    engine = MemoryModel(model, device="meta", layout=Layout(("",) * layers))
    window = engine.pool_window
    return {"window": window, "sliding_window": engine.sliding_window,
            "sliding_layers": sum(t == "sliding_attention" for t in engine.layer_types), "layers": layers,
            "default_pool": min(DEFAULT_POOL_SIZE, window - ANSWER_RESERVE)}


def table(rows: list[dict]) -> str:
    out = ["| family | checkpoint config | status | largest parity error | window | sliding window | default pool |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        source = r["source"].removeprefix("defaults:")
        source = f"`{source}` defaults" if r["source"].startswith("defaults:") else f"`{source}`"
        if "refused" in r:
            out.append(f"| {r['family']} | {source} | refused: {r['refused']} | | | | |")
            continue
        worst = max(r[k] for k in ("empty", "chunk", "sequential", "moved"))
        status = "exact" + ("" if r["generate_equal"] else " (generation differs!)")
        nope = r["layout"].count("no positions")
        status += f"; {nope} of {len(r['layout'])} layers without positions" if nope else ""
        w = r.get("window")
        sliding = r.get("sliding_window")
        slide = f"{sliding} ({r['sliding_layers']} of {r['layers']} layers)" if sliding else "none" if w else ""
        out.append(f"| {r['family']} | {source} | {status} | {worst:.1e} | {w or ''} | {slide} | "
                   f"{r.get('default_pool', '')} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--docs", type=Path)
    args = parser.parse_args()
    rows = []
    for family in FAMILIES:
        row = {"family": family.name, "source": family.source, **parity(family)}
        if "refused" not in row:
            row.update(real_window(family))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    if args.docs:
        text = args.docs.read_text()
        head, rest = text.split(BEGIN)
        _, tail = rest.split(END)
        args.docs.write_text(f"{head}{BEGIN}\n{table(rows)}\n{END}{tail}")


if __name__ == "__main__":
    main()
