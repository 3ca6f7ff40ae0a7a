"""Evaluation of the reference model: QA exact match and tokens/s, written as a report.

Modes, on the same questions and the same retrieved references (Memory3 §5): ``plain`` (no
memory), ``rag`` (top-k reference texts in the prompt), ``memory`` (their explicit memories
injected through :class:`~memory3.sdk.memory.injection.MemoryInjector`) and ``memory_prior`` (the
same memories under the injector's retrieval prior, reported beside ``memory``). Retrieval is one
in-process index over all the world's references — MiniLM's, or the model's own space with
``--retrieval-head`` (:class:`~memory3.trainer.retriever.ModelSpaceIndex`) — dropping references
that overlap the question by more than :data:`~memory3.trainer.corpus.EVAL_OVERLAP_LIMIT`. One greedy loop
(:func:`generate_answers`) serves every mode and the training-time QA monitor. Settings:
:class:`~memory3.trainer.config.EvaluationConfig`; ``python -m memory3.trainer.evaluate RUN_DIR``.

Measurements: docs/experiments.md
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.injection import MemoryInjector
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.sdk.model.sampling import left_pad

from .config import EvaluationConfig, TrainConfig
from .corpus import (
    EVAL_OVERLAP_LIMIT,
    HELDOUT,
    TRAIN,
    QAPair,
    World,
    build_world,
    format_qa_prompt,
    format_reference,
    normalize_answer,
    token_overlap,
)
from .model import count_parameters, load_reference_model
from .figures import caption, machine
from .retrieval_index import ReferenceIndex

MODES = ("plain", "rag", "memory", "memory_prior")
MODE_LABELS = {"plain": "no memory", "rag": "RAG (top-k texts in prompt)", "memory": "explicit memory (top-k)",
               "memory_prior": "explicit memory (top-k), retrieval prior"}
PLOT_LABELS = {"plain": "no memory", "rag": "RAG", "memory": "memory", "memory_prior": "memory + prior"}
MEMORY_MODES = ("memory", "memory_prior")
QUERIES = ("question", "prompt")


# ------------------------------------------------------------------ retrieval with the eval rule


def retrieve_for_questions(index: ReferenceIndex, questions: Sequence[str], top_k: int = EvaluationConfig.top_k,
                           overlap_limit: float = EVAL_OVERLAP_LIMIT, with_scores: bool = False,
                           query_texts: Sequence[str] | None = None):
    """Per question, the top-k reference positions after dropping references that overlap the
    question by more than ``overlap_limit``; and how many candidates that rule dropped. With
    ``with_scores``: (positions, their similarity scores, dropped). ``query_texts`` (one per
    question) are searched with instead of the questions (e.g. the prompt the model reads); the
    overlap rule still compares the question."""
    dropped = 0

    def exclude(question: str, position: int) -> bool:
        nonlocal dropped
        drop = token_overlap(question, index.texts[position]) > overlap_limit
        dropped += drop
        return drop

    vectors = index.embed_queries(list(query_texts)) if query_texts is not None else None
    found = index.search_scored(list(questions), top_k, exclude, query_vectors=vectors)
    positions, scores = [f[0] for f in found], [f[1] for f in found]
    return (positions, scores, dropped) if with_scores else (positions, dropped)


def index_space(index: ReferenceIndex) -> str:
    """The space an index retrieves in: its head's (model space) or its text embedder's name."""
    head = getattr(index, "head", None)
    return head.space if head is not None else index.embedder.name


def model_space_index(run: "RunUnderTest", head_dir: str | Path) -> ReferenceIndex:
    """The run's references indexed in its model's space by the retrieval head saved in
    ``head_dir`` (refused unless trained for this model)."""
    from memory3.sdk.memory.retrieval_head import RetrievalHead

    from .retriever import ModelSpaceIndex

    head = RetrievalHead.load(head_dir, run.model)
    return ModelSpaceIndex(run.index.texts, head, run.model, run.tokenizer, run.spec)


# ------------------------------------------------------------------ one greedy loop, three modes


def prompt_ids(tokenizer, question: str, mode: str, reference_texts: Sequence[str] = ()) -> list[int]:
    """Token ids of a mode's prompt. RAG puts each reference as ``Reference: text`` on its own
    line (nearest first) before the question; the others ask the question alone."""
    if mode == "rag" and reference_texts:
        context = "\n".join(format_reference(t) for t in reference_texts) + "\n"
        return tokenizer(context + format_qa_prompt(question))["input_ids"]
    return tokenizer(format_qa_prompt(question))["input_ids"]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[list[int]],
                     memories: Sequence[Sequence[ExplicitMemory]] | None = None, spec=None,
                     new_tokens: int = EvaluationConfig.new_tokens, batch_size: int = EvaluationConfig.batch_size,
                     scores: Sequence[Sequence[float]] | None = None, retrieval_bias: float = 0.0,
                     stop_at_eos: bool = False) -> tuple[list[str], float, int]:
    """Greedy answers (the first line of each continuation) for token-id prompts, left-padded in
    batches; with ``memories`` (one list per prompt) they are injected, with ``scores`` and
    ``retrieval_bias`` under the injector's retrieval prior. Exactly ``new_tokens`` tokens are
    generated per prompt, or with ``stop_at_eos`` at most that many (a row stops at EOS).
    Returns (answers, seconds, generated tokens)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    injector = MemoryInjector(model, spec, retrieval_bias=retrieval_bias) if memories is not None else None
    answers: list[str] = []
    seconds, generated = 0.0, 0
    try:
        if injector is not None:
            injector.activate()
        for i in range(0, len(prompts), batch_size):
            rows = [list(p) for p in prompts[i : i + batch_size]]
            input_ids, mask = left_pad(rows, pad, device)
            t0 = time.perf_counter()
            if injector is not None:
                injector.set_memories([list(m) for m in memories[i : i + batch_size]],
                                      scores[i : i + batch_size] if scores is not None else None)
            fixed_length = {} if stop_at_eos else {"min_new_tokens": new_tokens}
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 **fixed_length, do_sample=False, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
            seconds += time.perf_counter() - t0
            new = out[:, input_ids.shape[1] :]
            generated += new.numel()
            answers += [tokenizer.decode(r, skip_special_tokens=True).split("\n", 1)[0].strip() for r in new]
    finally:
        if injector is not None:
            injector.deactivate()
        model.train(was_training)
    return answers, seconds, generated


