"""Training the retrieval head of a frozen model (``memory3 train-retriever``): InfoNCE that aligns a
query with the key of the reference it should read.

A :class:`~memory3.sdk.memory.retrieval_head.RetrievalHead` pools the model's input embeddings;
only the head trains (the model is frozen, so its fingerprint and memories stay valid, and any
model — an adapted one too — gets a head). Pairs come from the knowledge world the model was
trained on: every phrasing of every question and fact statement about a *train* entity, plus a
second generated world (stage 2's drill world: names the model never saw, so the head learns
which tokens make a name rather than the names themselves), each paired with its entity's
reference. Negatives: the batch's other references and ``hard_negatives`` references of entities
of the same kind per query. Recall@1/@5 is measured on the held-out entities' questions against
every reference of the world (MiniLM beside it with ``--compare-minilm``). How long to train is
chosen on a third generated world no step trains on and no report scores (its questions' InfoNCE
over all its references, every ``eval_every`` steps; the best head is kept, training stops after
``patience`` evaluations without a better one), never on the held-out questions. Minutes on a CPU. The head is saved beside the model (``retrieval_head.safetensors``). Design and figures:
docs/design.md ("Retrieval in the model's space").
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.retrieval_head import HEAD_FILENAME, RetrievalHead

from .corpus import ATTRIBUTES, HELDOUT, QUESTIONS, STATEMENTS, TRAIN, World, _articles, build_world, format_qa_prompt
from .model import load_reference_model
from .retrieval_index import ReferenceIndex

METRICS_FILENAME = "retrieval_head.json"


@dataclass
class RetrieverConfig:
    dim: int = 128  # key/query dimension (the bank's vectors)
    steps: int = 3000  # at most: validation stops it earlier
    batch_size: int = 128  # queries per step; their references are each other's negatives
    hard_negatives: int = 8  # per query: references of other entities of the same kind
    lr: float = 3e-3
    seed: int = 0
    extra_entities: int = 2000  # entities of the second (drill) world; 0: the model's world only
    extra_seed_offset: int = 7919  # as stage 2's drill world (DrillConfig.seed_offset)
    token_codes: int = 64  # width of the fixed per-token codes beside the embeddings (0: none)
    validation_entities: int = 200  # entities of the validation world (0: no validation, train all steps)
    validation_seed_offset: int = 15485863  # a world neither the model's nor the drill world
    eval_every: int = 100  # steps between validations
    patience: int = 3  # validations without a better loss before stopping


@dataclass
class RetrievalPairs:
    """Reference texts with their entity kinds, and (reference index, query text) pairs."""

    references: list[str]
    kinds: list[str]
    queries: list[tuple[int, str]] = field(default_factory=list)


def entity_queries(world: World, entity) -> list[str]:
    """Every question (as a QA prompt) and every fact statement about one entity."""
    out = [format_qa_prompt(q.format(n=entity.name)) for a in ATTRIBUTES[entity.kind] for q in QUESTIONS[a]]
    out += [_articles(t.format(n=entity.name, v=entity.facts[a])) for a in ATTRIBUTES[entity.kind] for t in STATEMENTS[a]]
    return out


def training_pairs(world: World, extra: World | None = None) -> RetrievalPairs:
    """Queries about the world's train entities and every entity of ``extra``, each with its
    entity's reference; the references of both worlds' entities (held-out ones excluded)."""
    pairs = RetrievalPairs([], [])
    for source, split in ((world, TRAIN), (extra, None)):
        if source is None:
            continue
        for entity in source.entities:
            if split is not None and entity.split != split:
                continue
            index = len(pairs.references)
            pairs.references.append(source.references[entity.id].text)
            pairs.kinds.append(entity.kind)
            pairs.queries += [(index, q) for q in entity_queries(source, entity)]
    return pairs


class _Tokens:
    """Token ids as the SDK makes them: references as the encoder tokenizes them (its marker
    prefix not counted), queries as decoding does (special tokens left out)."""

    def __init__(self, model, tokenizer, spec):
        self.encoder = MemoryEncoder(model, tokenizer, spec, self_check=False)
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)

    def references(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoder.tokenize(texts)

    def queries(self, texts: Sequence[str]) -> list[list[int]]:
        ids = self.tokenizer(list(texts))["input_ids"] if texts else []
        return [[t for t in row if t not in self.special] for row in ids]


def _keys(head, model, tokens: _Tokens, reference_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    prefix = len(tokens.encoder.prefix_ids)
    return head.keys_of(model, reference_ids, [prefix] * len(reference_ids))


class ModelSpaceIndex(ReferenceIndex):
    """A :class:`~memory3.trainer.retrieval_index.ReferenceIndex` in a model's space: the references'
    vectors are the head's keys (as the encoder writes them to a model-space bank), a query's is
    the head's vector of its token ids (as the supply sends while decoding). Exact cosine search
    and the overlap rule are the MiniLM index's own (``search_scored``), so the evaluation
    retrieves through one function whichever space it reads."""

    def __init__(self, texts: Sequence[str], head: RetrievalHead, model, tokenizer, spec,
                 ids: Sequence[int] | None = None):
        self.texts = list(texts)
        self.ids = list(ids) if ids is not None else list(range(len(self.texts)))
        if len(self.ids) != len(self.texts):
            raise ValueError("ids and texts differ in length")
        head.check_model(model)
        self.head, self.model, self.tokens = head, model, _Tokens(model, tokenizer, spec)
        self.cache_dir, self.embedder = None, None
        with torch.no_grad():
            self.vectors = _keys(head, model, self.tokens, self.tokens.references(self.texts)).cpu().numpy()

    def embed_queries(self, queries: Sequence[str], cache: bool = False) -> np.ndarray:
        with torch.no_grad():
            return self.head.keys_of(self.model, self.tokens.queries(list(queries))).cpu().numpy()


def recall_at(queries: torch.Tensor, keys: torch.Tensor, positives: Sequence[int], ks=(1, 5)) -> dict[str, float]:
    """recall@k of each query's own reference among the keys (cosine: unit vectors)."""
    top = (queries @ keys.T).topk(max(ks), dim=-1).indices.tolist()
    return {f"recall@{k}": sum(p in row[:k] for p, row in zip(positives, top)) / max(1, len(positives)) for k in ks}


