"""``memory3 adapt``: teach a frozen pretrained model to read explicit memories with a peft adapter.

A model that never saw memories reads them poorly. This trains a small LoRA adapter (peft) with
the reference model's stage-2 recipe (:class:`~memory3.trainer.memory_stage.RetrievalMemoryStage`:
each 64-token chunk reads its retrieved references' memories, Q/A drills whose answers are only
in references) while every base weight stays frozen. Memories are encoded by the *base* (the
encoder disables adapters, :mod:`memory3.sdk.model.adapters`), so a bank encoded once serves the
base and every adapter version. ``reading: rag`` trains the same budget to read references as
prompt text instead (the RAG adapter, :mod:`memory3.trainer.rag_stage`). The output directory is a
peft adapter (``PeftModel.from_pretrained`` loads it without memory3) plus ``memory3_adapter.json``
(base fingerprint, spec), ``checkpoints/`` (resume), ``loss.csv`` and ``loss.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from memory3.core.memory_spec import SPEC_FILENAME, MemorySpec
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.model.adapters import has_adapters, save_adapter
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.sdk.model.positions import memory_spec_for

from .config import DrillConfig, StageConfig, TrainConfig, WorldConfig, apply_overrides, build_dataclass
from .corpus import build_world
from .memory_stage import RetrievalMemoryStage, answer_loss, memory_drill
from .figures import caption
from .pretrain import Batch, TrainContext, batch_loss, learning_rate, optimizer_step
from .rag_stage import rag_stage

READINGS = ("memory", "rag")
HELDOUT_DRILL_SEED_OFFSET = 104729  # the answer-loss probe's drill world: entities no step trains on


def _default_stage() -> StageConfig:
    return StageConfig(name="adapt", steps=3000, lr=3e-3, min_lr=3e-4, warmup_steps=20, memory="adapter",
                       encode_with_grad=False)


@dataclass
class AdaptConfig:
    out_dir: str = "runs/adapter"  # the adapter directory (peft format) and its checkpoints
    base: str = ""  # the frozen base model's directory (transformers format, with its tokenizer)
    reading: str = "memory"  # "memory": chunks read memories; "rag": references as prompt text
    # "base": memories are the frozen base's (one bank serves every adapter); "adapted": the adapter
    # is also active, with gradients, while encoding — the other placement, measured against it: the
    # adapted model is then a new model (load_adapter merges it) whose bank must be re-encoded
    memories: str = "base"
    # the adapter (peft LoRA): rank, scale alpha/rank, dropout, and the modules it adapts
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "o_proj"])
    # a base without memory_spec.json: which layers read memory (None: first half) and how much
    memory_layers: list[int] | None = None
    tokens_per_head: int = 8
    reference_length: int = 128
    # data: the reference model's generated world and stage-2 drills (memory3.trainer.config)
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    drill: DrillConfig = field(default_factory=DrillConfig)
    include_train_references: bool = True
    seq_len: int = 256
    batch_size: int = 16
    stage: StageConfig = field(default_factory=_default_stage)  # steps, schedule, chunking (stage 2's)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # bookkeeping
    log_interval: int = 10
    eval_interval: int = 250  # answer loss with vs without memory on drills about unseen entities
    eval_documents: int = 64
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2
    resume: bool = True
    num_threads: int = 1
    progress: bool = True

    def validate(self) -> "AdaptConfig":
        if not self.base:
            raise ValueError("give the base model directory (--model)")
        if self.memories not in ("base", "adapted"):
            raise ValueError(f"memories must be 'base' or 'adapted', got {self.memories!r}")
        if self.reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}, got {self.reading!r}")
        if self.rank < 1 or not self.target_modules:
            raise ValueError("rank must be >= 1 and target_modules non-empty")
        if self.seq_len % self.stage.chunk_size:
            raise ValueError(f"seq_len {self.seq_len} is not a multiple of chunk_size {self.stage.chunk_size}")
        return self

    def train_config(self) -> TrainConfig:
        """The pretraining config the stage-2 data builders read (same world, drills, windows)."""
        return TrainConfig(out_dir=self.out_dir, seed=self.seed, world=self.world, drill=self.drill,
                           seq_len=self.seq_len, batch_size=self.batch_size,
                           include_train_references=self.include_train_references, stages=[self.stage])


def load_adapt_config(path: str | None, overrides: Sequence[str] = ()) -> AdaptConfig:
    """Defaults, then a YAML file, then ``key=value`` overrides (values parsed as YAML)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {} if path else {}
    return build_dataclass(AdaptConfig, apply_overrides(data, overrides)).validate()