# ------------------------------------------------------------------ the evaluation


@dataclass
class ModeResult:
    mode: str
    exact_match: float
    correct: int
    questions: int
    tokens_per_s: float
    seconds: float
    generated_tokens: int
    hits: list[bool] = field(default_factory=list)  # per question, in order: answered exactly


@dataclass
class Evaluation:
    split: str
    top_k: int
    questions: int
    retrieval_hit_rate: float  # the question's own entity among the kept top-k
    dropped_by_overlap: int
    retrieval_s: float
    memory_bank_s: float
    references: int
    modes: dict[str, ModeResult] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    retriever: str = "all-MiniLM-L6-v2"  # the index's space (a model space: model:<fingerprint>:<head>)
    query: str = "question"  # what was searched with: the question's text or the prompt the model reads

    def to_dict(self) -> dict:
        return asdict(self)


def encode_memory_bank(model, tokenizer, spec, texts: Sequence[str]) -> tuple[list[ExplicitMemory], float]:
    """Every reference's memory, encoded once by the model itself (warm start)."""
    t0 = time.perf_counter()
    memories = MemoryEncoder(model, tokenizer, spec, batch_size=64).encode(list(texts))
    return memories, time.perf_counter() - t0


def evaluate_qa(model, tokenizer, spec, world: World, pairs: Sequence[QAPair], index: ReferenceIndex | None = None,
                bank: Sequence[ExplicitMemory] | None = None, top_k: int = EvaluationConfig.top_k,
                modes: Sequence[str] = MODES, new_tokens: int = EvaluationConfig.new_tokens,
                batch_size: int = EvaluationConfig.batch_size, split: str = HELDOUT,
                retrieval_bias: float = EvaluationConfig.retrieval_prior_bias, query: str = "question") -> Evaluation:
    """QA exact match of ``pairs`` in each mode, on the same questions and retrieved references.

    ``index`` and ``bank`` cover ``world.references`` in order (built here when not given);
    ``retrieval_bias`` is the ``memory_prior`` mode's; ``query``: search with the question's text
    (``"question"``) or with the QA prompt the model reads (``"prompt"``, what a decoding chunk sends).
    """
    if query not in QUERIES:
        raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
    texts = [r.text for r in world.references]
    index = index or ReferenceIndex(texts)
    if bank is None and set(MEMORY_MODES) & set(modes):
        bank, bank_s = encode_memory_bank(model, tokenizer, spec, texts)
    else:
        bank_s = 0.0
    questions = [p.question for p in pairs]
    t0 = time.perf_counter()
    query_texts = [format_qa_prompt(q) for q in questions] if query == "prompt" else None
    retrieved, scores, dropped = retrieve_for_questions(index, questions, top_k, with_scores=True,
                                                        query_texts=query_texts)
    retrieval_s = time.perf_counter() - t0
    hits = sum(world.references[p.entity_id].id in {world.references[i].id for i in r}
               for p, r in zip(pairs, retrieved))
    ev = Evaluation(split, top_k, len(pairs), hits / max(1, len(pairs)), dropped, retrieval_s, bank_s, len(texts),
                    retriever=index_space(index), query=query)
    for mode in modes:
        prompts = [prompt_ids(tokenizer, q, mode, [texts[i] for i in r]) for q, r in zip(questions, retrieved)]
        memories = [[bank[i] for i in r] for r in retrieved] if mode in MEMORY_MODES else None
        bias = retrieval_bias if mode == "memory_prior" else 0.0
        answers, seconds, generated = generate_answers(model, tokenizer, prompts, memories, spec, new_tokens, batch_size,
                                                       scores, bias)
        correct = [normalize_answer(a) == normalize_answer(p.answer) for a, p in zip(answers, pairs)]
        ev.modes[mode] = ModeResult(mode, sum(correct) / max(1, len(pairs)), sum(correct), len(pairs),
                                    generated / seconds if seconds else float("nan"), seconds, generated, correct)
        for j in range(min(3, len(pairs))):
            if len(ev.examples) < 3 * len(modes):
                ev.examples.append({"mode": mode, "question": questions[j], "answer": pairs[j].answer, "got": answers[j]})
    return ev


