"""Decoding with memory against a real server: the every-N-tokens schedule and its query texts
(checked through the service's own answers), zero memories == plain, batch == single sequence,
streaming, the RAG baseline, and refusal of another model's memories."""

import secrets

import pytest
import torch
from decoding_helpers import generate_flat, option_groups, replay

from memory3.sdk.model.positions import memory_spec_for
from memory3.sdk.client import BankInfo
from memory3.sdk.generation import prefetch, stream
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.supply import FingerprintMismatchError, MemorySupply
from memory3.sdk.memory.writer import MemoryWriter
from memory3.sdk.model.fingerprint import model_fingerprint
from tiny_models import byte_tokenizer, tiny_llama

CHUNK = 16
PROMPT = "The lighthouse keeper counted ships at dawn, then wrote to his sister in Oslo."  # 78 bytes
SHORT = "Bees sleep in tulips."
FILLER = [f"Unrelated note {i}: a recipe for {w} soup with {i} onions." for i, w in enumerate(["leek", "pea", "corn", "bean"])]


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
def supply(server, api_key, model, tokenizer, spec):
    with MemorySupply(server.target, api_key, model, spec, tokenizer=tokenizer) as s:
        yield s


@pytest.fixture(scope="module")
def writer(model, tokenizer, spec):
    return MemoryWriter(MemoryEncoder(model, tokenizer, spec))


def _new_bank(blocking, model, spec) -> str:
    name = "b-" + secrets.token_hex(3)
    blocking.create_bank(BankInfo(name, model_fingerprint(model), spec))
    return name


def _chunk_texts(tokenizer, ids):
    return [tokenizer.decode(ids[i : i + CHUNK], skip_special_tokens=True) for i in range(0, len(ids), CHUNK)]


def _chunk_bank(blocking, supply, writer, model, tokenizer, spec) -> str:
    """References whose texts are exactly the prompt's chunks (ids p0, p1, ...), plus filler."""
    bank = _new_bank(blocking, model, spec)
    chunks = _chunk_texts(tokenizer, tokenizer(PROMPT)["input_ids"])
    refs = [(f"p{i}", text) for i, text in enumerate(chunks)] + [(f"f{i}", t) for i, t in enumerate(FILLER)]
    supply.run(writer.write(supply.client, bank, refs, progress=False))
    return bank


@pytest.fixture(scope="module")
def chunk_bank(blocking, supply, writer, model, tokenizer, spec):
    """The module's shared chunk bank: tests read it, none writes to it."""
    return _chunk_bank(blocking, supply, writer, model, tokenizer, spec)


def _generate(model, tokenizer, supply, bank, prompts, **options):
    options = {"max_new_tokens": 40, "chunk": CHUNK, "top_k": 1, "stop_at_eos": False, **options}
    return generate_flat(model, tokenizer, prompts, supply=supply, bank=bank, **options)


def test_retrieval_every_chunk_with_the_expected_query(model, tokenizer, supply, blocking, writer, spec):
    chunk_bank = _chunk_bank(blocking, supply, writer, model, tokenizer, spec)  # its own: this test writes to it
    [first] = _generate(model, tokenizer, supply, chunk_bank, [PROMPT])
    ids = first.prompt_ids + first.token_ids
    n = len(first.prompt_ids)
    assert n == 78 and len(first.token_ids) == 40
    # prompt chunks, then the first generated chunk keeps the last prompt memories, then every CHUNK
    # generated tokens new ones; the last sampled token is never fed, so the last segment ends at n + 39
    spans = [(s.start, s.end) for s in first.segments]
    assert spans == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 78), (78, 94), (94, 110), (110, 117)]
    queries = [s.query for s in first.segments]
    expected = _chunk_texts(tokenizer, ids[:n]) + [tokenizer.decode(ids[64:n])]  # queries are text: no special tokens
    expected += [tokenizer.decode(ids[n + k * CHUNK : n + (k + 1) * CHUNK], skip_special_tokens=True) for k in (0, 1)]
    assert queries == expected
    # the prompt chunks found their own text; every segment used what the service answers for its query
    assert [s.reference_ids for s in first.segments[:5]] == [[f"p{i}"] for i in range(5)]
    for segment in first.segments:
        assert segment.reference_ids == [r.external_id for r in blocking.retrieve(chunk_bank, text=segment.query, top_k=1)]

    # Store a reference whose text is the first generated chunk: the memory switch after it must find it.
    generated0 = queries[6]
    supply.run(writer.write(supply.client, chunk_bank, [("g0", generated0)], progress=False))
    [second] = _generate(model, tokenizer, supply, chunk_bank, [PROMPT])
    assert second.token_ids[:CHUNK] == first.token_ids[:CHUNK]  # same memories until the switch
    assert second.segments[6].query == generated0 and second.segments[6].reference_ids == ["g0"]
    assert second.segments[6].start == n + CHUNK


