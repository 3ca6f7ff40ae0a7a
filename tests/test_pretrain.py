"""Stage 1 pretraining: the loss drops, checkpoints resume to identical weights, the saved
reference model loads back, configs load from YAML, and the memory-stage seam is honoured."""

import contextlib
from pathlib import Path

import pytest
import torch

from memory3.core.memory_spec import MemorySpec
from memory3.trainer.config import CONFIG_DIR, StageConfig, TrainConfig, WorldConfig, load_config
from memory3.trainer.model import PRESETS, build_model, count_parameters, load_reference_model
from memory3.trainer.corpus import TRAIN, build_world, normalize_answer
from memory3.trainer.evaluate import prompt_ids
from memory3.trainer.pretrain import (Batch, MemoryHooks, TokenStream, _sample_questions, learning_rate, main,
                                      register_memory_stage, run_training)

torch.set_num_threads(1)


def tiny_config(out_dir, steps=40, **kw) -> TrainConfig:
    defaults = dict(
        out_dir=str(out_dir), seed=0, world=WorldConfig(seed=0, n_entities=40, heldout_fraction=0.2,
                                                        passages_per_entity=2),
        vocab_size=1024, preset="tiny", seq_len=64, batch_size=8,
        stages=[StageConfig(name="warmup", steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=5)],
        log_interval=1, eval_interval=1000, eval_questions=4, checkpoint_interval=1000,
        num_threads=1, device="cpu", progress=False,
    )
    defaults.update(kw)
    return TrainConfig(**defaults)


