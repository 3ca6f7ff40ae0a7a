"""Training configuration: one dataclass tree, loadable from YAML, every key defined once here.

nanoGPT style: hyperparameters are plain dataclass fields with their defaults and a comment;
a YAML file (``trainer/configs/*.yaml``) overrides any subset, and ``--set a.b=value`` on the
command line overrides that. Unknown keys are errors, so a typo never trains silently with the
default.

Measurements: docs/experiments.md
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from memory3.sdk.memory.pq import QUANTIZERS

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class WorldConfig:
    """The generated corpus (see :mod:`memory3.trainer.corpus`)."""

    seed: int = 0  # the world is a pure function of this seed
    n_entities: int = 200  # entities of all kinds, train and held-out
    heldout_fraction: float = 0.2  # share of each kind whose facts are only in references
    passages_per_entity: int = 3  # fact passages written per train entity


@dataclass
class DrillConfig:
    """Stage 2's memory drills (:func:`memory3.trainer.memory_stage.memory_drill`): Q/A documents
    about a second generated world whose facts are in no training text, only in its references."""

    entities_per_entity: int = 40  # drill entities generated per main-world entity
    min_entities: int = 40  # at least this many drill entities generated (build_world needs >= 20)
    docs_per_entity: int = 1  # Q/A drill documents per drill entity (each asks all its facts)
    in_context_fraction: float = 0.5  # share of drills that show their reference as text before the Q/A lines
    in_context_distractors: int = 0  # other same-kind references shown, shuffled, beside an in-context drill's own
    borrowed_value_fraction: float = 0.5  # share of name-valued drill facts that name a main-world train entity
    seed_offset: int = 7919  # the drill world's seed is the main world's plus this
    sheet_size: int = 5  # drills follow each other in runs of this many about entities of one kind
    answer_only_loss: bool = True  # the loss on a drill counts only its answer tokens (and the token after each)


@dataclass
class EvaluationConfig:
    """The reference-model report (:func:`memory3.trainer.evaluate.evaluate_run`)."""

    top_k: int = 5  # references retrieved per question (RAG texts / memories read)
    train_questions: int = 130  # train-entity questions evaluated beside the held-out ones (0: none)
    batch_size: int = 32  # questions per generate() call
    new_tokens: int = 8  # tokens generated per answer, always all of them (tok/s compares like for like)
    retrieval_prior_bias: float = 20.0  # memory_prior mode: attention logit lowered per unit cosine below the best


@dataclass
class StageConfig:
    """One training stage; stages run in order, each with its own cosine schedule."""

    name: str = "warmup"  # label in logs, loss.csv and the curve
    steps: int = 300  # optimiser steps of this stage
    lr: float = 3e-3  # peak learning rate, after warmup
    min_lr: float = 3e-4  # learning rate at the end of the stage's cosine decay
    warmup_steps: int = 20  # linear warmup steps at the start of the stage
    # "none": stage 1, no memory. Any other value names a memory-stage factory registered with
    # memory3.trainer.pretrain.register_memory_stage, or "package.module:function".
    memory: str = "none"
    chunk_size: int = 64  # stage 2: each chunk retrieves references ...
    references_per_chunk: int = 1  # ... this many (the paper: 1 in training)
    previous_chunks: int = 4  # ... and also attends to the previous chunks' references
    # seed offset of the memory-drill world the stage drills on: None = drill.seed_offset; a later
    # memory stage with another value reads entities it never saw
    drill_seed_offset: int | None = None
    # quantization-aware reading (memory3.trainer.quantization_aware): > 0 = every memory the stage
    # reads is first coded and decoded by a PQ codebook of this many bytes per vector ...
    pq_bytes: int = 0
    pq_quantizer: str = "residual"  # ... of this kind (memory3.sdk.memory.pq.QUANTIZERS) ...
    pq_sample: int = 500  # ... trained on this many memories of another generated world ...
    pq_refresh: int = 50  # ... with the current weights, again every this many steps
    # memory stages: memories encoded with autograd on, so the loss also trains the encoding side
    encode_with_grad: bool = True
    # memory stages: a window's first chunks also read the references of the stream's chunks before it
    previous_chunks_across_windows: bool = False
    # memory stages: > 0 also trains the model's retrieval head (memory3.sdk.memory.retrieval_head) on
    # the stage's own chunks, its InfoNCE loss times this weight beside the LM loss: each chunk's query
    # against the reference it retrieved, the batch's other references as negatives. The head alone
    # learns (the model's states are read detached: its loss and weights are those of a run without
    # it); the head is saved beside the final model. 0: off
    retriever_weight: float = 0.0
    retriever_dim: int = 128  # the head's vector dimension
    retriever_lr: float = 3e-3  # the head's own Adam learning rate


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"  # everything the run writes goes here
    seed: int = 0  # model initialisation and batch order
    world: WorldConfig = field(default_factory=WorldConfig)
    drill: DrillConfig = field(default_factory=DrillConfig)  # memory stages' drill documents
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)  # the report on the finished run
    # tokenizer
    vocab_size: int = 2048  # BPE vocabulary trained on the world's text
    # model
    preset: str = "tiny"  # memory3.trainer.model.PRESETS
    memory_layers: list[int] | None = None  # None: first half (the paper)
    tokens_per_head: int = 8  # sparse memory tokens kept per KV head
    reference_length: int = 128  # tokens of a reference a memory is encoded from, at most
    # data
    seq_len: int = 256  # a multiple of the stage chunk size
    batch_size: int = 16  # rows per optimiser step
    include_train_references: bool = True  # train entities' references as training text too
    # optimiser (AdamW)
    weight_decay: float = 0.1  # on matrices only; norms and biases get none
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm, 0 disables
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])  # run in order
    # bookkeeping
    log_interval: int = 10  # steps between loss rows in the history
    eval_interval: int = 100  # QA exact match on a sample of questions
    eval_questions: int = 100  # per split, 0 disables
    eval_new_tokens: int = 10  # greedy tokens per answer at most (stops at EOS)
    eval_batch_size: int = 64  # questions per generate() call
    checkpoint_interval: int = 100  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = True  # continue from the newest checkpoint in out_dir
    num_threads: int = 2  # torch CPU threads (the CPU machine is shared)
    device: str = "auto"  # "auto": cuda if available else cpu
    dtype: str = "float32"  # autocast dtype on GPU: float32 | bfloat16
    progress: bool = True  # tqdm bars

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return build_dataclass(cls, data or {})

    def validate(self) -> "TrainConfig":
        if not self.stages:
            raise ValueError("config needs at least one stage")
        for s in self.stages:
            if s.steps < 0 or s.warmup_steps < 0:
                raise ValueError(f"stage {s.name}: steps and warmup_steps must be >= 0")
            if s.memory != "none" and self.seq_len % s.chunk_size:
                raise ValueError(f"seq_len {self.seq_len} is not a multiple of chunk_size {s.chunk_size}")
            if s.pq_bytes < 0 or s.pq_sample < 1 or s.pq_refresh < 1:
                raise ValueError(f"stage {s.name}: pq_bytes must be >= 0, pq_sample and pq_refresh >= 1")
            if s.pq_bytes and s.memory == "none":
                raise ValueError(f"stage {s.name}: pq_bytes needs a memory stage (memory is 'none')")
            if s.retriever_weight < 0 or (s.retriever_weight and s.memory == "none"):
                raise ValueError(f"stage {s.name}: retriever_weight must be >= 0 and needs a memory stage")
            if s.pq_bytes and s.pq_quantizer not in QUANTIZERS:
                raise ValueError(f"stage {s.name}: pq_quantizer must be one of {QUANTIZERS}, got {s.pq_quantizer!r}")
        d = self.drill
        if not (0 <= d.in_context_fraction <= 1 and 0 <= d.borrowed_value_fraction <= 1):
            raise ValueError("drill.in_context_fraction and drill.borrowed_value_fraction must be in [0, 1]")
        if d.sheet_size < 1 or d.docs_per_entity < 0 or d.in_context_distractors < 0:
            raise ValueError("drill.sheet_size must be >= 1, docs_per_entity and in_context_distractors >= 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype}")
        return self


def build_dataclass(cls, data: dict, where: str = ""):
    """An instance of the config dataclass ``cls`` from a mapping (nested dataclasses, lists and
    Optional fields coerced); an unknown key or a wrong shape names its dotted place."""
    if not isinstance(data, dict):
        raise TypeError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or 'config'}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def _coerce(tp, value, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where + ".")
    origin = get_origin(tp)
    if origin is list:
        (item,) = get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    args = get_args(tp)
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(inner, value, where)
    if tp is float and isinstance(value, (int, float, str)):
        return float(value)
    if tp is int and isinstance(value, (int, str)) and not isinstance(value, bool):
        return int(value)
    if tp is bool and isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    return value


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (a path, or the name of a file in ``trainer/configs``), apply
    ``key.sub=value`` overrides (values parsed as YAML) and validate."""
    path = Path(path)
    if not path.exists() and (CONFIG_DIR / path).exists():
        path = CONFIG_DIR / path
    if not path.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        path = CONFIG_DIR / f"{path}.yaml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ValueError(f"config {str(path)!r}: no such file and no such preset; give a YAML path or one of: {presets}")
    data = yaml.safe_load(path.read_text()) or {}
    apply_overrides(data, overrides or [])
    return TrainConfig.from_dict(data).validate()


def apply_overrides(data: dict, overrides) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML; list items by index) to ``data``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def _set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if isinstance(node, list):
            node = node[int(p)]
        else:
            if p == "stages" and p not in node:
                node[p] = [dataclasses.asdict(StageConfig())]
            node = node.setdefault(p, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
