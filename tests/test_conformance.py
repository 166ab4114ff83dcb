"""The official MemoryLLM checkpoints: every fixture case, reproduced within its tolerances.

Cases are found under MEMLLM_CONFORMANCE_DIR (default ../shared/conformance), so new cases
need no code change here. Variants: memoryllm (main branch, MemoryLLM-8B code) and
memoryllm-7b, and M+ (mplus); on the CPU, and on CUDA where a GPU is present.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memllm_cli.errors import ModelError
from memllm_cli.model.official import MPlus, OfficialMemoryLLM

ROOT = Path(os.environ.get("MEMLLM_CONFORMANCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "conformance"))
SUPPORTED = ("memoryllm", "memoryllm-7b")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # CUDA: float32, the same tolerances
CASES = sorted(p.parent for v in SUPPORTED for p in (ROOT / v).glob("*/case.json")) if ROOT.is_dir() else []


def check(name, got, case, expected):
    want = expected[name]
    spec = case["expected"][name]["compare"]
    got = got.reshape(want.shape).cpu().to(want.dtype)
    if spec == "exact":
        assert torch.equal(got, want), name
    else:
        torch.testing.assert_close(got, want, atol=spec["atol"], rtol=spec["rtol"], msg=name)


def check_generation(model, ids, step, case, expected):
    tokens, logits = model.generate(ids, step["max_new_tokens"])
    check(step["expect"][0], torch.tensor(tokens), case, expected)
    check(step["expect"][1], logits, case, expected)


def seeded_inject(model, ids, step):
    """The injection forward, after the seed the official run set before the call."""
    if "torch_manual_seed_before_call" in step:
        torch.manual_seed(step["torch_manual_seed_before_call"])
    return torch.stack(model.inject(ids))  # (L, K, d)


@pytest.mark.skipif(not CASES, reason=f"no conformance fixtures under {ROOT}")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("folder", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_case(folder, device):
    case = json.loads((folder / "case.json").read_text())
    expected = load_file(folder / "expected.safetensors")
    inputs = {k: torch.tensor(v["ids"]) for k, v in case["inputs"].items()}
    model = None
    checked = set()
    for step in case["steps"]:
        if model is None or not step["state"].startswith("continuing"):
            model = OfficialMemoryLLM.load(folder, device=device)
            if "memory_before" in expected:
                check("memory_before", model.memory, case, expected)
                checked.add("memory_before")
        ids = inputs[step["input"]]
        op, names = step["op"], step["expect"]
        if op == "forward":
            check(names[0], model.forward(ids), case, expected)
        elif op == "greedy_generate":
            check_generation(model, ids, step, case, expected)
        elif op.startswith("inject_memory"):
            delta = seeded_inject(model, ids, step)
            kept = model.update(list(delta)) if "update_memory=True" in op else None
            for name in names:
                if "kept_indices" in name:
                    check(name, kept, case, expected)
                elif "memory_after" in name:
                    check(name, model.memory, case, expected)
                else:
                    check(name, delta, case, expected)
            if "initialized_after" in step:
                assert model.initialized == bool(step["initialized_after"])
        else:
            raise AssertionError(f"unknown op {op}")
        checked.update(names)
    assert checked >= set(case["expected"]) - {n for n in case["expected"] if "randperm" in n}, checked


MPLUS_CASES = sorted(p.parent for p in (ROOT / "mplus").glob("*/case.json")) if ROOT.is_dir() else []


@pytest.mark.skipif(not MPLUS_CASES, reason=f"no M+ fixtures under {ROOT}")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("folder", MPLUS_CASES, ids=lambda p: f"mplus/{p.name}")
def test_mplus_fixture_case(folder, device):
    """M+: retrieval order among rows of equal age is numpy's, so where the case says the
    retrieved ages tie, the retrieved ids are compared as a set, and their order and the
    logits only when our order matches (as case.json prescribes)."""
    case = json.loads((folder / "case.json").read_text())
    expected = load_file(folder / "expected.safetensors")
    inputs = {k: torch.tensor(v["ids"]) for k, v in case["inputs"].items()}
    model = OfficialMemoryLLM.load(folder, device=device)
    assert isinstance(model, MPlus)
    check("memory_before", model.memory, case, expected)
    checked, order_matched = {"memory_before"}, []
    for step in case["steps"]:
        ids = inputs[step["input"]]
        op, names = step["op"], step["expect"]
        if op == "forward":
            logits = model.forward(ids)
            retrieved = torch.stack(model.retrieved).cpu()  # (L, R)
            want = expected[names[1]]
            assert torch.equal(retrieved.sort(dim=1).values, want.sort(dim=1).values), names[1]
            same_order = torch.equal(retrieved, want)
            if step.get("age_ties_among_retrieved"):
                order_matched.append(same_order)
            else:
                assert same_order, names[1]
            if same_order:
                check(names[0], logits, case, expected)
        elif op == "greedy_generate":
            check_generation(model, ids, step, case, expected)
        elif op.startswith("inject_memory"):
            delta = seeded_inject(model, ids, step)
            got = {"delta": delta}
            if "update_memory=True" in op:
                drawn = model.update(list(delta))
                got.update({"kept_indices": drawn["kept"], "dropped_indices": drawn["dropped"],
                            "randperm": drawn["randperm"], "after_memory": model.memory,
                            "after_memory_ages": torch.stack(model.ages),
                            "after_cached_dropped_memories": torch.stack(model.cached),
                            "after_cached_dropped_keys": torch.stack(model.cached_keys),
                            "after_cached_dropped_memory_ages": torch.stack(model.cached_ages)})
                for i in range(model.c.layers):
                    got.update({f"after_ltm.{i}": model.ltm[i], f"after_ltm_keys.{i}": model.ltm_keys[i],
                                f"after_ltm_recall_frequencies.{i}": model.ltm_rf[i],
                                f"after_ltm_ages.{i}": model.ltm_ages[i]})
                assert model.update_step == step["update_step_after"]
            for name in names:
                key = name.split("_", 1)[1] if name.startswith("update") else "delta"
                check(name, got[key], case, expected)
        else:
            raise AssertionError(f"unknown op {op}")
        checked.update(names)
    assert all(order_matched), "tied retrieval order differs from the official run"
    assert checked >= set(case["expected"]), set(case["expected"]) - checked


@pytest.mark.skipif(not CASES, reason=f"no conformance fixtures under {ROOT}")
def test_loading_checks_memory_and_files_first(tmp_path, monkeypatch):
    folder = CASES[0]
    monkeypatch.setattr("memllm_cli.model.official.available_bytes", lambda: 10_000)
    with pytest.raises(ModelError, match="needs about .* GiB in float32, but only"):
        OfficialMemoryLLM.load(folder)
    monkeypatch.undo()
    half = OfficialMemoryLLM.load(folder, dtype=torch.bfloat16)
    assert half.memory.dtype == torch.bfloat16 and half.w["initialized"].dtype == torch.uint8
    with pytest.raises(ModelError, match="cannot read"):
        OfficialMemoryLLM.load(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ModelError, match="no .safetensors files"):
        OfficialMemoryLLM.load(tmp_path)


@pytest.mark.skipif(not CASES, reason=f"no conformance fixtures under {ROOT}")
def test_bfloat16_stays_close_to_float32():
    folder = next(c for c in CASES if c.name == "inject-generate-update" and c.parent.name == "memoryllm")
    ids = torch.tensor(json.loads((folder / "case.json").read_text())["inputs"]["prompt"]["ids"])
    full = OfficialMemoryLLM.load(folder).forward(ids)
    half = OfficialMemoryLLM.load(folder, dtype=torch.bfloat16).forward(ids).float()
    assert (half.argmax(-1) == full.argmax(-1)).float().mean() >= 0.8
    assert (half - full).abs().max() < 0.1 * full.abs().max()
