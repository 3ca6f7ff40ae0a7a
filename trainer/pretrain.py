"""Two-stage pretraining of the reference model (Memory3 §3.4): one loop, stages in order.

Stage 1 (``memory: none``) trains without memory on the generated corpus. A stage whose
``memory`` names a registered factory (:func:`register_memory_stage`, or "package.module:function")
gets :class:`MemoryHooks`, and :func:`batch_loss` then reads each chunk's memories through them.
nanoGPT-style: a step's batch and learning rate are pure functions of (seed, step), so a checkpoint
(model, optimiser, step, RNG states) resumes to identical weights. A run writes ``tokenizer/``,
``checkpoints/``, ``loss.csv``/``loss.png``, ``stages/<name>/`` (each earlier stage's model),
``model/`` and ``result.json`` under ``out_dir``.

Measurements: docs/experiments.md
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from memory3.core.memory_spec import MemorySpec

from .config import CONFIG_DIR, StageConfig, TrainConfig, load_config
from .corpus import HELDOUT, TRAIN, QAPair, World, build_world, format_reference, normalize_answer
from .evaluate import generate_answers, prompt_ids
from .model import build_model, count_parameters, default_memory_spec, save_reference_model
from .tokenizer import encode_document, load_tokenizer, save_tokenizer, train_tokenizer

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One training batch. ``input_ids``/``labels``: (B, T); ``step``: the global step.

    ``chunks(size)`` views the ids as (B, T // size, size) — the unit a memory stage retrieves
    for; ``texts(tokenizer, size)`` decodes those chunks for text retrieval. ``preceding``: the
    stream's chunks right before each row's window (B, P, size), when the stream provides them,
    so a window's first chunks can read the references of the chunks before them.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    step: int
    preceding: torch.Tensor | None = None

    def chunks(self, size: int) -> torch.Tensor:
        b, t = self.input_ids.shape
        if t % size:
            raise ValueError(f"sequence length {t} is not a multiple of chunk size {size}")
        return self.input_ids.view(b, t // size, size)

    def texts(self, tokenizer, size: int) -> list[list[str]]:
        return [[tokenizer.decode(c, skip_special_tokens=True) for c in row] for row in self.chunks(size)]


class TokenStream:
    """All training documents tokenized (``<s> doc </s>``) and concatenated, sampled as random
    windows. A window may start mid-document: the model learns to pick up a context anywhere,
    and no padding is wasted."""

    def __init__(self, documents: Sequence[str], tokenizer, seq_len: int, seed: int):
        ids: list[int] = []
        for doc in documents:
            ids.extend(encode_document(tokenizer, doc))
        self.tokens = torch.tensor(ids, dtype=torch.long)
        self.seq_len = seq_len
        self.seed = seed
        if len(self.tokens) <= seq_len + 1:
            raise ValueError(f"corpus of {len(self.tokens)} tokens is too short for seq_len {seq_len}")

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, step: int, batch_size: int) -> Batch:
        """The batch of global ``step``: a function of (seed, step) only, hence resumable."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (batch_size,), generator=gen)
        window = torch.stack([self.tokens[s : s + self.seq_len] for s in starts.tolist()])
        return Batch(window, window.clone(), step)


def training_documents(world: World, include_train_references: bool) -> list[str]:
    """Stage 1's documents. Held-out references are never included: their facts must stay out
    of the weights."""
    docs = list(world.training_texts)
    if include_train_references:
        docs += [format_reference(r.text) for r in world.references_for(TRAIN)]
    return docs


# --------------------------------------------------------------------------------------------
# The memory seam (stage 2 plugs in here)
# --------------------------------------------------------------------------------------------

ChunkMemories = list  # [batch row][chunk] -> list of memories that chunk attends to


