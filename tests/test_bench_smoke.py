"""The decoding benchmarks' code paths run (issue 17: a bench that broke on main went unnoticed):
bench_decoding's injection-only source through the decode loop, and bench_retrieval_space's
recall, held-out QA and strict-schedule decoding parts at a toy size against the test server; the
evaluation's model-space retrieval finds what a model-space bank on the server answers; the codec
and proxy figures redraw from the JSON their benches recorded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import small_world_and_tokenizer
from memory3.sdk.client import BankInfo
from memory3.sdk.generation import DecodingOptions, MemoryOptions, generate
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.retrieval_head import RetrievalHead
from memory3.sdk.memory.supply import MemorySupply
from memory3.sdk.memory.writer import MemoryWriter
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.trainer.corpus import HELDOUT, format_qa_prompt
from memory3.trainer.evaluate import RunUnderTest, model_space_index
from memory3.trainer.model import build_model, default_memory_spec, save_reference_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_decoding  # noqa: E402
import bench_retrieval_space  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    world, tokenizer = small_world_and_tokenizer()
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    model = build_model("tiny", len(tokenizer), seed=0, **ids).eval()
    spec = default_memory_spec(model, (0, 1), tokens_per_head=8)
    run = tmp_path_factory.mktemp("run")
    save_reference_model(model, tokenizer, spec, run / "model")
    (run / "config.json").write_text(json.dumps({"world": {"seed": 0, "n_entities": 40, "heldout_fraction": 0.2}}))
    references = [r.text for r in world.references[:12]]
    prompts = [tokenizer(" ".join(references[i : i + 3]))["input_ids"][:70] for i in range(4)]
    return model, tokenizer, spec, run / "model", references, prompts


def test_bench_decoding_injection_only_source_runs_through_the_decode_loop(setup, server, api_key, blocking):
    model, tokenizer, spec, _, references, prompts = setup
    blocking.create_bank(BankInfo("smoke", model_fingerprint(model), spec))
    with MemorySupply(server.target, api_key, model, spec, tokenizer=tokenizer) as supply:
        supply.run(MemoryWriter(MemoryEncoder(model, tokenizer, spec), skip_short=True).write(
            supply.client, "smoke", [(f"e{i}", t) for i, t in enumerate(references)], progress=False))
        options = DecodingOptions(max_new_tokens=70, chunk=32, stop_at_eos=False)
        generate(model, tokenizer, prompts[:1], memory=MemoryOptions(supply, "smoke"), decoding=options)
        keys = supply.cache.keys()[-5:]
        source = bench_decoding.InjectionOnly(supply, [supply.cache.get(k, count=False) for k in keys], [k[1] for k in keys])
        out = generate(model, tokenizer, prompts[:2], memory=MemoryOptions(source, "smoke"), decoding=options)
    assert all(len(r.token_ids) == 70 for r in out) and out[0].segments[0].reference_ids == [k[1] for k in keys]


def test_bench_retrieval_space_parts_run_at_a_toy_size(setup, server, api_key):
    model, tokenizer, spec, model_dir, references, prompts = setup
    head = RetrievalHead.for_model(model, dim=32, seed=0)
    recall, same = bench_retrieval_space.recall_part(model, tokenizer, spec, head, model_dir, steps=0)
    assert same is head and set(recall["model_space"]) == set(recall["minilm"]) == {"recall@1", "recall@5"}
    profile: dict = {}
    rows = bench_retrieval_space.decoding_part(server.target, api_key, model, tokenizer, spec, head, references,
                                               prompts[:2], batches=(1, 2), prompts_b1=1, repeats=1, new_tokens=66,
                                               profile_out=profile)
    assert {(r.name, r.batch) for r in rows} == {(name, b) for name, *_ in bench_retrieval_space.VARIANTS for b in (1, 2)}
    model_rows = [r for r in rows if "model space" in r.name]
    assert all(r.tokens_per_s > 0 for r in rows) and all(r.steps for r in model_rows)
    assert len(profile) == 5 and all(ms > 0 for ms in profile.values())
    text = bench_retrieval_space.report(recall, rows, "toy run", profile=profile)
    assert "recall@5" in text and "memory, model space, warm" in text and "× memory MiniLM" in text
    assert "| RetrieveBatch, 8 vectors + memories |" in text and "Targets (issue 17)" in text


def test_qa_part_and_the_evaluation_retrieve_in_the_model_space_as_a_bank_does(setup, blocking, tmp_path):
    model, tokenizer, spec, model_dir, _, _ = setup
    head = RetrievalHead.for_model(model, dim=32, seed=0)
    qa = bench_retrieval_space.qa_part(model_dir, head, top_ks=(1, 2), biases=(20.0,))
    for name, space in (("minilm", "all-MiniLM-L6-v2"), ("model_space", head.space)):
        assert set(qa[name]) == {"question", "prompt"} and set(qa["bias_sweep"][name]) == {20.0}
        for query, by_k in qa[name].items():
            assert set(by_k) == {1, 2} and all(r["retriever"] == space and r["query"] == query for r in by_k.values())
            assert all(set(r["exact_match"]) == {"plain", "rag", "memory", "memory_prior"} for r in by_k.values())
    assert "| model space | prompt | 2 |" in "\n".join(bench_retrieval_space.qa_lines(qa))

    # trainer.evaluate's model-space index (the head loaded from a directory, checked against the
    # model) holds the keys a model-space bank stores, and finds what the bank answers
    head.save(tmp_path)
    run = RunUnderTest.load(model_dir.parent, num_threads=1)
    index = model_space_index(run, tmp_path)
    bank = "qa-space"
    blocking.create_bank(BankInfo(bank, model_fingerprint(model), spec, head.space, head.dim, "cosine"))
    writer = MemoryWriter(MemoryEncoder(run.model, run.tokenizer, run.spec, retrieval_head=index.head), skip_short=True)
    blocking.run(writer.write(blocking.aio, bank, [(str(i), t) for i, t in enumerate(index.texts)], progress=False))
    prompts = [format_qa_prompt(p.question) for p in run.world.qa(HELDOUT)[:8]]
    vectors = index.embed_queries(prompts)
    sent = head.vectors(model, [tokenizer(p)["input_ids"] for p in prompts], tokenizer.all_special_ids)
    torch.testing.assert_close(torch.from_numpy(vectors), torch.tensor(sent), atol=1e-5, rtol=0)  # as decoding sends
    answered = blocking.retrieve_batch(bank, [v.tolist() for v in vectors], top_k=1, include_text=False)
    assert [[int(r.external_id) for r in row] for row in answered] == index.search(prompts, 1, query_vectors=vectors)


def test_recorded_bench_figures_redraw_from_their_json(tmp_path):
    """codec_bytes_vs_fidelity.png and proxy_demo.png are drawn from the JSON their benches record
    (``--replot``): the committed JSON must still load into the plotting code, one point or bar per row."""
    import bench_codec
    import proxy_demo

    results = Path(bench_codec.RESULTS)
    codec = json.loads((results / "codec.json").read_text())
    rows = {title: [bench_codec.Row(**row) for row in section] for title, section in codec.items()}
    assert rows and all(len(section) >= 4 for section in rows.values())
    bench_codec.plot(rows, tmp_path / "codec.png")
    demo = json.loads((results / "proxy_demo.json").read_text())
    assert len(demo["seeds"]) >= 3 and {len(s["methods"]) for s in demo["seeds"]} == {5}
    proxy_demo.plot(demo, tmp_path / "proxy.png")
    for name in ("codec.png", "proxy.png"):
        assert (tmp_path / name).stat().st_size > 20_000
