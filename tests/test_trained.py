"""The trained kind: official MemoryLLM / M+ checkpoints through the service and the store.

Tiny random checkpoints in the official format (tests/trained_fixture.py). The reference is
the plain official computation (OfficialMemoryLLM.inject + update with the same seeds) run
outside the service: what the store holds and reloads must equal it bit for bit.
"""

import json
import subprocess
import sys

import pytest
import torch

from memllm_cli.errors import ModelError
from memllm_cli.memory import Memory
from memllm_cli.model.official import CHECKPOINT, MPlus, OfficialMemoryLLM, split_ids
from memllm_cli.model.placement import accelerate_map
from memllm_cli.random_checkpoints import save_trained, trained_config
from memllm_cli.service import CHUNK_TOKENS, Memllm
from memllm_cli.text.chunking import chunk_document
from tests.test_service import doc

TEXTS = [
    "The tool shed code is 4172. The key hangs inside the shed door. " * 4,
    "The garden coordinator is Maria Okafor. Volunteers meet every Tuesday at six. " * 3,
    "Paris is the capital of France. Berlin is the capital of Germany. " * 3,
    "Numbers like 1901, 42 and 3.14 appear in text; so do commas, colons and quotes. " * 3,
    "Question: who is it? Answer: it is me. A new paragraph starts here. " * 3,
]


@pytest.fixture(scope="module")
def main_dir(tmp_path_factory):
    return save_trained(tmp_path_factory.mktemp("memoryllm"), chat=True)


@pytest.fixture(scope="module")
def mplus_dir(tmp_path_factory):
    return save_trained(tmp_path_factory.mktemp("mplus"), "mplus")


@pytest.fixture(scope="module")
def blank_dir(tmp_path_factory):
    """A checkpoint whose memory was never written (initialized = 0)."""
    return save_trained(tmp_path_factory.mktemp("blank"), initialized=False, drop_memory_per_layer=False)


def reference(folder, texts, seeds, tokenizer):
    """The official computation, outside the service: one inject + update per chunk."""
    model = OfficialMemoryLLM.load(folder)
    for text, seed in zip(texts, seeds, strict=True):
        (chunk,) = chunk_document(text, tokenizer, CHUNK_TOKENS)
        ids = chunk.ids
        model.update(model.inject(torch.tensor(ids)), torch.Generator().manual_seed(seed))
    return model


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], list):
            assert len(a[key]) == len(b[key]), key
            for x, y in zip(a[key], b[key], strict=True):
                assert torch.equal(x, y), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("variant", ["main", "mplus"])
def test_store_holds_exactly_the_official_state(variant, main_dir, mplus_dir):
    folder = main_dir if variant == "main" else mplus_dir
    service = Memllm(model=str(folder), memory="m")
    service.ingest_documents([doc(f"d{i}", t) for i, t in enumerate(TEXTS)])
    lm = service.model()
    log = service.store.open("m").journal()
    seeds = [u["seed"] for u in service.store.open("m").version_meta(service.store.open("m").head())["updates"]]
    assert len(seeds) == len(TEXTS) and log
    ref = reference(folder, TEXTS, seeds, lm.tokenizer)
    loaded = Memllm(model=str(folder), memory="m").load(states=True)
    ours = loaded.state
    for i in range(ref.c.layers):
        assert torch.equal(ours["rows"][i], ref.rows[i])
        assert torch.equal(ours["row_ids"][i] >= 0, torch.ones_like(ref.row_ids[i], dtype=torch.bool))
    if variant == "mplus":
        assert isinstance(ref, MPlus) and ours["update_step"] == ref.update_step
        for name in ("ltm", "ltm_rf", "ltm_ages", "cached", "cached_ages", "ages"):
            for x, y in zip(ours[name], getattr(ref, name), strict=True):
                assert torch.equal(x, y), name
        for x, y in zip(ours["ltm_keys"], ref.ltm_keys, strict=True):  # keys: computed at write, see MPlus
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        assert sum(len(x) for x in ours["ltm"]) > sum(len(x) for x in ref.checkpoint_ltm)  # a merge happened
    # and the reloaded state answers exactly as the official generate on that state
    question = lm.prompt.question_ids(lm.tokenizer, "What is the tool shed code?")
    want, _ = ref.generate(torch.tensor(question), 6)
    got = loaded_answer = service.ask("What is the tool shed code?", max_new_tokens=6)
    "".join(loaded_answer)
    assert got.ids == want[: len(got.ids)] and len(got.ids) > 0