@pytest.mark.parametrize("new_tokens,lag", [(40, 0), (2 * CHUNK + 2, 0), (2 * CHUNK + 5, 3)],
                         ids=["mid-chunk", "switch-at-the-last-fed-token", "lagged-switch-at-the-last-fed-token"])
def test_what_generate_computed_is_what_the_recorded_memories_give_when_replayed(model, tokenizer, supply,
                                                                                blocking, spec, chunk_bank,
                                                                                new_tokens, lag):
    """Replay: each segment's memories, fetched from the service by the ids the segment records,
    set on an injector of our own, and the segment's tokens fed to the model with the cache of the
    segments before; every generated token's logits must equal what ``generate`` returned. A
    memory switch that is recorded but not read (or read at the wrong positions) fails here. The
    other lengths put a switch on the last token that is fed: its chunk's query must still be made."""
    [result] = _generate(model, tokenizer, supply, chunk_bank, [PROMPT], top_k=2, output_scores=True,
                         max_new_tokens=new_tokens, lag=lag)
    assert len({tuple(s.reference_ids) for s in result.segments}) > 2  # memories switch along the way
    assert result.segments[-1].start == len(result.prompt_ids) + 2 * CHUNK + lag  # the last switch happened
    last_chunk = tokenizer.decode(result.token_ids[CHUNK : 2 * CHUNK], skip_special_tokens=True)
    assert result.segments[-1].query == last_chunk  # with the memories of the chunk just generated
    replayed = replay(model, spec, blocking, chunk_bank, result)
    torch.testing.assert_close(replayed, result.scores, atol=1e-4, rtol=1e-4)


