"""Adapters that teach a frozen model to read memories (``memory3 adapt``), and the bank they share.

A real two-step story on a small world: a base trained without memory (stage 1 only), a LoRA
adapter trained on it with the stage-2 recipe, then: the adapter lowers the answer loss with the
right memory below the loss without it; peft alone loads what memory3 saved; another base refuses
it; and one bank, encoded once by the base and stored in a real server, serves the base and two
adapter versions unchanged (encoding with an adapter gives the base's memories bit for bit).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memory3.sdk.client import BankInfo
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.supply import MemorySupply
from memory3.sdk.memory.writer import MemoryWriter
from memory3.sdk.model.adapters import (
    ADAPTER_METADATA,
    AdapterMismatchError,
    adapters_disabled,
    has_adapters,
    load_adapter,
    save_adapter,
)
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.sdk.model.positions import memory_spec_for
from memory3.trainer.adapt import AdaptConfig, probe_drills, run_adapt
from memory3.trainer.config import StageConfig, WorldConfig
from memory3.trainer.corpus import build_world
from memory3.trainer.memory_stage import answer_loss
from memory3.trainer.model import load_reference_model
from memory3.trainer.pretrain import run_training, stage_model_dir
from tiny_models import byte_tokenizer, tiny_llama

from helpers import two_stage_config

torch.set_num_threads(1)

ADAPT_STEPS = 600
TEXTS = [f"Notes on {t}: the {t} of the northern valley were recorded in the year {1800 + i}."
         for i, t in enumerate(["rivers", "bread", "comets", "glaciers", "tea", "owls"])]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """Stage 1 of the small recipe (no memory ever), saved by the stage-model rule."""
    out = tmp_path_factory.mktemp("base")
    config = two_stage_config(out, stage1=300, stage2=2, memory_layers=[0, 1, 2, 3], tokens_per_head=16)
    run_training(config, stop_at=300)
    return stage_model_dir(out, "warmup")


def adapt_config(base_dir, out_dir, **kw) -> AdaptConfig:
    defaults = dict(base=str(base_dir), out_dir=str(out_dir),
                    world=WorldConfig(seed=0, n_entities=40, heldout_fraction=0.2, passages_per_entity=2),
                    seq_len=128, batch_size=8, eval_interval=0, eval_documents=48, progress=False,
                    stage=StageConfig(name="adapt", steps=ADAPT_STEPS, lr=1e-2, min_lr=1e-3, warmup_steps=10,
                                      memory="adapter", encode_with_grad=False))
    defaults.update(kw)
    return AdaptConfig(**defaults)


@pytest.fixture(scope="module")
def adapted(base_dir, tmp_path_factory):
    return run_adapt(adapt_config(base_dir, tmp_path_factory.mktemp("adapter")))


@pytest.mark.slow
def test_adapter_trains_on_the_frozen_base_and_lowers_the_answer_loss(base_dir, adapted):
    """The probe: answer loss on drills about entities no step trains on, with the right
    reference's memory (encoded by the frozen base) vs without. Measured on this config: the base
    8.87 / 9.04 nats; the adapter after 600 steps 5.52 / 5.61, after 1200 steps 5.35–5.39 /
    5.37–5.57 over two runs. It learns the answers (asserted), but its gap with vs without memory
    stays near the base's own (0.02–0.19 vs 0.17): an adapter reading the frozen base's memories
    barely learns to read them, so no margin on that gap is asserted (docs/adapters.md: why)."""
    base, tokenizer, spec = load_reference_model(base_dir)
    assert adapted.finished and adapted.base_fingerprint == model_fingerprint(base)
    assert adapted.trainable_parameters <= 0.02 * adapted.base_parameters
    config = adapt_config(base_dir, adapted.out_dir)
    world = build_world(config.world.seed, config.world.n_entities, config.world.heldout_fraction,
                        passages_per_entity=config.world.passages_per_entity)
    docs, refs = probe_drills(config, world, tokenizer)
    base_with_memory = answer_loss(base, tokenizer, spec, docs, references=refs)
    assert adapted.answer_loss_memory < base_with_memory - 2.0, (adapted, base_with_memory)
    assert adapted.answer_loss_plain < answer_loss(base, tokenizer, spec, docs) - 2.0, adapted
    reloaded = load_adapter(load_reference_model(base_dir)[0], adapted.out_dir)
    assert model_fingerprint(reloaded) == model_fingerprint(base)  # the base's weights are untouched


@pytest.mark.slow
def test_saved_adapter_loads_through_peft_alone(base_dir, adapted):
    from peft import PeftModel

    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    base, _, _ = load_reference_model(base_dir)
    plain = base(input_ids=ids).logits
    with torch.no_grad():
        by_peft = PeftModel.from_pretrained(load_reference_model(base_dir)[0], adapted.out_dir)(input_ids=ids).logits
        by_memory3 = load_adapter(load_reference_model(base_dir)[0], adapted.out_dir)(input_ids=ids).logits
    assert torch.equal(by_peft, by_memory3)
    assert not torch.allclose(by_peft, plain)
    meta = json.loads((Path(adapted.out_dir) / ADAPTER_METADATA).read_text())
    assert meta["base_fingerprint"] == model_fingerprint(base) and meta["steps"] == ADAPT_STEPS


@pytest.mark.slow
def test_an_adapter_is_refused_on_another_base(adapted):
    other = tiny_llama(seed=3)
    with pytest.raises(AdapterMismatchError, match="was trained on base model"):
        load_adapter(other, adapted.out_dir)
    assert not has_adapters(other)


def test_adapt_cli_names_a_missing_base_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "memory3.cli.main", "adapt", "--model", str(tmp_path / "none"),
                          "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no config.json" in lines[0] and "Traceback" not in run.stderr


def _random_adapter(model, directory, seed: int, targets=("q_proj", "o_proj"), memories: str = "base"):
    """A LoRA adapter with random (non-identity) weights, saved as memory3 saves one."""
    from peft import LoraConfig, get_peft_model

    fingerprint = model_fingerprint(model)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                  init_lora_weights=False))
    save_adapter(peft_model, directory, fingerprint, {}, steps=0, memories=memories)
    return directory


def test_an_adapted_model_keeps_the_base_fingerprint_and_encodes_the_base_memories(tmp_path):
    tokenizer = byte_tokenizer()
    base = tiny_llama(seed=5)
    spec = memory_spec_for(base, (1, 2, 3), tokens_per_head=4, reference_length=96)
    want = MemoryEncoder(base, tokenizer, spec).encode(TEXTS)
    for seed, targets in ((1, ("q_proj", "o_proj")), (2, ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))):
        directory = _random_adapter(tiny_llama(seed=5), tmp_path / f"a{seed}", seed, targets)
        adapted = load_adapter(tiny_llama(seed=5), directory)
        assert has_adapters(adapted) and model_fingerprint(adapted) == model_fingerprint(base)
        got = MemoryEncoder(adapted, tokenizer, spec).encode(TEXTS)
        for a, b in zip(got, want):
            assert torch.equal(a.kv, b.kv) and torch.equal(a.positions, b.positions)
        with adapters_disabled(adapted):  # what the encoder sees: the base, exactly
            assert torch.equal(adapted(input_ids=torch.tensor([[1, 2, 3]])).logits,
                               base(input_ids=torch.tensor([[1, 2, 3]])).logits)
        assert not torch.equal(adapted(input_ids=torch.tensor([[1, 2, 3]])).logits,
                               base(input_ids=torch.tensor([[1, 2, 3]])).logits)
    with torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0  # a base weight moves: another base
    assert model_fingerprint(base) != model_fingerprint(adapted)


def test_one_bank_encoded_once_serves_the_base_and_two_adapter_versions(server, api_key, blocking, tmp_path):
    """The bank is written once by the base; the base and two adapters read it through the
    service; nothing is re-encoded (the stored payloads are unchanged) and every reader gets the
    stored memories themselves. Fails if an adapter changed what a stored memory means."""
    from memory3.sdk.generation import DecodingOptions, MemoryOptions, generate

    tokenizer = byte_tokenizer()
    base = tiny_llama(seed=5)
    spec = memory_spec_for(base, (1, 2, 3), tokens_per_head=4, reference_length=96)
    bank = "adapters-" + secrets.token_hex(3)
    blocking.create_bank(BankInfo(bank, model_fingerprint(base), spec))
    with MemorySupply(server.target, api_key, base, spec) as supply:
        writer = MemoryWriter(MemoryEncoder(base, tokenizer, spec))
        supply.run(writer.write(supply.client, bank, [(f"r{i}", t) for i, t in enumerate(TEXTS)], progress=False))
    stored = {r.external_id: r.memory for r in blocking.fetch(bank, [f"r{i}" for i in range(len(TEXTS))])}
    readers = {"base": base}
    for version in (1, 2):
        readers[f"v{version}"] = load_adapter(tiny_llama(seed=5), _random_adapter(tiny_llama(seed=5),
                                                                                   tmp_path / f"v{version}", version))
    answers = {}
    for name, model in readers.items():
        with MemorySupply(server.target, api_key, model, spec, tokenizer=tokenizer) as supply:
            [row] = supply.request(bank, [TEXTS[2]], top_k=2).result()
            assert row.memory_ids[0] == "r2"
            memory = MemoryOptions(supply, bank, top_k=2)
            [result] = generate(model, tokenizer, ["Notes on comets:"], mode="memory", memory=memory,
                                decoding=DecodingOptions(max_new_tokens=6, chunk=4))
            answers[name] = result.text
        mine = MemoryEncoder(model, tokenizer, spec).encode([TEXTS[2]])[0]
        assert torch.equal(mine.positions, row.memories[0].positions)
        assert torch.nn.functional.cosine_similarity(mine.kv, row.memories[0].kv, dim=-1).min() > 0.999  # int8
    after = {r.external_id: r.memory for r in blocking.fetch(bank, list(stored))}
    assert after == stored and blocking.stats(bank).with_memory == len(TEXTS)
    assert len(set(answers.values())) > 1  # the adapters do change what is decoded from the same memories


def test_generate_refuses_an_adapter_of_another_base_in_one_line(tmp_path):
    shipped = Path(__file__).resolve().parent.parent / "models" / "reference-tiny"
    adapter = _random_adapter(tiny_llama(seed=5), tmp_path / "other", 1)
    run = subprocess.run([sys.executable, "-m", "memory3.cli.main", "generate", "--bank", "kb", "--mode", "plain",
                          "--model", str(shipped), "--adapter", str(adapter), "--target", "127.0.0.1:9", "Q: x?"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "was trained on base model" in lines[0] and "Traceback" not in run.stderr


def test_an_adapter_that_also_encodes_comes_back_as_a_new_model_with_its_own_memories(tmp_path):
    """The other placement (memories="adapted"): its memories are not the base's, so it must not
    pass for the base — load_adapter merges it into a model with its own fingerprint."""
    tokenizer = byte_tokenizer()
    base = tiny_llama(seed=5)
    spec = memory_spec_for(base, (1, 2, 3), tokens_per_head=4, reference_length=96)
    merged = load_adapter(tiny_llama(seed=5), _random_adapter(tiny_llama(seed=5), tmp_path / "enc", 1,
                                                              memories="adapted"))
    assert not has_adapters(merged) and model_fingerprint(merged) != model_fingerprint(base)
    mine, theirs = (MemoryEncoder(m, tokenizer, spec).encode(TEXTS[:1])[0] for m in (merged, base))
    assert mine.fingerprint == model_fingerprint(merged) and not torch.equal(mine.kv, theirs.kv)