@dataclass
class MemoryHooks:
    """What a memory stage supplies to the loop.

    chunk_memories(model, batch) -> ChunkMemories: for every row and every ``chunk_size`` chunk,
        the memories it may read (its retrieved reference(s) and the previous chunks'),
        encoded by ``model`` itself.
    inject(model, memories, batch) -> context manager: inside it, ``model``'s memory layers
        prepend each chunk's memory K/V (the SDK's injection path).
    position_offset: first position id of the context: ``spec.context_position_offset`` when
        the context is placed after the memories' shared interval, or 0 when the injection path
        realises parallel positions by rotating the memory keys instead (memory3.sdk.model.positions).
    A stage that only brings its own stream (the RAG twin: memory3.trainer.rag_stage) leaves
    ``chunk_memories`` and ``inject`` None: its loss is the plain one.
    stream: the stage's own training data (anything with ``batch(step, batch_size) -> Batch``),
        or None for the run's stream. Why: learning to *read* memory needs text whose tokens are
        predictable only from the retrieved reference, which the stage-1 stream lacks (its facts
        are already in the weights); a memory stage mixes such text in.
    """

    chunk_memories: Callable[[torch.nn.Module, Batch], ChunkMemories] | None
    inject: Callable[[torch.nn.Module, ChunkMemories, Batch], contextlib.AbstractContextManager] | None
    position_offset: int
    stream: object | None = None
    # State the stage trains besides the model (e.g. a retrieval head): saved in checkpoints and
    # given back on resume; ``on_model_saved(model, model_dir)`` runs once the final model is saved.
    extra_state: Callable[[], dict] | None = None
    load_extra_state: Callable[[dict], None] | None = None
    on_model_saved: Callable[[torch.nn.Module, Path], None] | None = None


@dataclass
class TrainContext:
    """Everything a memory-stage factory may need."""

    config: TrainConfig
    world: World
    tokenizer: object
    model: torch.nn.Module
    spec: MemorySpec
    device: torch.device


MemoryStageFactory = Callable[[TrainContext, StageConfig], MemoryHooks]
_MEMORY_STAGES: dict[str, MemoryStageFactory] = {}


def register_memory_stage(name: str, factory: MemoryStageFactory) -> None:
    """Make ``memory: <name>`` in a stage config use ``factory``."""
    if name == "none":
        raise ValueError("'none' is reserved for stages without memory")
    _MEMORY_STAGES[name] = factory


def resolve_memory_stage(ctx: TrainContext, stage: StageConfig) -> MemoryHooks | None:
    if stage.memory == "none":
        return None
    factory = _MEMORY_STAGES.get(stage.memory)
    if factory is None and ":" in stage.memory:
        module, _, attr = stage.memory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    if factory is None:
        raise ValueError(
            f"stage {stage.name!r}: unknown memory stage {stage.memory!r}; register it with "
            f"register_memory_stage() or give 'package.module:function' (known: {sorted(_MEMORY_STAGES)})"
        )
    return factory(ctx, stage)


def batch_loss(model: torch.nn.Module, batch: Batch, hooks: MemoryHooks | None = None) -> torch.Tensor:
    """Mean next-token loss of a batch; with ``hooks``, each chunk reads its memories."""
    if hooks is None or hooks.chunk_memories is None:
        return model(input_ids=batch.input_ids, labels=batch.labels).loss
    memories = hooks.chunk_memories(model, batch)
    t = batch.input_ids.shape[1]
    positions = (torch.arange(t, device=batch.input_ids.device) + hooks.position_offset).unsqueeze(0)
    with hooks.inject(model, memories, batch):
        return model(input_ids=batch.input_ids, position_ids=positions.expand_as(batch.input_ids),
                     labels=batch.labels).loss


# --------------------------------------------------------------------------------------------
# Schedule, checkpoints, curves
# --------------------------------------------------------------------------------------------


def learning_rate(stage: StageConfig, stage_step: int) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at the end of the stage."""
    if stage.warmup_steps and stage_step < stage.warmup_steps:
        return stage.lr * (stage_step + 1) / stage.warmup_steps
    span = max(1, stage.steps - stage.warmup_steps)
    progress = min(1.0, (stage_step - stage.warmup_steps) / span)
    return stage.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (stage.lr - stage.min_lr)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, grad_clip: float) -> float:
    """Backward, clip the global gradient norm of ``params`` to ``grad_clip`` (0: off), step;
    returns the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(loss.detach())


