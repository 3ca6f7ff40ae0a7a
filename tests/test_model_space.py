"""Retrieval in the model's own space, against a real server: a head's space pins the model and
the head's weights; keys come from the encoding forward and equal the query of the same tokens;
writer, supply and decoding refuse a bank of another space; decoding a model-space bank sends
vector queries only — the server's text embedder is never loaded or asked — while a text bank
decodes exactly as before."""

from __future__ import annotations

import secrets

import pytest
import torch
from conftest import ADMIN_KEY, ServerThread, make_settings
from decoding_helpers import generate_flat

from memory3.core.embedder import BuiltinEmbedder
from memory3.core.references import Reference
from memory3.sdk.client import BankInfo
from memory3.sdk.client.client import Client
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.retrieval_head import RetrievalHead, RetrievalSpaceError, load_retrieval_head
from memory3.sdk.memory.supply import MemorySupply
from memory3.sdk.memory.writer import MemoryWriter
from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.sdk.model.positions import memory_spec_for
from tiny_models import byte_tokenizer, tiny_llama

CHUNK = 16
PROMPTS = ["The lighthouse keeper counted ships at dawn, then wrote to his sister.", "Bees sleep in tulips at noon."]
FILLER = [f"Unrelated note {i}: a recipe for {w} soup with {i} onions." for i, w in enumerate(["leek", "pea", "corn"])]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=11)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def spec(model):
    return memory_spec_for(model, (0, 1), tokens_per_head=4, reference_length=96)


@pytest.fixture(scope="module")
def head(model):
    return RetrievalHead.for_model(model, dim=16, seed=3)


@pytest.fixture(scope="module")
def quiet_server(database_url):
    """A server of its own whose text embedder counts every query lookup (and loads lazily)."""
    lookups: list[bool] = []
    embedder = BuiltinEmbedder(on_cache_lookup=lookups.append)
    srv = ServerThread(make_settings(database_url), embedder)
    with Client(srv.target, ADMIN_KEY) as admin:
        name = "ms-" + secrets.token_hex(3)
        admin.create_tenant(name)
        key = admin.issue_key(name)[1]
    yield srv, key, embedder, lookups
    srv.stop()


def _model_bank(client, model, spec, head) -> str:
    name = "m-" + secrets.token_hex(3)
    client.create_bank(BankInfo(name, model_fingerprint(model), spec, head.space, head.dim, "cosine"))
    return name


def test_space_names_the_model_and_the_head(model, head, tmp_path):
    fingerprint = model_fingerprint(model)
    assert head.space.startswith(f"model:{fingerprint[:16]}:") and len(head.space) == len("model:") + 16 + 1 + 16
    assert RetrievalHead.for_model(model, dim=16, seed=4).space != head.space  # other weights, other space
    head.save(tmp_path)
    loaded = RetrievalHead.load(tmp_path, model)
    assert loaded.space == head.space and load_retrieval_head(tmp_path / "none") is None
    with pytest.raises(RetrievalSpaceError, match="belongs to model"):
        RetrievalHead.load(tmp_path, tiny_llama(seed=12))
    with torch.no_grad():
        loaded.proj.weight[0, 0] += 1e-3
    assert loaded.space != head.space


def test_keys_come_from_the_encoding_forward_and_equal_the_same_tokens_as_a_query(model, tokenizer, spec, head):
    encoder = MemoryEncoder(model, tokenizer, spec, retrieval_head=head)
    texts = [PROMPTS[0], FILLER[0], FILLER[1][:30]]
    memories = encoder.encode(texts)
    keys = torch.stack([m.retrieval_key for m in memories])
    torch.testing.assert_close(keys, encoder.retrieval_keys(texts), atol=1e-6, rtol=0)
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(3))
    as_queries = head.vectors(model, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
                              tokenizer.all_special_ids)
    torch.testing.assert_close(keys, torch.tensor(as_queries), atol=1e-6, rtol=0)
    assert MemoryEncoder(model, tokenizer, spec).encode(texts[:1])[0].retrieval_key is None
    with pytest.raises(RetrievalSpaceError, match="belongs to model"):
        MemoryEncoder(tiny_llama(seed=12), tokenizer, spec, retrieval_head=head)


