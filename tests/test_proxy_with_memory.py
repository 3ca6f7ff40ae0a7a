"""Both on: memories in attention (every-64-token schedule) and a proxy on sampling, against a real
server. An always-accept proxy is memory sampling token for token; a learned proxy rejects, its
decisions are well formed and read the memories, the schedule is unchanged, and the episodes
travel to the service (through the background logger and the client) and come back intact.

The model, tokenizer, bank and clients are test_decoding's fixtures, imported, not copied."""

from __future__ import annotations

import pytest
import torch
from decoding_helpers import generate_flat
from test_decoding import (  # noqa: F401  (fixtures are used by name)
    PROMPT,
    SHORT,
    chunk_bank,
    model,
    spec,
    supply,
    tokenizer,
    writer,
)

from helpers import assert_decisions_explain_tokens
from memory3.sdk.proxy.logger import TrajectoryLogger
from memory3.sdk.proxy.policy import ProxyPolicy
from tiny_models import tiny_llama

torch.set_num_threads(1)
CHUNK = 64  # the paper's schedule
MAX_NEW = 150  # three generated segments: [0, 64) keeps the prompt's memories, then two switches
SAMPLING = dict(max_new_tokens=MAX_NEW, chunk=CHUNK, top_k=2, stop_at_eos=False, temperature=1.0, top_p=0.9)


def _generate(model, tokenizer, supply, bank, prompts, **options):
    return generate_flat(model, tokenizer, prompts, mode="memory", supply=supply, bank=bank, **{**SAMPLING, **options})


@pytest.fixture(scope="module")
def learned(model):
    proxy = ProxyPolicy.for_model(model, width=8, seed=0)  # p(accept) ~ 0.5: it rejects often
    proxy.version = 5
    return proxy


def test_always_accept_proxy_is_memory_sampling_token_for_token(model, tokenizer, supply, chunk_bank):
    prompts = [PROMPT, SHORT]
    without = _generate(model, tokenizer, supply, chunk_bank, prompts, seed=7)
    accepted = _generate(model, tokenizer, supply, chunk_bank, prompts, seed=7,
                         proxy=ProxyPolicy.always_accept(model))
    for a, b in zip(without, accepted):
        assert b.token_ids == a.token_ids and b.segments == a.segments
        assert a.episode is None
        assert [d.position for d in b.episode.decisions] == list(range(MAX_NEW))
        assert all(d.accepted and d.rejections == 0 and d.p_accept == 1.0 for d in b.episode.decisions)
    other_seed = _generate(model, tokenizer, supply, chunk_bank, [PROMPT], seed=8)[0]
    assert other_seed.token_ids != without[0].token_ids  # the seed matters


def test_learned_proxy_decides_while_memories_switch_every_64_tokens(model, tokenizer, supply, blocking, chunk_bank,
                                                                      learned):
    results = _generate(model, tokenizer, supply, chunk_bank, [PROMPT, SHORT], seed=3, proxy=learned)
    first = results[0]
    n = len(first.prompt_ids)
    assert n == 78
    spans = [(s.start, s.end) for s in first.segments]
    assert spans == [(0, 64), (64, 78), (78, 142), (142, 206), (206, n + MAX_NEW - 1)]
    generated = [tokenizer.decode(first.token_ids[k * CHUNK:(k + 1) * CHUNK], skip_special_tokens=True)
                 for k in (0, 1)]
    assert [s.query for s in first.segments[3:]] == generated  # queried with the tokens the proxy let through
    for segment in first.segments:
        answer = blocking.retrieve(chunk_bank, text=segment.query, top_k=2)
        assert segment.reference_ids == [r.external_id for r in answer]

    rejected = 0
    for result in results:
        episode = result.episode
        assert episode.bank == chunk_bank and episode.proxy_version == 5 and len(episode.model_fingerprint) == 64
        assert episode.prompt_ids == result.prompt_ids and episode.response_ids == result.token_ids
        rejected += sum(not d.accepted for d in episode.decisions)
        assert_decisions_explain_tokens(episode.decisions, result.token_ids, max_rejections=4)
    assert rejected > 0

    # the proxy's inputs came from a model reading memories: the same proxy, seed and prompt decide
    # on other probabilities without them
    [plain] = generate_flat(model, tokenizer, [PROMPT], mode="plain", proxy=learned, seed=3,
                                **{**SAMPLING, "max_new_tokens": 4})
    assert plain.episode.bank == "" and plain.segments == []
    assert plain.episode.decisions[0].llm_prob != pytest.approx(first.episode.decisions[0].llm_prob, abs=1e-6)


def test_episodes_are_logged_to_the_service_and_read_back(model, tokenizer, supply, blocking, chunk_bank, learned,
                                                          tmp_path):
    with TrajectoryLogger(client=blocking, spool_dir=tmp_path / "spool", linger=0.01) as logger:
        results = _generate(model, tokenizer, supply, chunk_bank, [PROMPT, SHORT], seed=4, proxy=learned,
                            max_new_tokens=70, trajectory_logger=logger)
        assert logger.flush(timeout=30)
        assert logger.stats.logged == 2 and logger.pending_spool() == 0
    sent = {r.episode.episode_id: r.episode for r in results}
    page = blocking.read_episodes(episode_ids=list(sent))
    assert sorted(e.episode_id for e in page.episodes) == sorted(sent)
    for got in page.episodes:
        want = sent[got.episode_id]
        assert (got.prompt_ids, got.response_ids, got.bank, got.proxy_version, got.model_fingerprint) == (
            want.prompt_ids, want.response_ids, chunk_bank, 5, want.model_fingerprint)
        assert len(got.decisions) == len(want.decisions)
        for g, w in zip(got.decisions, want.decisions):
            assert (g.position, g.candidate_token, g.rank, g.accepted, g.rejections) == (
                w.position, w.candidate_token, w.rank, w.accepted, w.rejections)
            assert g.llm_prob == pytest.approx(w.llm_prob, rel=1e-6)
            assert g.p_accept == pytest.approx(w.p_accept, rel=1e-6)
    again = blocking.log_episodes([r.episode for r in results])  # a re-send is recognised, not counted twice
    assert (again.logged, again.duplicates) == (0, 2)
    assert blocking.count_episodes(bank=chunk_bank, proxy_version=5)[0] == 2


def test_proxy_of_another_model_or_greedy_decoding_is_refused(model, tokenizer, supply, chunk_bank, learned):
    stranger = ProxyPolicy.for_model(tiny_llama(seed=12), width=8, seed=0)
    with pytest.raises(ValueError, match="belongs to model"):
        _generate(model, tokenizer, supply, chunk_bank, [SHORT], proxy=stranger, max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature > 0"):
        _generate(model, tokenizer, supply, chunk_bank, [SHORT], proxy=learned, temperature=0.0, max_new_tokens=2)