def stage_at(config: TrainConfig, global_step: int) -> tuple[int, int]:
    """(stage index, step inside that stage) of a global step."""
    for i, s in enumerate(config.stages):
        if global_step < s.steps:
            return i, global_step
        global_step -= s.steps
    return len(config.stages) - 1, config.stages[-1].steps


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model, optimizer, step: int, history: list[dict], config: TrainConfig,
                    extras: dict | None = None) -> Path:
    """Atomic write (tmp + rename), so an interrupted save never leaves a broken newest file.
    ``extras``: the stages' own state (MemoryHooks.extra_state), by stage index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "rng": _rng_state(), "history": history, "config": config.to_dict(), "extras": extras or {}}, tmp)
    tmp.replace(path)
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((out_dir / "checkpoints").glob("ckpt_*.pt"))
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, model, optimizer, extras: dict | None = None) -> tuple[int, list[dict]]:
    """Restore model, optimizer and RNG; the stages' own state goes into ``extras``."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    if extras is not None:
        extras.update(state.get("extras") or {})
    return int(state["step"]), list(state["history"])


def _prune_checkpoints(out_dir: Path, keep: int) -> None:
    ckpts = sorted((out_dir / "checkpoints").glob("ckpt_*.pt"))
    for old in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        old.unlink()


HISTORY_FIELDS = ["step", "stage", "lr", "loss", "qa_train", "qa_heldout", "elapsed_s", "tokens"]


def write_curves(out_dir: Path, history: list[dict]) -> None:
    """loss.csv and loss.png (matplotlib Agg: no display needed)."""
    with open(out_dir / "loss.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        for row in history:
            w.writerow({k: row.get(k, "") for k in HISTORY_FIELDS})
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for stage in dict.fromkeys(r["stage"] for r in history):
        rows = [r for r in history if r["stage"] == stage and r.get("loss") is not None]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"loss ({stage})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    qa_rows = [r for r in history if r.get("qa_train") is not None]
    if qa_rows:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in qa_rows], [r["qa_train"] for r in qa_rows], "g--o", ms=3, label="QA EM train")
        ax2.plot([r["step"] for r in qa_rows], [r["qa_heldout"] for r in qa_rows], "r--o", ms=3, label="QA EM held-out")
        ax2.set_ylabel("QA exact match")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("memory3 reference model pretraining")
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# QA exact match (stage 1 monitoring: are the train facts in the weights?)
# --------------------------------------------------------------------------------------------


def qa_exact_match(model, tokenizer, pairs: Sequence[QAPair], new_tokens: int = TrainConfig.eval_new_tokens,
                   batch_size: int = TrainConfig.eval_batch_size) -> float:
    """Greedy QA exact match without memory (:func:`memory3.trainer.evaluate.generate_answers`,
    stopping at EOS)."""
    if not pairs:
        return float("nan")
    prompts = [prompt_ids(tokenizer, p.question, "plain") for p in pairs]
    got, _, _ = generate_answers(model, tokenizer, prompts, new_tokens=new_tokens, batch_size=batch_size,
                                 stop_at_eos=True)
    return sum(normalize_answer(g) == normalize_answer(p.answer) for g, p in zip(got, pairs)) / len(pairs)


def _sample_questions(world: World, split: str, n: int, seed: int) -> list[QAPair]:
    pairs = world.qa(split)
    if n >= len(pairs):
        return pairs
    return random.Random(seed).sample(pairs, n)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out_dir: str
    model_dir: str | None
    steps: int
    total_steps: int
    final_loss: float | None
    qa_train: float | None
    qa_heldout: float | None
    parameters: int
    corpus_tokens: int
    tokens_seen: int
    elapsed_s: float  # this invocation's training time
    train_time_s: float  # over all invocations (from the history)
    finished: bool
    history: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("history")
        return d