# ------------------------------------------------------------------ the report


def _run_facts(run_dir: Path) -> dict:
    result = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else {}
    history = result.get("history") or []
    facts = {"train_time_s": result.get("train_time_s"), "tokens_seen": result.get("tokens_seen"),
             "corpus_tokens": result.get("corpus_tokens"), "steps": result.get("steps")}
    csv_path = run_dir / "loss.csv"
    if csv_path.exists():  # per-stage time from the curve: elapsed at each stage's last row
        import csv

        rows = list(csv.DictReader(csv_path.open()))
        stages: dict[str, float] = {}
        for r in rows:
            if r.get("elapsed_s"):
                stages[r["stage"]] = float(r["elapsed_s"])
        prev, per_stage = 0.0, {}
        for name, end in stages.items():
            per_stage[name] = end - prev
            prev = end
        facts["stage_time_s"] = per_stage
    del history
    return facts


def report_markdown(evals: Sequence[Evaluation], info: dict) -> str:
    lines = ["# Reference model: QA exact match in three modes", "",
             f"model `{info['model_dir']}`: {info['parameters'] / 1e6:.2f} M parameters "
             f"({info['layers']} layers, memory layers {info['memory_layers']}, {info['tokens_per_head']} tokens/head); "
             f"world of {info['entities']} entities ({info['heldout_entities']} held out), "
             f"{info['references']} references, training corpus {info['corpus_tokens']} tokens "
             f"(stage 2 adds {info.get('drill_entities', '?')} memory-drill entities); "
             f"trained {info['steps']} steps, {info['train_time_s'] / 60:.1f} min on {info['device']} "
             f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in info.get('stage_time_s', {}).items())}).", ""]
    for ev in evals:
        base = ev.modes.get("plain")
        lines += [f"## {ev.split} questions ({ev.questions}; top-{ev.top_k} references, question's own reference "
                  f"retrieved for {ev.retrieval_hit_rate:.0%}, {ev.dropped_by_overlap} candidates dropped by the "
                  f"> 2/3 overlap rule)", "",
                  "| mode | exact match | vs no memory | tok/s | tok/s vs no memory |",
                  "|---|---:|---:|---:|---:|"]
        for mode in MODES:
            r = ev.modes.get(mode)
            if r is None:
                continue
            delta = f"{(r.exact_match - base.exact_match) * 100:+.1f} pt" if base else ""
            ratio = f"{r.tokens_per_s / base.tokens_per_s:.2f}×" if base and base.tokens_per_s else ""
            lines.append(f"| {MODE_LABELS[mode]} | {r.exact_match:.1%} ({r.correct}/{r.questions}) | {delta} | "
                         f"{r.tokens_per_s:.0f} | {ratio} |")
        lines.append("")
        lines.append(f"retrieval {ev.retrieval_s:.2f} s for {ev.questions} questions ({ev.retriever}, searched with the "
                     f"{ev.query}, shared by RAG and memory); "
                     f"memory bank: {ev.references} references encoded in {ev.memory_bank_s:.2f} s (once).")
        lines.append("")
    if info.get("memory_by_top_k"):
        lines += ["Explicit memory on held-out questions by how many retrieved memories each reads (reading "
                  "one memory vs picking the right one among similar ones): "
                  + ", ".join(f"top-{k} {c / n:.1%} ({c}/{n})" for k, (c, n) in sorted(info["memory_by_top_k"].items(),
                                                                                    key=lambda kv: int(kv[0]))) + ".", ""]
    held = next((e for e in evals if e.split == HELDOUT), None)
    if held and {"plain", "rag"} <= set(held.modes):
        p, r = held.modes["plain"].exact_match, held.modes["rag"].exact_match
        lines += ["## targets (held-out)", ""]
        for mode in MEMORY_MODES:
            if mode in held.modes:
                m, label = held.modes[mode].exact_match, MODE_LABELS[mode]
                lines += [f"- {label} ≥ no memory + 50 pt: {m:.1%} vs {p + 0.5:.1%} → "
                          f"{'met' if m >= p + 0.5 else 'NOT met'}",
                          f"- {label} ≥ RAG − 2 pt: {m:.1%} vs {r - 0.02:.1%} → {'met' if m >= r - 0.02 else 'NOT met'}"]
        lines.append("")
    return "\n".join(lines)