def test_writer_and_supply_refuse_another_space(server, blocking, api_key, model, tokenizer, spec, head):
    bank = _model_bank(blocking, model, spec, head)
    other = RetrievalHead.for_model(model, dim=16, seed=4)
    client = blocking.aio
    with pytest.raises(RetrievalSpaceError, match="this retrieval head's space is"):
        blocking.run(MemoryWriter(MemoryEncoder(model, tokenizer, spec, retrieval_head=other)).write(
            client, bank, [("a", FILLER[0])], progress=False))
    with pytest.raises(RetrievalSpaceError, match="give the encoder the model's retrieval head"):
        blocking.run(MemoryWriter(MemoryEncoder(model, tokenizer, spec)).write(client, bank, [("a", FILLER[0])],
                                                                                progress=False))
    with MemorySupply(server.target, api_key, model, spec, tokenizer=tokenizer) as supply:
        with pytest.raises(RetrievalSpaceError, match="give the supply the model's retrieval head"):
            supply.model_space(bank)
    with MemorySupply(server.target, api_key, model, spec, tokenizer=tokenizer, retrieval_head=other) as supply:
        with pytest.raises(RetrievalSpaceError, match="another model or another head"):
            supply.model_space(bank)
    with MemorySupply(server.target, api_key, model, spec, tokenizer=tokenizer, retrieval_head=head) as supply:
        assert supply.model_space(bank)
        with pytest.raises(RetrievalSpaceError, match="query it with vectors"):
            supply.request(bank, ["a text query"]).result()
    with pytest.raises(RetrievalSpaceError, match="belongs to model"):
        MemorySupply(server.target, api_key, tiny_llama(seed=12), spec, retrieval_head=head)


def test_decoding_in_model_space_never_calls_a_text_embedder(quiet_server, model, tokenizer, spec, head):
    srv, key, embedder, lookups = quiet_server
    encoder = MemoryEncoder(model, tokenizer, spec, retrieval_head=head)
    chunks = [tokenizer.decode(ids[i : i + CHUNK]) for p in PROMPTS
              for ids in [tokenizer(p, add_special_tokens=False)["input_ids"]] for i in range(0, len(ids), CHUNK)]
    with Client(srv.target, key) as client, MemorySupply(srv.target, key, model, spec, tokenizer=tokenizer,
                                                         retrieval_head=head) as supply:
        bank = _model_bank(client, model, spec, head)
        refs = [(f"c{i}", t) for i, t in enumerate(chunks)] + [(f"f{i}", t) for i, t in enumerate(FILLER)]
        supply.run(MemoryWriter(encoder, skip_short=True).write(supply.client, bank, refs[1:], progress=False))
        # the first chunk stored text-only with its key: decoding's cold start encodes and writes it back
        client.write(bank, [Reference("c0", chunks[0], embedding=encoder.retrieval_keys([chunks[0]])[0].tolist())])
        assert client.stats(bank).with_memory == len(refs) - 1
        for mode in ("memory", "rag"):
            results = generate_flat(model, tokenizer, PROMPTS, mode=mode, supply=supply, bank=bank,
                                    max_new_tokens=24, chunk=CHUNK, top_k=2, stop_at_eos=False)
            assert all(len(r.token_ids) == 24 for r in results)
        assert client.stats(bank).with_memory == len(refs)  # c0 now has its memory
        assert embedder._model is None and lookups == []  # the text embedder: never loaded, never asked
        memory = generate_flat(model, tokenizer, PROMPTS, supply=supply, bank=bank, max_new_tokens=24, chunk=CHUNK,
                               top_k=1, stop_at_eos=False)
        # prompt chunks found their own reference (query and key: the same tokens); every segment read
        # what the service answers for its vector
        first = memory[0]
        assert [s.reference_ids for s in first.segments[:3]] == [["c0"], ["c1"], ["c2"]]
        for result in memory:
            for segment in result.segments:
                assert isinstance(segment.query, list) and len(segment.query) == head.dim
                hits = client.retrieve(bank, vector=segment.query, top_k=1)
                assert segment.reference_ids == [h.external_id for h in hits]
        assert supply.timings and all(t.search > 0 for t in supply.timings)
        assert embedder._model is None and lookups == []