def test_tiny_run_loss_drops_and_saves_a_loadable_reference_model(tmp_path):
    result = run_training(tiny_config(tmp_path, steps=40))
    losses = [r["loss"] for r in result.history]
    assert result.finished and result.steps == 40
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.5, (first, last)
    out = Path(result.out_dir)
    for name in ("loss.png", "loss.csv", "result.json", "config.json", "model/model.safetensors",
                 "model/memory_spec.json", "model/tokenizer.json"):
        assert (out / name).exists(), name
    assert len((out / "loss.csv").read_text().splitlines()) == 41

    model, tokenizer, spec = load_reference_model(result.model_dir)
    assert isinstance(spec, MemorySpec) and spec.memory_layers == (0, 1)
    assert spec.kv_heads == model.config.num_key_value_heads == 2
    assert model.config.num_hidden_layers == 4 and model.config.max_position_embeddings >= 128 + 256
    assert tokenizer.padding_side == "right"
    ckpt = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["model"][name]), name

    # the reported QA exact match is what HF's own greedy decoding of the saved model scores
    config = tiny_config(tmp_path, steps=40)
    w = config.world
    world = build_world(w.seed, w.n_entities, w.heldout_fraction, w.passages_per_entity)
    pairs = _sample_questions(world, TRAIN, config.eval_questions, config.seed)
    right = 0
    for pair in pairs:
        ids = torch.tensor([prompt_ids(tokenizer, pair.question, "plain")])
        out_ids = model.generate(ids, max_new_tokens=config.eval_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out_ids[0, ids.shape[1]:], skip_special_tokens=True)
        right += normalize_answer(answer) == normalize_answer(pair.answer)
    assert result.qa_train == right / len(pairs)


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    straight = run_training(tiny_config(tmp_path / "a", steps=4, checkpoint_interval=2))
    partial = run_training(tiny_config(tmp_path / "b", steps=4, checkpoint_interval=2), stop_at=2)
    assert not partial.finished and partial.steps == 2 and partial.model_dir is None
    resumed = run_training(tiny_config(tmp_path / "b", steps=4, checkpoint_interval=2))
    assert resumed.finished and resumed.steps == 4
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    a = torch.load(tmp_path / "a" / "checkpoints" / "ckpt_000004.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "ckpt_000004.pt", weights_only=False)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])


def test_memory_stage_seam_runs_after_warmup(tmp_path):
    """A memory stage that supplies no memories: pins the contract stage 2 plugs into."""
    calls = []

    def factory(ctx, stage):
        assert ctx.spec.context_position_offset == 128 and stage.chunk_size == 32

        def chunk_memories(model, batch: Batch):
            chunks = batch.chunks(stage.chunk_size)
            calls.append((batch.step, tuple(chunks.shape)))
            return [[[] for _ in row] for row in chunks]

        def inject(model, memories, batch):
            return contextlib.nullcontext()

        return MemoryHooks(chunk_memories, inject, ctx.spec.context_position_offset)

    register_memory_stage("test-empty", factory)
    cfg = tiny_config(tmp_path, eval_questions=0, stages=[
        StageConfig(name="warmup", steps=2, warmup_steps=0),
        StageConfig(name="memory", steps=2, warmup_steps=0, memory="test-empty", chunk_size=32),
    ])
    result = run_training(cfg)
    assert calls == [(2, (8, 2, 32)), (3, (8, 2, 32))]
    assert [r["stage"] for r in result.history] == ["warmup", "warmup", "memory", "memory"]

    bad = tiny_config(tmp_path / "bad", stages=[StageConfig(steps=1, memory="no-such-stage")])
    with pytest.raises(ValueError, match="unknown memory stage"):
        run_training(bad)


def test_batches_are_a_function_of_the_step():
    docs = [f"document {i} " * 20 for i in range(20)]
    from memory3.trainer.tokenizer import train_tokenizer

    tok = train_tokenizer(docs, 300)
    stream = TokenStream(docs, tok, seq_len=32, seed=1)
    assert torch.equal(stream.batch(5, 4).input_ids, stream.batch(5, 4).input_ids)
    assert not torch.equal(stream.batch(5, 4).input_ids, stream.batch(6, 4).input_ids)


def test_learning_rate_schedule():
    s = StageConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert learning_rate(s, 0) == pytest.approx(0.1)
    assert learning_rate(s, 9) == pytest.approx(1.0)
    assert learning_rate(s, 10) == pytest.approx(1.0)
    assert learning_rate(s, 100) == pytest.approx(0.1)
    assert all(learning_rate(s, i) >= learning_rate(s, i + 1) for i in range(10, 100))


def test_presets_and_shipped_configs():
    sizes = {name: count_parameters(build_model(name, 2048)) for name in ("tiny", "small")}
    assert 500_000 < sizes["tiny"] < 8_000_000 < sizes["small"] * 2
    assert set(PRESETS) >= {"tiny", "small", "base", "large"}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.preset in PRESETS and cfg.total_steps > 0
        assert any(stage.memory != "none" for stage in cfg.stages), f"{path.name} has no memory stage"
        assert max(cfg.memory_layers) < PRESETS[cfg.preset].n_layers  # every memory layer exists
    with pytest.raises(ValueError, match="no such preset; give a YAML path or one of: gpu, small, tiny"):
        load_config("tinny")
    cfg = load_config("tiny", ["world.n_entities=64", "stages.0.steps=7", "batch_size=4"])
    assert (cfg.world.n_entities, cfg.stages[0].steps, cfg.batch_size) == (64, 7, 4)
    with pytest.raises(ValueError, match="unknown config key"):
        load_config("tiny", ["world.n_entitys=64"])


def test_main_entry_point(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: tiny\nvocab_size: 512\nseq_len: 32\nbatch_size: 2\nprogress: false\n"
                   "num_threads: 1\neval_questions: 0\nworld: {n_entities: 30}\n"
                   "stages: [{name: warmup, steps: 2, warmup_steps: 0}]\n")
    assert main([str(cfg), "--out-dir", str(tmp_path / "run")]) == 0
    assert '"finished": true' in capsys.readouterr().out
    assert (tmp_path / "run" / "model" / "memory_spec.json").exists()