def save_plot(evals: Sequence[Evaluation], path: Path, model: str = "reference model",
              hardware: str | None = None) -> None:
    """Exact match per mode (and split) beside generation speed; stands alone (title, caption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(1, len(evals))
    for j, ev in enumerate(evals):
        modes = [m for m in MODES if m in ev.modes]
        xs = [i + j * width for i in range(len(modes))]
        ax1.bar(xs, [ev.modes[m].exact_match for m in modes], width, label=f"{ev.split} questions")
        if j == 0:
            ax2.bar(range(len(modes)), [ev.modes[m].tokens_per_s for m in modes], 0.6, color="gray")
            ax2.set_xticks(range(len(modes)), [PLOT_LABELS[m] for m in modes])
        ax1.set_xticks([i + width * (len(evals) - 1) / 2 for i in range(len(modes))], [PLOT_LABELS[m] for m in modes])
    ax1.set_ylim(0, 1.15)
    ax1.set_ylabel("QA exact match")
    ax1.legend(fontsize=8, loc="upper center", ncol=2)
    counts = ", ".join(f"{ev.questions} {ev.split}" for ev in evals)
    ax1.set_title(f"accuracy ({counts} questions, top-{evals[0].top_k} retrieved)" if evals else "accuracy")
    ax2.set_ylabel("generated tokens / s")
    ax2.set_title("speed (same loop, same batches)")
    fig.suptitle("Answering from memory vs RAG vs no memory. \"+ prior\": each memory's attention lowered by "
                 "the retriever's margin to the best one", fontsize=9)
    fig.tight_layout()
    caption(fig, model, hardware)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The configuration a training run saved (``config.json``)."""
    return TrainConfig.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))