def test_a_text_bank_decodes_as_before_with_a_head_at_hand(server, api_key, blocking, model, tokenizer, spec, head):
    bank = "t-" + secrets.token_hex(3)
    blocking.create_bank(BankInfo(bank, model_fingerprint(model), spec))
    options = {"max_new_tokens": 20, "chunk": CHUNK, "top_k": 2, "stop_at_eos": False}
    outputs = []
    for with_head in (None, head):
        with MemorySupply(server.target, api_key, model, spec, tokenizer=tokenizer, retrieval_head=with_head) as supply:
            if with_head is None:
                supply.run(MemoryWriter(MemoryEncoder(model, tokenizer, spec)).write(
                    supply.client, bank, [(f"f{i}", t) for i, t in enumerate(FILLER + PROMPTS)], progress=False))
            assert not supply.model_space(bank)
            outputs.append(generate_flat(model, tokenizer, PROMPTS, supply=supply, bank=bank, **options))
    plain, headed = outputs
    assert [r.token_ids for r in plain] == [r.token_ids for r in headed]
    assert [[s.query for s in r.segments] for r in plain] == [[s.query for s in r.segments] for r in headed]
    assert all(isinstance(s.query, str) for r in headed for s in r.segments)


def test_cli_makes_a_model_space_bank_and_ingests_keys(server, api_key, model, tokenizer, spec, head, tmp_path):
    """`bank create --model DIR --model-space` names the head's space; `ingest --model DIR` stores
    each text's key as its vector; a model without a head is one line."""
    from test_cli import memory3, one_line_error

    from memory3.trainer.model import save_reference_model

    save_reference_model(model, tokenizer, spec, tmp_path / "model")
    connect = ["--target", server.target, "--api-key", api_key]
    one_line_error(memory3("bank", "create", "nohead", "--model", str(tmp_path / "model"), "--model-space", *connect),
                   2, "has no retrieval head", "memory3 train-retriever --model")
    head.save(tmp_path / "model")
    created = memory3("bank", "create", "keyed", "--model", str(tmp_path / "model"), "--model-space", *connect)
    assert created.returncode == 0, created.stderr
    path = tmp_path / "refs.jsonl"
    path.write_text('{"id": "long", "text": "The lighthouse keeper counted ships at dawn."}\n{"id": "short", "text": "Hi."}\n')
    result = memory3("ingest", "keyed", str(path), "--model", str(tmp_path / "model"), *connect)
    assert result.returncode == 0, result.stderr
    with Client(server.target, api_key) as client:
        info = client.get_bank("keyed")
        assert (info.embedder_name, info.embedder_dim) == (head.space, head.dim)
        keys = MemoryEncoder(model, tokenizer, spec, retrieval_head=head).retrieval_keys(["The lighthouse keeper "
                                                                                          "counted ships at dawn.", "Hi."])
        for key, name in zip(keys, ("long", "short")):  # each text's own key finds it, score 1
            [hit] = client.retrieve("keyed", vector=key.tolist(), top_k=1)
            assert hit.external_id == name and hit.score == pytest.approx(1.0, abs=1e-5)
        assert client.stats("keyed").with_memory == 1  # "Hi." is too short for a memory, not for a key