def heldout_questions(world: World) -> list[tuple[int, str]]:
    """(entity id = reference index, QA prompt) of every held-out fact's canonical question."""
    return [(e.id, format_qa_prompt(QUESTIONS[a][0].format(n=e.name)))
            for e in world.entities if e.split == HELDOUT for a in ATTRIBUTES[e.kind]]


@torch.no_grad()
def evaluate_head(head: RetrievalHead, model, tokenizer, spec, world: World, compare_minilm: bool = False) -> dict:
    """Held-out questions against every reference of ``world``: recall@1/@5 in the model's space
    (and with MiniLM, the built-in text embedder, when asked)."""
    texts = [r.text for r in world.references]
    questions = heldout_questions(world)
    positives = [p for p, _ in questions]
    out = {"questions": len(questions), "references": len(texts)}
    space = ModelSpaceIndex(texts, head, model, tokenizer, spec)
    queries = torch.from_numpy(space.embed_queries([q for _, q in questions]))
    out["model_space"] = recall_at(queries, torch.from_numpy(space.vectors), positives)
    if compare_minilm:
        index = ReferenceIndex(texts)
        q = torch.from_numpy(index.embed_queries([q for _, q in questions]))
        out["minilm"] = recall_at(q, torch.from_numpy(index.vectors), positives)
    return out


def validation_world(seed: int, config: RetrieverConfig) -> World | None:
    """The world that decides when training stops: generated from its own seed, no step trains on it."""
    if not config.validation_entities:
        return None
    return build_world(seed + config.validation_seed_offset, config.validation_entities, 0.2, passages_per_entity=0,
                       qa_docs=0, filler_docs=0)