@dataclass
class RunUnderTest:
    """A training run's saved model with the world it was trained on, that world's retrieval
    index and its warm-start memory bank: what every evaluation of the run starts from."""

    config: TrainConfig
    model: torch.nn.Module
    tokenizer: object
    spec: object
    world: World
    index: ReferenceIndex
    bank: list[ExplicitMemory]
    bank_seconds: float

    @classmethod
    def load(cls, run_dir: str | Path, num_threads: int | None = None) -> "RunUnderTest":
        """Load the model, rebuild its world and index, encode the bank; torch runs on
        ``num_threads`` threads (default: the run's own setting) from here on."""
        run_dir = Path(run_dir)
        config = load_run_config(run_dir)
        torch.set_num_threads(max(1, num_threads or config.num_threads))
        model, tokenizer, spec = load_reference_model(run_dir / "model")
        world = build_world(config.world.seed, config.world.n_entities, config.world.heldout_fraction,
                            passages_per_entity=config.world.passages_per_entity)
        texts = [r.text for r in world.references]
        bank, bank_s = encode_memory_bank(model, tokenizer, spec, texts)
        return cls(config, model, tokenizer, spec, world, ReferenceIndex(texts), bank, bank_s)

    def train_questions(self, n: int) -> list[QAPair]:
        """A fixed sample of ``n`` train-entity questions (the same in every evaluation)."""
        pairs = self.world.qa(TRAIN)
        return random.Random(0).sample(pairs, min(n, len(pairs)))