def load_base(directory: str | Path, config: AdaptConfig):
    """(model, tokenizer, spec) of the base; the spec from memory_spec.json when memory3 wrote one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"base model directory {str(directory)!r} has no config.json: give a transformers model directory")
    model = AutoModelForCausalLM.from_pretrained(str(directory))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if (directory / SPEC_FILENAME).is_file():
        spec = MemorySpec.load(directory)
    else:
        layers = tuple(config.memory_layers) if config.memory_layers else None
        spec = memory_spec_for(model, layers, config.tokens_per_head, config.reference_length)
    return model, tokenizer, spec


def add_adapter(model: torch.nn.Module, config: AdaptConfig):
    """The peft model: LoRA on ``target_modules``, every base weight frozen."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


CURVE_FIELDS = ["step", "lr", "loss", "answer_loss_memory", "answer_loss_plain", "elapsed_s", "tokens"]


def write_adapter_curves(out_dir: Path, history: list[dict], config: AdaptConfig) -> None:
    """loss.csv and loss.png: the training loss, and the probe's answer loss on drills about
    unseen entities with the right memory vs without (the gap is what the adapter learned)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out_dir / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    if not history:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["step"] for r in history], [r["loss"] for r in history], lw=0.8)
    left.set(xlabel="step", ylabel="training loss", yscale="log",
             title=f"LoRA r{config.rank} on {'+'.join(config.target_modules)}, reading {config.reading}")
    probes = [r for r in history if r.get("answer_loss_memory") is not None]
    if probes:
        steps = [r["step"] for r in probes]
        right.plot(steps, [r["answer_loss_memory"] for r in probes], "o-", ms=3, label="with the right memory")
        right.plot(steps, [r["answer_loss_plain"] for r in probes], "o--", ms=3, label="without memory")
        right.legend()
    right.set(xlabel="step", ylabel="answer loss (nats/token)",
              title=f"{config.eval_documents} drills about entities no step trains on")
    caption(fig, f"adapter on {config.base}")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)


@dataclass
class AdaptResult:
    out_dir: str
    steps: int
    finished: bool
    final_loss: float | None
    trainable_parameters: int
    base_parameters: int
    train_time_s: float
    seconds_per_step: float | None
    answer_loss_memory: float | None
    answer_loss_plain: float | None
    base_fingerprint: str


def probe_drills(config: AdaptConfig, world, tokenizer) -> tuple[list[str], list[list[str]]]:
    """Drill documents about entities no step trains on, and each one's reference."""
    drill = memory_drill(world, config.drill, n_entities=max(40, config.eval_documents),
                         seed_offset=HELDOUT_DRILL_SEED_OFFSET)
    plain = [i for i, d in enumerate(drill.documents) if not d.startswith("Reference")][: config.eval_documents]
    return [drill.documents[i] for i in plain], [[drill.references[i]] for i in plain]