def test_reload_is_bit_identical_and_replays(main_dir, mplus_dir):
    for folder in (main_dir, mplus_dir):
        service = Memllm(model=str(folder), memory=f"r-{folder.name}")
        service.ingest_documents([doc("a", TEXTS[0]), doc("b", TEXTS[1])])
        before = service.load(states=True).state
        service.ingest_documents([doc("c", TEXTS[2])])
        service.rollback("HEAD~1")
        assert_same_state(service.load(states=True).state, before)
        # the same ingest after the rollback writes the same block: same seed, same rows
        blocks = set(service.store.open(service.memory_name).blocks())
        service.ingest_documents([doc("c", TEXTS[2])])
        assert set(service.store.open(service.memory_name).blocks()) == blocks


def test_the_store_refers_to_the_checkpoint_pool_instead_of_copying_it(main_dir):
    service = Memllm(model=str(main_dir), memory="small")
    service.ingest_documents([doc("a", TEXTS[0])])
    store = service.store
    blocks = store.open("small").blocks()
    assert len(blocks) == 1  # one injection; the checkpoint's 32 rows x 3 layers are not copied
    tensors, meta = store.open("small").read_version(store.open("small").head())
    assert meta["blocks"][:2] == ["@checkpoint", "@checkpoint-ltm"] and meta["kind"] == "trained"
    assert tensors["block"].shape == (3, 32)
    block = store.open("small").read_block_rows(blocks[0], list(range(8)), ("rows",))["rows"]
    assert block.shape == (8, 3, 64)
    # 8 new rows per layer, the other 24 still the checkpoint's, each at its own position
    held = tensors["block"] == 2
    assert held.sum(dim=1).tolist() == [8, 8, 8]
    assert torch.equal(tensors["row"][~held].long() % 1, torch.zeros(int((~held).sum()), dtype=torch.long))
    assert service.verify()["ok"]


def test_status_diff_and_log_count_rows(main_dir):
    service = Memllm(model=str(main_dir), memory="counts")
    service.ingest_documents([doc("a", TEXTS[0])])
    service.ingest_documents([doc("b", TEXTS[1])])
    status = service.status()
    assert status["kind"] == "trained" and status["unit"] == "rows per layer" and status["pool_size"] == 32
    a, b = status["sources"]
    assert a["rows_written"] == b["rows_written"] == 8 and b["tokens_held"] == 8
    assert 0 <= a["tokens_held"] <= 8 and status["tokens"] == a["tokens_held"] + b["tokens_held"]
    diff = service.diff("HEAD~1", "HEAD")
    assert diff["unit"] == "rows per layer"
    by_name = {row["source"]: row for row in diff["sources"]}
    assert by_name["b"]["added"] == 8
    dropped = by_name["a"]["dropped"] + by_name["<checkpoint memory>"]["dropped"]
    assert 7 <= dropped <= 9  # about K rows per layer make room (averaged over layers)


def test_forget_restores_checkpoint_rows_and_removes_long_term_rows(main_dir, mplus_dir):
    for folder in (main_dir, mplus_dir):
        name = f"f-{folder.name}"
        service = Memllm(model=str(folder), memory=name)
        service.ingest_documents([doc(f"d{i}", t) for i, t in enumerate(TEXTS)])
        before = service.load(states=True)
        service.forget(["d0", "d1"])
        memory = Memllm(model=str(folder), memory=name).load(states=True)
        sources = {memory.sources.index(s) for s in memory.sources if s["name"] in ("d0", "d1")}
        table = torch.tensor(memory.meta["block_sources"])
        for i in range(memory.layers):
            block, row = split_ids(memory.state["row_ids"][i])
            assert not torch.isin(table[block], torch.tensor(sorted(sources))).any()
            back = block == CHECKPOINT
            lm = service.model()
            assert torch.equal(memory.state["rows"][i][back], lm.engine.checkpoint_rows[i][row[back]])
            old = split_ids(before.state["row_ids"][i])[0]
            replaced = torch.isin(table[old], torch.tensor(sorted(sources)))
            assert replaced.any() or memory.mplus
            assert (block[replaced] == CHECKPOINT).all()  # by the checkpoint's row at the same position
            assert torch.equal(row[replaced], torch.nonzero(replaced).flatten())
            assert torch.equal(memory.state["rows"][i][~replaced], before.state["rows"][i][~replaced])
            if memory.mplus:
                for tier in ("ltm", "cached"):
                    b, _ = split_ids(memory.state[f"{tier}_ids"][i])
                    assert not torch.isin(table[b], torch.tensor(sorted(sources))).any()
        assert [s["name"] for s in service.status()["sources"]] == ["d2", "d3", "d4"]
        "".join(service.ask("What is the code?", max_new_tokens=3))
        result = service.forget(["d2"], purge=True)
        assert result["purged_blocks"] == 1 and service.verify()["ok"]


