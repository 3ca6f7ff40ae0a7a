"""`memory3 train-retriever`: InfoNCE on a frozen model trains only the head (the model's
fingerprint is unchanged), lifts held-out recall far above the untrained head's, and saves the head
beside the model where loading checks it against the model; hard negatives are of the same kind;
a validation world no step trains on picks the head kept and stops training."""

import json
from pathlib import Path

import pytest
import torch

from helpers import small_world_and_tokenizer
from memory3.cli.main import main as cli_main
from memory3.sdk.memory.retrieval_head import HEAD_FILENAME, RetrievalHead, RetrievalSpaceError
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.trainer.corpus import HELDOUT, build_world
from memory3.trainer.model import build_model, default_memory_spec, load_reference_model, save_reference_model
from memory3.trainer.retriever import (
    RetrieverConfig,
    Validation,
    evaluate_head,
    train_head,
    training_pairs,
    validation_world,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    world, tokenizer = small_world_and_tokenizer()
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    model = build_model("tiny", len(tokenizer), seed=0, **ids)
    spec = default_memory_spec(model, (0, 1), tokens_per_head=8)
    run = tmp_path_factory.mktemp("run")
    save_reference_model(model, tokenizer, spec, run / "model")
    (run / "config.json").write_text(json.dumps({"world": {"seed": 0, "n_entities": 40, "heldout_fraction": 0.2}}))
    return run


def test_pairs_hold_out_the_heldout_entities_and_cover_a_second_world():
    world = build_world(0, 40, 0.2)
    extra = build_world(7919, 30, 0.2, passages_per_entity=0, qa_docs=0, filler_docs=0)
    pairs = training_pairs(world, extra)
    heldout_refs = {r.text for r in world.references if r.split == HELDOUT}
    assert not heldout_refs & set(pairs.references)
    assert len(pairs.references) == len(world.split_entities("train")) + 30
    assert {pairs.kinds[i] for i, _ in pairs.queries} == {"person", "city", "company", "invention"}
    assert any(q.startswith("Q: ") for _, q in pairs.queries) and any(not q.startswith("Q: ") for _, q in pairs.queries)


def test_only_the_head_trains_and_recall_rises(run_dir):
    model, tokenizer, spec = load_reference_model(run_dir / "model")
    before = model_fingerprint(model)
    world = build_world(0, 40, 0.2)
    extra = build_world(7919, 200, 0.2, passages_per_entity=0, qa_docs=0, filler_docs=0)
    untrained = RetrievalHead.for_model(model, 32, seed=0)
    base = evaluate_head(untrained, model, tokenizer, spec, world)["model_space"]
    head, history = train_head(model, tokenizer, spec, training_pairs(world, extra),
                               RetrieverConfig(dim=32, steps=60, batch_size=64, hard_negatives=4))
    assert model_fingerprint(model) == before and all(p.requires_grad for p in model.parameters())
    trained = evaluate_head(head, model, tokenizer, spec, world)["model_space"]
    assert history[-1]["loss"] < history[0]["loss"] / 2
    assert trained["recall@5"] >= 0.9 and trained["recall@1"] > base["recall@1"] + 0.3, (base, trained)


def test_validation_keeps_the_best_head_and_stops_after_patience(run_dir):
    """The head returned is the one with the lowest validation loss seen (not the last), and training
    ends ``patience`` validations after it unless the step budget ends first."""
    model, tokenizer, spec = load_reference_model(run_dir / "model")
    world = build_world(0, 40, 0.2)
    extra = build_world(7919, 60, 0.2, passages_per_entity=0, qa_docs=0, filler_docs=0)
    config = RetrieverConfig(dim=16, steps=400, batch_size=32, hard_negatives=4, lr=0.03, eval_every=5, patience=2,
                             validation_entities=30)
    held_apart = validation_world(0, config)
    assert not {e.name for e in held_apart.entities} & {e.name for e in world.entities + extra.entities}
    validation = Validation(model, tokenizer, spec, held_apart)
    head, history = train_head(model, tokenizer, spec, training_pairs(world, extra), config, validation=validation)
    losses = [(h["step"], h["validation"]["loss"]) for h in history if "validation" in h]
    best_step, best_loss = min(losses, key=lambda pair: pair[1])
    assert validation(head)["loss"] == pytest.approx(best_loss, rel=1e-5)
    after_best = [step for step, _ in losses if step > best_step]
    assert len(history) == config.steps or len(after_best) == config.patience
    assert len(history) < config.steps, "lr 0.03 on a tiny world overfits within 400 steps: validation stops it"


def test_cli_saves_the_head_beside_the_model(run_dir, tmp_path):
    model_dir = run_dir / "model"
    cli_main(["train-retriever", "--model", str(model_dir), "--steps", "5", "--dim", "16", "--extra-entities", "20",
              "--batch-size", "16", "--threads", "1", "--validation-entities", "20"])
    metrics = json.loads((model_dir / "retrieval_head.json").read_text())
    assert (model_dir / HEAD_FILENAME).is_file() and metrics["world"]["entities"] == 40
    assert set(metrics["heldout"]["model_space"]) == {"recall@1", "recall@5"} and len(metrics["loss"]) == 5
    assert [v["step"] for v in metrics["validation"]] == [5] and metrics["kept_step"] == 5
    model, _, _ = load_reference_model(model_dir)
    assert RetrievalHead.load(model_dir, model).space == metrics["space"]
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)  # other weights: another model
    with pytest.raises(RetrievalSpaceError, match="belongs to model"):
        RetrievalHead.load(model_dir, model)


def test_stage2_trains_the_head_beside_the_lm_and_leaves_the_model_as_without_it(tmp_path):
    """`retriever_weight > 0` in stage 2: the head trains on the stage's chunks (resumable from a
    checkpoint) and is saved beside the final model, bound to it; the model is bit for bit the
    model of the same run without it."""
    from dataclasses import replace

    from helpers import two_stage_config
    from memory3.trainer.pretrain import run_training

    def config(out, weight):
        c = two_stage_config(out, stage1=3, stage2=4, checkpoint_interval=5)
        c.stages[1] = replace(c.stages[1], retriever_weight=weight, retriever_dim=32)
        return c

    off = run_training(config(tmp_path / "off", 0.0))
    partial = run_training(config(tmp_path / "on", 1.0), stop_at=5)
    extras = torch.load(tmp_path / "on" / "checkpoints" / "ckpt_000005.pt", weights_only=False)["extras"]
    assert len(extras[1]["losses"]) == 2 and not partial.finished  # two stage-2 steps before the stop
    on = run_training(config(tmp_path / "on", 1.0))
    a, _, _ = load_reference_model(off.model_dir)
    b, _, _ = load_reference_model(on.model_dir)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert not (Path(off.model_dir) / HEAD_FILENAME).exists()
    head = RetrievalHead.load(on.model_dir, b)  # bound to the final weights
    assert head.dim == 32 and head.space.startswith(f"model:{model_fingerprint(b)[:16]}:")
    with pytest.raises(ValueError, match="retriever_weight"):
        replace(config(tmp_path / "x", 1.0), stages=[replace(config(tmp_path / "x", 1.0).stages[0],
                                                             retriever_weight=1.0)]).validate()