def run_adapt(config: AdaptConfig, stop_at: int | None = None) -> AdaptResult:
    """Train (or resume) the adapter of ``config``; see the module docstring."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    config.validate()
    torch.set_num_threads(max(1, config.num_threads))
    out_dir = Path(config.out_dir)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    model, tokenizer, spec = load_base(config.base, config)
    if has_adapters(model):
        raise ValueError("the base model already carries an adapter")
    base_fingerprint = model_fingerprint(model)
    peft_model = add_adapter(model, config)
    trainable, frozen = count_trainable(peft_model)
    train_config = config.train_config()
    world = build_world(config.world.seed, config.world.n_entities, config.world.heldout_fraction,
                        passages_per_entity=config.world.passages_per_entity)
    ctx = TrainContext(train_config, world, tokenizer, model, spec, torch.device("cpu"))
    probe_encoder = None
    if config.reading == "memory":
        adapted_memories = config.memories == "adapted"
        memory_stage = RetrievalMemoryStage(ctx, replace(config.stage, encode_with_grad=adapted_memories))
        if adapted_memories:
            memory_stage.encoder = probe_encoder = MemoryEncoder(model, tokenizer, spec, batch_size=64,
                                                                 adapters_encode=True)
        hooks = memory_stage.hooks()
    else:
        hooks = rag_stage(ctx, config.stage)
    probe_docs, probe_refs = probe_drills(config, world, tokenizer)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.stage.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))

    step, history = 0, []
    ckpts = sorted((out_dir / "checkpoints").glob("ckpt_*.pt")) if config.resume else []
    if ckpts:
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
        if state["base_fingerprint"] != base_fingerprint:
            raise ValueError(f"checkpoints in {out_dir} belong to another base model; use another --out or --fresh")
        set_peft_model_state_dict(peft_model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
    elif not config.resume:
        for stale in (out_dir / "checkpoints").glob("ckpt_*.pt"):
            stale.unlink()

    def checkpoint(at: int) -> None:
        path = out_dir / "checkpoints" / f"ckpt_{at:06d}.pt"
        torch.save({"adapter": get_peft_model_state_dict(peft_model), "optimizer": optimizer.state_dict(),
                    "step": at, "history": history, "base_fingerprint": base_fingerprint,
                    "config": asdict(config)}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        for old in sorted((out_dir / "checkpoints").glob("ckpt_*.pt"))[: -max(1, config.keep_checkpoints)]:
            old.unlink()
        write_adapter_curves(out_dir, history, config)

    def probe() -> tuple[float, float]:
        if probe_encoder is None:
            with_memory = answer_loss(model, tokenizer, spec, probe_docs, references=probe_refs)
        else:
            with torch.no_grad():
                memories = [[m] for m in probe_encoder.encode([r for (r,) in probe_refs])]
            with_memory = answer_loss(model, tokenizer, spec, probe_docs, memories=memories)
        return with_memory, answer_loss(model, tokenizer, spec, probe_docs)

    total = config.stage.steps
    end = total if stop_at is None else min(total, stop_at)
    prior = history[-1]["elapsed_s"] if history else 0.0
    t0 = time.perf_counter()
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=f"adapt ({config.reading})", unit="step", dynamic_ncols=True)
    peft_model.train()
    last = history[-1]["loss"] if history else None
    try:
        while step < end:
            lr = learning_rate(config.stage, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = hooks.stream.batch(step, config.batch_size)
            loss = batch_loss(model, Batch(batch.input_ids, batch.labels, step, batch.preceding), hooks)
            last = optimizer_step(loss, optimizer, params, config.grad_clip)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last:.3f}", lr=f"{lr:.2e}")
            if step % config.log_interval == 0 or step == end:
                row = {"step": step, "stage": f"adapt ({config.reading})", "lr": lr, "loss": last,
                       "elapsed_s": prior + time.perf_counter() - t0, "tokens": step * config.batch_size * config.seq_len}
                if config.eval_interval and (step % config.eval_interval == 0 or step == total):
                    row["answer_loss_memory"], row["answer_loss_plain"] = probe()
                history.append(row)
            if step % config.checkpoint_interval == 0 or step == end:
                checkpoint(step)
    except KeyboardInterrupt:
        checkpoint(step)
        raise
    finally:
        if bar is not None:
            bar.close()

    finished = step >= total
    train_time = history[-1]["elapsed_s"] if history else 0.0
    with_memory = without = None
    if finished:
        with_memory, without = probe()
        save_adapter(peft_model, out_dir, base_fingerprint, spec.to_dict(), reading=config.reading,
                     memories=config.memories, method="lora",
                     target_modules=list(config.target_modules), rank=config.rank, trainable_parameters=trainable,
                     base_parameters=frozen, steps=step, train_time_s=train_time, base=str(config.base))
    write_adapter_curves(out_dir, history, config)
    result = AdaptResult(str(out_dir), step, finished, last, trainable, frozen, train_time,
                         train_time / step if step else None, with_memory, without, base_fingerprint)
    (out_dir / "result.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``memory3 adapt --model BASE_DIR --out ADAPTER_DIR [--config YAML] [--set key=value ...]``."""
    parser = argparse.ArgumentParser(prog="memory3 adapt", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", required=True, help="the frozen base model's directory")
    parser.add_argument("--out", required=True, help="the adapter directory to write (and resume)")
    parser.add_argument("--config", help="YAML overriding memory3.trainer.adapt.AdaptConfig's defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, dotted (rank=4, stage.steps=500, reading=rag)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--stop-at", type=int, help="stop after this step (resumable)")
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    overrides = [*args.overrides, f"base={args.model}", f"out_dir={args.out}"] + (["resume=false"] if args.fresh else [])
    result = run_adapt(load_adapt_config(args.config, overrides), stop_at=args.stop_at)
    print(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