def test_prefetch_asks_once_per_prompt_chunk_and_decodes_as_without_it(model, tokenizer, supply, chunk_bank):
    prompts = [PROMPT, SHORT]
    handle = prefetch(tokenizer, supply, chunk_bank, prompts, chunk=CHUNK, top_k=1)
    longest = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert len(handle.futures) == -(-longest // CHUNK)  # one retrieval per prompt chunk, none past the prompt
    ahead = generate_flat(model, tokenizer, prompts, supply=supply, bank=chunk_bank, max_new_tokens=20, chunk=CHUNK,
                          top_k=1, stop_at_eos=False, prefetch=handle)
    plain = _generate(model, tokenizer, supply, chunk_bank, prompts, max_new_tokens=20)
    assert [r.token_ids for r in ahead] == [r.token_ids for r in plain]
    assert [[(s.start, s.end, s.reference_ids) for s in r.segments] for r in ahead] == \
        [[(s.start, s.end, s.reference_ids) for s in r.segments] for r in plain]


def test_zero_memories_is_plain_generation(model, tokenizer, supply, blocking, spec):
    empty = _new_bank(blocking, model, spec)
    prompts = [PROMPT, SHORT]
    with_memory = _generate(model, tokenizer, supply, empty, prompts, top_k=5, output_scores=True)
    plain = generate_flat(model, tokenizer, prompts, mode='plain', max_new_tokens=40, stop_at_eos=False, output_scores=True,
                                    chunk=CHUNK, chunked_prefill=True)  # the same forwards, bit for bit
    for m, p in zip(with_memory, plain):
        assert m.token_ids == p.token_ids and torch.equal(m.scores, p.scores)
        assert m.reference_ids == [] and all(s.query for s in m.segments)
    hf = model.generate(**tokenizer([SHORT], return_tensors="pt"), max_new_tokens=10, do_sample=False,
                        eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    assert plain[1].token_ids[:10] == hf[0, -10:].tolist()  # the hand-written loop is HF's greedy decoding


def test_batch_equals_single_sequences(model, tokenizer, supply, chunk_bank):
    prompts = [PROMPT, SHORT]
    batch = _generate(model, tokenizer, supply, chunk_bank, prompts, top_k=2, output_scores=True)
    for prompt, got in zip(prompts, batch):
        [alone] = _generate(model, tokenizer, supply, chunk_bank, [prompt], top_k=2, output_scores=True)
        assert got.token_ids == alone.token_ids
        assert got.segments == alone.segments
        torch.testing.assert_close(got.scores, alone.scores, atol=1e-4, rtol=1e-4)


def test_memories_change_generation_and_lag_delays_the_switch(model, tokenizer, supply, chunk_bank):
    [strict] = _generate(model, tokenizer, supply, chunk_bank, [PROMPT], output_scores=True)
    plain = generate_flat(model, tokenizer, [PROMPT], mode='plain', max_new_tokens=40, stop_at_eos=False, output_scores=True)
    assert not torch.equal(strict.scores, plain[0].scores)
    [lagged] = _generate(model, tokenizer, supply, chunk_bank, [PROMPT], lag=3)
    assert [s.start for s in lagged.segments][-2:] == [78 + CHUNK + 3, 78 + 2 * CHUNK + 3]
    # the queries are unchanged up to the first switch (later text differs: the old memories served longer)
    assert [s.query for s in lagged.segments][:7] == [s.query for s in strict.segments][:7]
    assert lagged.token_ids[: CHUNK + 1] == strict.token_ids[: CHUNK + 1]


def test_retrieval_prior_follows_the_service_scores(model, tokenizer, supply, chunk_bank):
    """With a decisive retrieval prior, reading the top-2 memories computes what reading the top-1
    computes (the second is always less similar here); without it the second memory matters."""
    [top1] = _generate(model, tokenizer, supply, chunk_bank, [PROMPT], output_scores=True)
    [top2] = _generate(model, tokenizer, supply, chunk_bank, [PROMPT], top_k=2, output_scores=True)
    [prior] = _generate(model, tokenizer, supply, chunk_bank, [PROMPT], top_k=2, output_scores=True,
                        retrieval_bias=1e4)
    assert all(len(s.reference_ids) == 2 for s in prior.segments)
    assert prior.token_ids == top1.token_ids
    torch.testing.assert_close(prior.scores, top1.scores, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(top2.scores, top1.scores, atol=1e-3)


def test_generate_cli_streams_what_generate_computes(tmp_path, server, api_key, model, tokenizer, spec, supply,
                                                     chunk_bank):
    """``memory3 generate`` (its function): a saved model dir, the text on out, the references in use
    on err; the same text as :func:`generate` with the same options, retrieval prior included."""
    import io

    from memory3.cli.generate import generate_command
    from memory3.trainer.model import save_reference_model

    save_reference_model(model, tokenizer, spec, tmp_path / "model")
    out, err = io.StringIO(), io.StringIO()
    generate_command(server.target, api_key, chunk_bank, str(tmp_path / "model"), PROMPT, max_new_tokens=24,
                     chunk=CHUNK, top_k=2, retrieval_bias=1e4, out=out, err=err)
    [expected] = _generate(model, tokenizer, supply, chunk_bank, [PROMPT], max_new_tokens=24, top_k=2,
                           retrieval_bias=1e4, stop_at_eos=True)
    assert out.getvalue() == expected.text + "\n"
    lines = err.getvalue().splitlines()
    shown = [line[len("[references: ") : -1].split(", ") for line in lines if line.startswith("[references: ")]
    generated_from = len(expected.prompt_ids) - 1  # the last prompt position's logits give the first token
    in_use = [s.reference_ids for s in expected.segments if s.end > generated_from]
    assert shown == [ids for k, ids in enumerate(in_use) if k == 0 or ids != in_use[k - 1]]  # printed on change
    listed = lines[lines.index("references used:") + 1 :]
    assert [line.split(":")[0].strip() for line in listed] == list(dict.fromkeys(i for ids in shown for i in ids))


def test_stream_pieces_add_up_and_name_references(model, tokenizer, supply, chunk_bank):
    memory, options, _ = option_groups(supply, chunk_bank, max_new_tokens=40, chunk=CHUNK, top_k=1, stop_at_eos=False)
    pieces = list(stream(model, tokenizer, [PROMPT], memory=memory, decoding=options))
    [whole] = _generate(model, tokenizer, supply, chunk_bank, [PROMPT])
    assert "".join(p.text for p in pieces) == whole.text
    assert all(p.row == 0 and len(p.reference_ids) == 1 for p in pieces)
    assert {r for p in pieces for r in p.reference_ids} <= set(whole.reference_ids)


def test_rag_puts_retrieved_texts_before_the_prompt(model, tokenizer, supply, blocking, chunk_bank):
    [rag] = generate_flat(model, tokenizer, [PROMPT], mode='rag', supply=supply, bank=chunk_bank, max_new_tokens=8, top_k=3)
    hits = blocking.retrieve(chunk_bank, text=PROMPT, top_k=3)
    assert rag.rag_reference_ids == [h.external_id for h in hits]
    context = "".join(h.text + "\n\n" for h in hits)
    assert tokenizer.decode(rag.prompt_ids) == context + PROMPT
    assert rag.segments == [] and len(rag.token_ids) <= 8


def test_generation_refuses_memories_of_another_model(server, api_key, tokenizer, spec, chunk_bank):
    other = tiny_llama(seed=12)
    with MemorySupply(server.target, api_key, other, spec, tokenizer=tokenizer) as s:
        with pytest.raises(FingerprintMismatchError, match="running model"):
            _generate(other, tokenizer, s, chunk_bank, [PROMPT])


def test_sampling_is_seeded(model, tokenizer):
    options = dict(max_new_tokens=12, stop_at_eos=False, temperature=1.0, top_p=0.9)
    a = generate_flat(model, tokenizer, [SHORT], mode='plain', seed=1, **options)[0].token_ids
    b = generate_flat(model, tokenizer, [SHORT], mode='plain', seed=1, **options)[0].token_ids
    c = generate_flat(model, tokenizer, [SHORT], mode='plain', seed=2, **options)[0].token_ids
    greedy = generate_flat(model, tokenizer, [SHORT], mode='plain', max_new_tokens=12, stop_at_eos=False)[0].token_ids
    assert a == b and (a != c or a != greedy)