class Validation:
    """``validation(head)``: the mean InfoNCE of every canonical question of ``world`` over all of
    its references (lower is better); model and references are tokenized once."""

    def __init__(self, model, tokenizer, spec, world: World) -> None:
        self.model = model
        tokens = _Tokens(model, tokenizer, spec)
        self.tokens = tokens
        self.reference_ids = tokens.references([r.text for r in world.references])
        questions = [(e.id, format_qa_prompt(QUESTIONS[a][0].format(n=e.name)))
                     for e in world.entities for a in ATTRIBUTES[e.kind]]
        self.positives = torch.tensor([p for p, _ in questions])
        self.query_ids = tokens.queries([q for _, q in questions])

    @torch.no_grad()
    def __call__(self, head: RetrievalHead) -> dict[str, float]:
        was_training = head.training
        head.eval()
        keys = _keys(head, self.model, self.tokens, self.reference_ids)
        queries = head.keys_of(self.model, self.query_ids)
        head.train(was_training)
        loss = float(info_nce(head, queries, keys, self.positives.to(queries.device)))
        return {"loss": loss, **recall_at(queries, keys, self.positives.tolist())}


def info_nce(head: RetrievalHead, queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each query over the candidate keys, the right one at ``targets``; logits
    are cosines times the head's learned scale (capped at 100, as CLIP's)."""
    scale = head.log_scale.exp().clamp(max=100.0)
    return torch.nn.functional.cross_entropy(scale * queries @ keys.T, targets)


def train_head(model, tokenizer, spec, pairs: RetrievalPairs, config: RetrieverConfig,
               head: RetrievalHead | None = None, progress=None,
               validation: Validation | None = None) -> tuple[RetrievalHead, list[dict]]:
    """Train a head (new, or ``head``) on ``pairs`` with the model frozen; (head, history: each
    step's loss, and each validation's figures). With ``validation`` the head returned is the one
    with the best validation loss, and training stops after ``config.patience`` worse validations."""
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        return _train(model, tokenizer, spec, pairs, config, head, progress, validation)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)


def _train(model, tokenizer, spec, pairs, config, head, progress, validation=None):
    head = head or RetrievalHead.for_model(model, config.dim, config.seed, config.token_codes)
    head.train()
    tokens = _Tokens(model, tokenizer, spec)
    reference_ids = tokens.references(pairs.references)
    query_ids = tokens.queries([q for _, q in pairs.queries])
    kept = [i for i, ids in enumerate(query_ids) if ids]
    by_kind: dict[str, list[int]] = {}
    for i, kind in enumerate(pairs.kinds):
        by_kind.setdefault(kind, []).append(i)
    rng = random.Random(config.seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr)
    history = []
    best, best_state, worse = float("inf"), None, 0
    for step in range(config.steps):
        batch = rng.sample(kept, min(config.batch_size, len(kept)))
        positives = [pairs.queries[i][0] for i in batch]
        candidates = list(dict.fromkeys(positives))
        for p in positives:
            pool = by_kind[pairs.kinds[p]]
            candidates += rng.sample(pool, min(config.hard_negatives, len(pool)))
        candidates = list(dict.fromkeys(candidates))
        slot = {c: i for i, c in enumerate(candidates)}
        queries = head.keys_of(model, [query_ids[i] for i in batch])
        keys = _keys(head, model, tokens, [reference_ids[c] for c in candidates])
        loss = info_nce(head, queries, keys, torch.tensor([slot[p] for p in positives], device=queries.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({"step": step + 1, "loss": float(loss.detach())})
        if progress is not None:
            progress(step + 1, float(loss.detach()))
        if validation is not None and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
            figures = validation(head)
            history[-1]["validation"] = figures
            if figures["loss"] < best:
                best, worse = figures["loss"], 0
                best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            else:
                worse += 1
                if worse >= config.patience:
                    break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return head, history


def _world_settings(model_dir: Path) -> tuple[int, int, float]:
    """(seed, entities, held-out fraction) of the world the model was trained on: from the run's
    config.json beside the model directory, else the trainer's defaults."""
    for candidate in (model_dir.parent / "config.json", model_dir / "train_config.json"):
        if candidate.is_file():
            world = json.loads(candidate.read_text()).get("world") or {}
            if world:
                return int(world.get("seed", 0)), int(world.get("n_entities", 200)), float(world.get("heldout_fraction", 0.2))
    return 0, 200, 0.2