def test_forgetting_everything_from_a_blank_checkpoint_is_the_fresh_checkpoint(blank_dir):
    service = Memllm(model=str(blank_dir), memory="blank")
    service.ingest_documents([doc("a", TEXTS[0])])
    memory = service.load(states=True)
    assert memory.state["initialized"] and (split_ids(torch.stack(memory.state["row_ids"]))[0] == 2).all()
    service.forget(["a"])
    fresh = OfficialMemoryLLM.load(blank_dir)
    memory = service.load(states=True)
    assert not memory.state["initialized"]
    lm = service.model()
    question = torch.tensor(lm.prompt.question_ids(lm.tokenizer, "Who?"))
    assert torch.equal(lm.engine.forward(question, state=memory.state), fresh.forward(question))


def test_prompts_follow_the_official_readme(main_dir, mplus_dir):
    chat = Memllm(model=str(main_dir)).model()
    ids = chat.prompt.question_ids(chat.tokenizer, "What fruits does David like?")
    text = chat.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What fruits does David like?"}], add_generation_prompt=True, tokenize=False
    )
    full = chat.tokenizer(text, add_special_tokens=False).input_ids
    assert full[0] == chat.tokenizer.bos_token_id and ids == full[1:]  # bos removed: the model has its own
    base = Memllm(model=str(mplus_dir)).model()
    ids = base.prompt.question_ids(base.tokenizer, "What fruits does David like?")
    assert base.tokenizer.decode(ids) == "Question: What fruits does David like? Answer:"
    assert chat.tokenizer.eos_token_id in chat.stop_ids()


def test_a_memory_refuses_another_checkpoint(main_dir, tmp_path):
    Memllm(model=str(main_dir), memory="one").ingest_documents([doc("a", TEXTS[0])])
    other = save_trained(tmp_path / "other", seed=1, chat=True)
    with pytest.raises(ModelError, match="was written by model"):
        "".join(Memllm(model=str(other), memory="one").ask("Who?", max_new_tokens=2))


def test_loading_errors_are_clear(tmp_path, main_dir):
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tokenizer / f).write_bytes((main_dir / f).read_bytes())
    with pytest.raises(ModelError, match="no usable tokenizer"):
        Memllm(model=str(no_tokenizer)).model()
    bad = save_trained(tmp_path / "bad", "mplus", update_ltm_mode="delayed")
    with pytest.raises(ModelError, match="update_ltm_mode 'delayed' is not supported"):
        Memllm(model=str(bad)).model()
    with pytest.raises(ModelError, match="device"):
        OfficialMemoryLLM.load(main_dir, device="tpu")


def test_cli_runs_a_trained_checkpoint(tmp_path, main_dir, isolated_home):
    notes = tmp_path / "notes.txt"
    notes.write_text(TEXTS[0])

    def memllm(*args):
        return subprocess.run([sys.executable, "-m", "memllm_cli", "--model", str(main_dir), *args],
                              capture_output=True, text=True, timeout=120)

    out = memllm("ingest", "--json", str(notes))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["chunks"] == 1
    out = memllm("ask", "--json", "--max-tokens", "4", "What is the code?")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tokens"] <= 4
    out = memllm("status", "--json")
    assert json.loads(out.stdout)["kind"] == "trained"
    out = memllm("snapshot", "create", "before")
    assert out.returncode == 0, out.stderr
    assert memllm("diff", "before", "HEAD", "--json").returncode == 0
    out = memllm("forget", "--yes", str(notes))
    assert out.returncode == 0, out.stderr
    assert memllm("verify").returncode == 0


def test_accelerate_device_map_keeps_layers_whole():
    from memllm_cli.model.official import Config

    config = Config.from_dict(trained_config())
    shapes = {"memory": [3, 32, 64], "model.embed_tokens.weight": [320, 64], "lm_head.weight": [320, 64],
              "model.norm.weight": [64]}
    for i in range(3):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = [64, 64]
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = [128, 64]
    layer_bytes = (64 * 64 + 128 * 64 + 32 * 64) * 4
    found = accelerate_map(config, shapes, torch.float32,
                           max_memory={0: 320 * 64 * 4 + 2 * layer_bytes, 1: 10**9, "cpu": 10**9})
    layers = [found[f"model.layers.{i}"] for i in range(3)]
    assert set(layers) == {"cuda:0", "cuda:1"} and layers == sorted(layers)


