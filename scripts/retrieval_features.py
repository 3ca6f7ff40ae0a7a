"""Which of a model's states make the best retrieval keys? The measurement behind the retrieval head.

For a model of the trainer (a saved ``--model DIR`` or a run's latest checkpoint, ``--run DIR``)
this pools, per text, one of: the input embeddings, or the input of layer L's attention (its
normed hidden state, from a plain forward without memories), by mean or by a learned attention
gate; a linear projection to ``--dim`` follows, L2-normalised. Each variant is trained alike
(InfoNCE, in-batch + same-kind hard negatives, as trainer/retriever.py) on the train entities'
questions and statements plus a second world, and measured on questions about entities of an
unseen world (``--test-entities``) against its references, beside all-MiniLM-L6-v2.
Results: docs/design.md ("Retrieval in the model's space").

Usage: python scripts/retrieval_features.py --run runs/reference-tiny [--layers 0,1] [--dims 128]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from memory3.trainer.corpus import ATTRIBUTES, QUESTIONS, build_world, format_qa_prompt
from memory3.trainer.retriever import _Tokens, recall_at, training_pairs
from memory3.trainer.retrieval_index import ReferenceIndex


def load(args):
    from memory3.trainer.model import build_model, default_memory_spec, load_reference_model
    from memory3.trainer.tokenizer import load_tokenizer

    if args.model:
        return load_reference_model(args.model)
    import json

    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    tokenizer = load_tokenizer(run / "tokenizer")
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    model = build_model(config["preset"], len(tokenizer), seed=0, **ids)
    checkpoint = sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1]
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
    print(f"checkpoint {checkpoint}")
    return model.eval(), tokenizer, default_memory_spec(model, tuple(config["memory_layers"]))


class Pool(torch.nn.Module):
    def __init__(self, hidden: int, dim: int, attention: bool):
        super().__init__()
        self.attention = attention
        self.gate = torch.nn.Linear(hidden, 1)
        self.proj = torch.nn.Linear(hidden, dim, bias=False)
        self.log_scale = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        pooled = [(torch.softmax(self.gate(x).squeeze(-1), 0)[:, None] * x).sum(0) if self.attention else x.mean(0)
                  for x in states]
        return torch.nn.functional.normalize(self.proj(torch.stack(pooled)), dim=-1)


@torch.no_grad()
def states(model, sequences: list[list[int]], starts: list[int], sources: list[str]) -> dict[str, list[torch.Tensor]]:
    """Per source ("emb", "L0", "L1", ...) and text: (tokens, hidden) states of the counted tokens."""
    captured: dict[int, torch.Tensor] = {}
    modules = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw: captured.__setitem__(
        mod.layer_idx, kw.get("hidden_states", a[0] if a else None)), with_kwargs=True) for m in modules]
    out = {s: [] for s in sources}
    try:
        for i in range(0, len(sequences), 64):
            rows = sequences[i : i + 64]
            width = max(map(len, rows))
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, seq in enumerate(rows):
                ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
            embedded = model.get_input_embeddings()(ids)
            if any(s != "emb" for s in sources):
                model(input_ids=ids, attention_mask=mask)
            for r, seq in enumerate(rows):
                span = slice(starts[i + r], len(seq))
                for s in sources:
                    out[s].append((embedded if s == "emb" else captured[int(s[1:])])[r, span].float())
    finally:
        for hook in hooks:
            hook.remove()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--run")
    parser.add_argument("--layers", default="0,1", help="attention inputs of these layers, besides the embeddings")
    parser.add_argument("--dims", default="128")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--extra-entities", type=int, default=1500)
    parser.add_argument("--test-entities", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, spec = load(args)
    tokens = _Tokens(model, tokenizer, spec)
    prefix = len(tokens.encoder.prefix_ids)
    world = build_world(0, 200, 0.2)
    pairs = training_pairs(world, build_world(7919, args.extra_entities, 0.2, passages_per_entity=0, qa_docs=0,
                                              filler_docs=0))
    test = build_world(424242, args.test_entities, 0.2, passages_per_entity=0, qa_docs=0, filler_docs=0)
    questions = [(e.id, format_qa_prompt(QUESTIONS[a][0].format(n=e.name))) for e in test.entities for a in ATTRIBUTES[e.kind]]
    sources = ["emb"] + [f"L{i}" for i in args.layers.split(",") if i != ""]
    ref_ids, query_ids = tokens.references(pairs.references), tokens.queries([q for _, q in pairs.queries])
    test_ref_ids, test_query_ids = tokens.references([r.text for r in test.references]), tokens.queries([q for _, q in questions])
    t0 = time.perf_counter()
    train_refs = states(model, ref_ids, [prefix] * len(ref_ids), sources)
    train_queries = states(model, query_ids, [0] * len(query_ids), sources)
    test_refs = states(model, test_ref_ids, [prefix] * len(test_ref_ids), sources)
    test_queries = states(model, test_query_ids, [0] * len(test_query_ids), sources)
    print(f"states of {len(ref_ids) + len(query_ids) + len(test_ref_ids) + len(test_query_ids)} texts "
          f"in {time.perf_counter() - t0:.0f} s; {len(pairs.queries)} training pairs, {len(questions)} test questions "
          f"against {len(test.references)} references")
    index = ReferenceIndex([r.text for r in test.references])
    minilm = recall_at(torch.from_numpy(index.embed_queries([q for _, q in questions])), torch.from_numpy(index.vectors),
                       [p for p, _ in questions])
    print(f"| all-MiniLM-L6-v2 | - | - | {minilm['recall@1']:.3f} | {minilm['recall@5']:.3f} |")
    by_kind: dict[str, list[int]] = {}
    for i, kind in enumerate(pairs.kinds):
        by_kind.setdefault(kind, []).append(i)
    for dim in (int(d) for d in args.dims.split(",")):
        for source in sources:
            for attention in (False, True):
                torch.manual_seed(0)
                rng = random.Random(0)
                pool = Pool(train_refs[source][0].shape[-1], dim, attention)
                optimizer = torch.optim.Adam(pool.parameters(), lr=3e-3)
                for _ in range(args.steps):
                    batch = rng.sample(range(len(pairs.queries)), 128)
                    positives = [pairs.queries[i][0] for i in batch]
                    candidates = list(dict.fromkeys(positives + [n for p in positives
                                                                 for n in rng.sample(by_kind[pairs.kinds[p]], 8)]))
                    slot = {c: i for i, c in enumerate(candidates)}
                    logits = pool.log_scale.exp() * pool([train_queries[source][i] for i in batch]) @ pool(
                        [train_refs[source][c] for c in candidates]).T
                    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([slot[p] for p in positives]))
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                with torch.no_grad():
                    r = recall_at(pool(test_queries[source]), pool(test_refs[source]), [p for p, _ in questions])
                name = "input embeddings" if source == "emb" else f"layer {source[1:]} attention input"
                print(f"| {name} | {'attention' if attention else 'mean'} | {dim} | {r['recall@1']:.3f} | "
                      f"{r['recall@5']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