def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def prepare(config: TrainConfig):
    """World, tokenizer (trained once, then reloaded from ``out_dir/tokenizer``), token stream."""
    out_dir = Path(config.out_dir)
    world = build_world(config.world.seed, config.world.n_entities, config.world.heldout_fraction,
                        passages_per_entity=config.world.passages_per_entity)
    tok_dir = out_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = load_tokenizer(tok_dir)
    else:
        tok_texts = world.training_texts + [format_reference(r.text) for r in world.references]
        tokenizer = train_tokenizer(tok_texts, config.vocab_size)
        save_tokenizer(tokenizer, tok_dir)
    docs = training_documents(world, config.include_train_references)
    stream = TokenStream(docs, tokenizer, config.seq_len, config.seed)
    return world, tokenizer, stream


def run_training(config: TrainConfig, stop_at: int | None = None) -> TrainResult:
    """Train (or resume) the stages of ``config``; save checkpoints, curves and the final model.

    ``stop_at``: stop after this global step as if interrupted (a checkpoint is written); a later
    call with ``resume`` continues. Ctrl-C does the same.
    """
    config.validate()
    torch.set_num_threads(max(1, config.num_threads))
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    device = _device(config)

    world, tokenizer, stream = prepare(config)
    model = build_model(config.preset, len(tokenizer), seed=config.seed,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    spec = default_memory_spec(model, tuple(config.memory_layers) if config.memory_layers else None,
                               config.tokens_per_head, config.reference_length)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.stages[0].lr, betas=(config.beta1, config.beta2),
        fused=device.type == "cuda",
    )

    step, history = 0, []
    resumed_extras: dict = {}
    if not config.resume:  # a fresh run: stale checkpoints would be pruned wrongly or resumed later
        for stale in (out_dir / "checkpoints").glob("ckpt_*.pt"):
            stale.unlink()
    ckpt = latest_checkpoint(out_dir) if config.resume else None
    if ckpt is not None:
        step, history = load_checkpoint(ckpt, model, optimizer, resumed_extras)
        _optimizer_to(optimizer, device)

    eval_pairs = {s: _sample_questions(world, s, config.eval_questions, config.seed) for s in (TRAIN, HELDOUT)}
    ctx = TrainContext(config, world, tokenizer, model, spec, device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if config.dtype == "bfloat16" and device.type == "cuda" else contextlib.nullcontext())

    total = config.total_steps
    end = total if stop_at is None else min(total, stop_at)
    prior_time = history[-1]["elapsed_s"] if history else 0.0
    t0 = time.perf_counter()
    tokens_per_step = config.batch_size * config.seq_len
    last_loss = history[-1]["loss"] if history else None
    model.train()
    hooks_cache: dict[int, MemoryHooks | None] = {}
    bar = None

    def checkpoint(at: int) -> None:
        extras = {i: h.extra_state() for i, h in hooks_cache.items() if h is not None and h.extra_state is not None}
        extras = {**{i: s for i, s in resumed_extras.items() if i not in extras}, **extras}
        save_checkpoint(out_dir / "checkpoints" / f"ckpt_{at:06d}.pt", model, optimizer, at, history, config, extras)
        _prune_checkpoints(out_dir, config.keep_checkpoints)
        write_curves(out_dir, history)

    try:
        while step < end:
            si, sstep = stage_at(config, step)
            stage = config.stages[si]
            if si not in hooks_cache:
                hooks_cache[si] = resolve_memory_stage(ctx, stage)
                resumed = hooks_cache[si]
                if resumed is not None and resumed.load_extra_state is not None and si in resumed_extras:
                    resumed.load_extra_state(resumed_extras[si])
                if bar is not None:
                    bar.close()
                bar = _progress(config, stage, sstep, min(stage.steps, sstep + end - step))
            hooks = hooks_cache[si]
            lr = learning_rate(stage, sstep)
            for group in optimizer.param_groups:
                group["lr"] = lr
            source = hooks.stream if hooks is not None and hooks.stream is not None else stream
            batch = source.batch(step, config.batch_size)
            batch = Batch(batch.input_ids.to(device), batch.labels.to(device), step, batch.preceding)
            with autocast:
                loss = batch_loss(model, batch, hooks)
            last_loss = optimizer_step(loss, optimizer, model.parameters(), config.grad_clip)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}")

            stage_done = stage_at(config, step)[0] != si or step == total
            row = None
            if step % config.log_interval == 0 or stage_done or step == end:
                row = {"step": step, "stage": stage.name, "lr": lr, "loss": last_loss,
                       "elapsed_s": prior_time + time.perf_counter() - t0, "tokens": step * tokens_per_step}
            if config.eval_questions and (step % config.eval_interval == 0 or step == total):
                row = row or {"step": step, "stage": stage.name, "lr": lr, "loss": last_loss,
                              "elapsed_s": prior_time + time.perf_counter() - t0, "tokens": step * tokens_per_step}
                row["qa_train"] = qa_exact_match(model, tokenizer, eval_pairs[TRAIN], config.eval_new_tokens,
                                                 config.eval_batch_size)
                row["qa_heldout"] = qa_exact_match(model, tokenizer, eval_pairs[HELDOUT], config.eval_new_tokens,
                                                   config.eval_batch_size)
                if bar is not None:
                    bar.write(f"step {step}: loss {last_loss:.3f}  QA EM train {row['qa_train']:.2f}"
                              f"  held-out {row['qa_heldout']:.2f}")
            if row is not None:
                history.append(row)
            if step % config.checkpoint_interval == 0 or step == end:
                checkpoint(step)
            if stage_done and si < len(config.stages) - 1:
                save_reference_model(model, tokenizer, spec, stage_model_dir(out_dir, stage.name))
    except KeyboardInterrupt:
        checkpoint(step)
        raise
    finally:
        if bar is not None:
            bar.close()

    elapsed = time.perf_counter() - t0
    finished = step >= total
    model_dir = None
    qa_train = qa_heldout = None
    if finished:
        model_dir = str(save_reference_model(model, tokenizer, spec, out_dir / "model"))
        for hooks in hooks_cache.values():
            if hooks is not None and hooks.on_model_saved is not None:
                hooks.on_model_saved(model, Path(model_dir))
        evals = [r for r in history if r.get("qa_train") is not None]
        if evals:
            qa_train, qa_heldout = evals[-1]["qa_train"], evals[-1]["qa_heldout"]
    write_curves(out_dir, history)
    result = TrainResult(
        out_dir=str(out_dir), model_dir=model_dir, steps=step, total_steps=total, final_loss=last_loss,
        qa_train=qa_train, qa_heldout=qa_heldout, parameters=count_parameters(model),
        corpus_tokens=len(stream), tokens_seen=step * tokens_per_step, elapsed_s=elapsed,
        train_time_s=history[-1]["elapsed_s"] if history else 0.0, finished=finished, history=history,
    )
    (out_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result


def stage_model_dir(out_dir: str | Path, stage_name: str) -> Path:
    """Where a finished stage that is not the last one saves its model (loadable like ``model/``):
    stage 1's is the base a user's pretrained model stands for in ``memory3 adapt``'s measurement."""
    return Path(out_dir) / "stages" / stage_name


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)


def _progress(config: TrainConfig, stage: StageConfig, start: int, stop: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=stage.steps, initial=start, desc=f"stage {stage.name}", unit="step",
                dynamic_ncols=True, leave=True)


def presets_help() -> str:
    """The shipped configs with the first line of each one's header comment."""
    lines = ["presets (trainer/configs; every key: memory3.trainer.config):"]
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        comment = " ".join(line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#"))
        lines.append(f"  {path.stem:<8} {comment.split('. ')[0].removesuffix('.')}")
    lines.append("example: memory3 train tiny --out-dir runs/reference-tiny --set stages.1.steps=1500")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``memory3 train CONFIG.yaml [--out-dir DIR] [--set key=value ...] [--fresh]``."""
    parser = argparse.ArgumentParser(prog="memory3 train", description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=presets_help())
    parser.add_argument("config", help="YAML config: a path, or a preset name (below)")
    parser.add_argument("--out-dir", help="override out_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted (world.n_entities=400, stages.0.steps=50)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--stop-at", type=int, help="stop after this global step (resumable)")
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    overrides = list(args.overrides)
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    if args.fresh:
        overrides.append("resume=false")
    config = load_config(args.config, overrides)
    result = run_training(config, stop_at=args.stop_at)
    print(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