def evaluate_run(run_dir: str | Path, evaluation: EvaluationConfig | None = None, out_dir: str | Path | None = None,
                 num_threads: int | None = None, retrieval_head: str | Path | None = None, query: str = "question") -> dict:
    """Evaluate a run directory's saved model and write the report; returns its data.

    ``evaluation``: the settings (default: the run's own ``config.evaluation``); ``retrieval_head``:
    a directory holding the model's retrieval head, to retrieve in the model's space, not MiniLM's;
    ``query``: search with the question (``"question"``) or the QA prompt (``"prompt"``)."""
    run_dir = Path(run_dir)
    run = RunUnderTest.load(run_dir, num_threads)
    if retrieval_head is not None:
        run.index = model_space_index(run, retrieval_head)
    config, model, tokenizer, spec, world, index, bank = (run.config, run.model, run.tokenizer, run.spec, run.world,
                                                          run.index, run.bank)
    settings = evaluation or config.evaluation
    top_k, new_tokens, batch_size = settings.top_k, settings.new_tokens, settings.batch_size
    bias = settings.retrieval_prior_bias
    bank_s = run.bank_seconds
    evals = [evaluate_qa(model, tokenizer, spec, world, world.qa(HELDOUT), index, bank, top_k,
                         new_tokens=new_tokens, batch_size=batch_size, split=HELDOUT, retrieval_bias=bias, query=query)]
    if settings.train_questions:
        pairs = run.train_questions(settings.train_questions)
        evals.append(evaluate_qa(model, tokenizer, spec, world, pairs, index, bank, top_k,
                                 new_tokens=new_tokens, batch_size=batch_size, split=TRAIN, retrieval_bias=bias,
                                 query=query))
    for ev in evals:
        ev.memory_bank_s = bank_s
    held_memory = evals[0].modes["memory"]
    memory_by_top_k = {top_k: [held_memory.correct, held_memory.questions]}  # held-out memory EM by memories read
    for k in sorted({1, 2} - {top_k}):
        r = evaluate_qa(model, tokenizer, spec, world, world.qa(HELDOUT), index, bank, k, modes=("memory",),
                        new_tokens=new_tokens, batch_size=batch_size, query=query).modes["memory"]
        memory_by_top_k[k] = [r.correct, r.questions]
    drill_entities = None
    if any(s.memory != "none" for s in config.stages):
        from .memory_stage import memory_drill

        drill_entities = len(memory_drill(world, config.drill).entities)
    info = {"model_dir": str(run_dir / "model"), "parameters": count_parameters(model),
            "layers": model.config.num_hidden_layers, "memory_layers": list(spec.memory_layers),
            "tokens_per_head": spec.tokens_per_head, "entities": len(world.entities),
            "heldout_entities": len(world.split_entities(HELDOUT)), "references": len(world.references),
            "drill_entities": drill_entities, "memory_by_top_k": memory_by_top_k,
            "device": f"CPU, {torch.get_num_threads()} thread(s)"
            if config.device == "cpu" or not torch.cuda.is_available() else "GPU",
            **{k: v for k, v in _run_facts(run_dir).items()}}
    info = {k: (0 if v is None and k in ("train_time_s", "corpus_tokens", "steps") else v) for k, v in info.items()}
    text = report_markdown(evals, info)
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference_model.md").write_text(text + "\n")
    (out / "reference_model.json").write_text(json.dumps({"info": info, "evaluations": [e.to_dict() for e in evals]},
                                                         indent=2))
    save_plot(evals, out / "reference_model.png", f"{Path(run_dir).name} ({count_parameters(model) / 1e6:.2f}M parameters)",
              f"{machine()} ({info['device']})")
    print(text)
    print(f"saved {out / 'reference_model.md'}, .json, .png")
    return {"info": info, "evaluations": evals}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memory3-evaluate", description=__doc__.split("\n", 1)[0])
    parser.add_argument("run_dir", nargs="?", default="runs/reference-tiny", help="a training run directory (has model/)")
    parser.add_argument("--top-k", type=int, help="references per question (default: the run's evaluation.top_k)")
    parser.add_argument("--train-questions", type=int, help="also evaluate this many train questions (0: none)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--retrieval-prior-bias", type=float, help="the memory_prior mode's bias")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the run's)")
    parser.add_argument("--retrieval-head", metavar="DIR", help="retrieve in the model's space with the retrieval head "
                                                                  "saved in DIR (memory3 train-retriever --out DIR)")
    parser.add_argument("--query", choices=QUERIES, default="question",
                        help="search with the question's text (default) or the QA prompt the model reads")
    parser.add_argument("--out", default="bench/results", help="where the report, json and plot go")
    args = parser.parse_args(argv)
    given = {"top_k": args.top_k, "train_questions": args.train_questions, "batch_size": args.batch_size,
             "new_tokens": args.new_tokens, "retrieval_prior_bias": args.retrieval_prior_bias}
    evaluation = replace(load_run_config(args.run_dir).evaluation, **{k: v for k, v in given.items() if v is not None})
    evaluate_run(args.run_dir, evaluation, args.out, args.threads, args.retrieval_head, args.query)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