def main(argv: Sequence[str] | None = None) -> dict:
    """``memory3 train-retriever``: train a model's retrieval head, save it beside the model."""
    defaults = RetrieverConfig()
    parser = argparse.ArgumentParser(prog="memory3 train-retriever", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory (memory3 train's RUN_DIR/model); frozen")
    parser.add_argument("--out", help="where retrieval_head.safetensors and retrieval_head.json go (default: --model: "
                                      "beside the model, where MemorySupply and `memory3 generate` look for it)")
    parser.add_argument("--dim", type=int, default=defaults.dim, help="vector dimension of the space")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="at most this many steps; a validation world no step trains on stops it earlier")
    parser.add_argument("--validation-entities", type=int, default=defaults.validation_entities,
                        help="entities of the world that chooses when to stop (0: none, train --steps)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--hard-negatives", type=int, default=defaults.hard_negatives,
                        help="per query: references of other entities of the same kind")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--token-codes", type=int, default=defaults.token_codes,
                        help="width of the fixed random code per token id beside its embedding (0: embeddings only; "
                             "tokens the model never trained on share one embedding direction, the codes tell them apart)")
    parser.add_argument("--extra-entities", type=int, default=defaults.extra_entities,
                        help="entities of a second generated world added to the training pairs (0: none)")
    parser.add_argument("--world-seed", type=int, help="the model's world (default: from the run's config.json)")
    parser.add_argument("--entities", type=int, help="entities of the model's world (default: from the run's config.json)")
    parser.add_argument("--compare-minilm", action="store_true", help="also measure MiniLM's recall on the same questions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    out_dir = Path(args.out) if args.out else model_dir
    config = RetrieverConfig(args.dim, args.steps, args.batch_size, args.hard_negatives, args.lr, args.seed,
                             args.extra_entities, token_codes=args.token_codes,
                             validation_entities=args.validation_entities)
    seed, entities, heldout = _world_settings(model_dir)
    seed = args.world_seed if args.world_seed is not None else seed
    entities = args.entities or entities
    model, tokenizer, spec = load_reference_model(model_dir)
    world = build_world(seed, entities, heldout)
    extra = None
    if config.extra_entities:
        extra = build_world(seed + config.extra_seed_offset, config.extra_entities, 0.2, passages_per_entity=0,
                            qa_docs=0, filler_docs=0)
    pairs = training_pairs(world, extra)
    held_apart = validation_world(seed, config)
    validation = Validation(model, tokenizer, spec, held_apart) if held_apart else None
    t0 = time.perf_counter()
    head, history = train_head(model, tokenizer, spec, pairs, config, validation=validation)
    seconds = time.perf_counter() - t0
    validations = [{"step": h["step"], **h["validation"]} for h in history if "validation" in h]
    kept = min(validations, key=lambda v: v["loss"]) if validations else None
    path = head.save(out_dir)
    metrics = {
        "space": head.space, "model_fingerprint": head.config.model_fingerprint, "config": asdict(config),
        "world": {"seed": seed, "entities": entities, "heldout_fraction": heldout},
        "pairs": len(pairs.queries), "references": len(pairs.references), "train_seconds": round(seconds, 2),
        "final_loss": history[-1]["loss"] if history else None,
        "steps_run": len(history), "kept_step": kept["step"] if kept else len(history),
        "validation": validations,
        "heldout": evaluate_head(head, model, tokenizer, spec, world, args.compare_minilm),
        "loss": [h["loss"] for h in history],
    }
    (out_dir / METRICS_FILENAME).write_text(json.dumps(metrics, indent=1) + "\n")
    shown = {k: v for k, v in metrics.items() if k != "loss"}
    print(json.dumps(shown, indent=1))
    print(f"wrote {path} ({HEAD_FILENAME}); its space, the embedder name of a bank for it: {head.space}")
    return metrics


if __name__ == "__main__":
    main()