def test_a_device_map_runs_the_same_computation(main_dir):
    """Every part placed by a map (all on the CPU here: the placement code path, not the
    GPU) computes what the default placement computes."""
    plain = OfficialMemoryLLM.load(main_dir)
    parts = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu",
             **{f"model.layers.{i}": "cpu" for i in range(3)}}
    tensors = {k: v for k, v in plain.w.items()} | {"memory": plain.memory, "initialized": torch.tensor(1)}
    mapped = OfficialMemoryLLM(plain.c, tensors, parts)
    ids = torch.arange(5, 40)
    assert torch.equal(mapped.forward(ids), plain.forward(ids))


def test_ledger_is_shared():
    from memllm_cli.memory import FreeMemory, TrainedMemory

    assert issubclass(FreeMemory, Memory) and issubclass(TrainedMemory, Memory)


@pytest.mark.gpu
def test_conformance_on_cuda(main_dir):
    """The same checkpoint on the GPU (float32) computes what it computes on the CPU."""
    cpu = OfficialMemoryLLM.load(main_dir)
    gpu = OfficialMemoryLLM.load(main_dir, device="cuda")
    ids = torch.arange(5, 60)
    torch.testing.assert_close(gpu.forward(ids).cpu(), cpu.forward(ids), atol=1e-4, rtol=1e-4)
    delta = gpu.inject(ids)
    torch.testing.assert_close(torch.stack(delta).cpu(), torch.stack(cpu.inject(ids)), atol=1e-4, rtol=1e-4)


def test_a_hub_id_loads_from_the_hugging_face_cache(tmp_path, monkeypatch, main_dir):
    """`--model YuWangX/memoryllm-8b` with no network: found in the HF cache, as downloaded."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--YuWangX--memoryllm-tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in main_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / "models--YuWangX--memoryllm-tiny" / "refs").mkdir()
    (cache / "models--YuWangX--memoryllm-tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    lm = Memllm(model="YuWangX/memoryllm-tiny").model()
    assert lm.trained and lm.name == "YuWangX/memoryllm-tiny"
    assert lm.fingerprint == Memllm(model=str(main_dir)).model().fingerprint


def test_mplus_cites_the_documents_its_retriever_chose(mplus_dir):
    service = Memllm(model=str(mplus_dir), memory="cite")
    service.ingest_documents([doc(f"d{i}", t) for i, t in enumerate(TEXTS * 2)])
    answer = service.ask("What is the tool shed code?", max_new_tokens=2)
    "".join(answer)
    lm = service.model()
    memory = service.load(states=True)
    retrieved: list = [None] * memory.layers  # what the retriever chooses for this question, read again
    lm.engine.forward(torch.tensor(lm.prompt.question_ids(lm.tokenizer, "What is the tool shed code?")),
                      state=memory.state, retrieved=retrieved)
    table = torch.tensor(memory.meta["block_sources"])
    chosen = 0
    for i, picked in enumerate(retrieved):
        block, _ = split_ids(torch.cat([memory.state["ltm_ids"][i], memory.state["cached_ids"][i]])[picked])
        chosen += int((table[block] >= 0).sum())
    cited = answer.info["sources"]
    assert chosen > 0 and sum(c["rows"] for c in cited) == chosen
    assert {c["source"] for c in cited} <= {f"d{i}" for i in range(10)}
    assert all(c["excerpt"] for c in cited)


def test_max_model_ram_counts_a_trained_checkpoints_weights(main_dir, tiny_dir):
    """hub.weight_bytes was 0 for trained checkpoints: --max-model-ram never unloaded them."""
    from memllm_cli.config import load_settings
    from memllm_cli.service.hub import Models, weight_bytes

    trained = Models(load_settings()).get(str(main_dir))
    expected = sum(t.numel() * t.element_size() for t in OfficialMemoryLLM.load(main_dir).w.values())
    assert weight_bytes(trained) > expected > 0  # its weights, and its own pool besides
    models = Models(load_settings(), max_bytes=weight_bytes(trained))
    models.get(str(main_dir))
    models.get(str(tiny_dir))  # past the bound: the least recently used goes
    assert models.names() == [str(tiny_dir)]
