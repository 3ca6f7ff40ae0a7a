"""ProxyUpdater against the real registry: the latest version is picked up on request and on an
interval by the same updater object (no restart), a generation started with one version logs
that version, and another model's proxy is refused while the current one stays."""

from __future__ import annotations

import secrets
import time

import pytest
import torch
from decoding_helpers import generate_flat

from memory3.sdk.model.fingerprint import model_fingerprint
from memory3.sdk.proxy.policy import ProxyPolicy
from memory3.sdk.proxy.updates import ProxyModelMismatch, ProxyUpdater
from tiny_models import byte_tokenizer, tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)


@pytest.fixture(scope="module")
def stranger():
    return tiny_llama(seed=2)


def _name() -> str:
    return "proxy-" + secrets.token_hex(3)


def _publish(client, name: str, proxy: ProxyPolicy, fingerprint: str | None = None) -> int:
    fingerprint = fingerprint or proxy.config.model_fingerprint
    return client.publish_proxy(name, proxy.to_bytes(), fingerprint).version


def _same_weights(a: ProxyPolicy, b: ProxyPolicy) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_refresh_switches_to_the_latest_version_without_recreating_anything(client, model):
    name = _name()
    with ProxyUpdater(client, name=name, model=model, initial=ProxyPolicy.always_accept(model)) as updater:
        assert updater.version == 0 and updater.current.info is None  # nothing published yet
        assert updater.refresh() is False

        v1 = ProxyPolicy.for_model(model, width=8, seed=1)
        assert _publish(client, name, v1) == 1
        assert updater.refresh() is True and updater.version == 1
        assert _same_weights(updater.policy, v1) and updater.policy.version == 1
        assert updater.current.info.version == 1 and updater.current.info.weights is None
        in_use = updater.current

        v2 = ProxyPolicy.for_model(model, width=8, seed=2)
        assert _publish(client, name, v2) == 2
        assert updater.refresh() is True and updater.version == 2 and _same_weights(updater.policy, v2)
        assert updater.refresh() is False and updater.updates == 2  # nothing newer: no download
        assert in_use.version == 1 and _same_weights(in_use.policy, v1)  # a snapshot in use is never changed

        # a generation takes the policy in use at its start and logs its version
        [result] = generate_flat(model, byte_tokenizer(), ["Hello"], mode="plain", proxy=updater.policy,
                                     temperature=1.0, top_p=0.9, seed=0, max_new_tokens=3, stop_at_eos=False)
        assert result.episode.proxy_version == 2


def test_interval_mode_picks_up_a_new_version_within_seconds(server, client, tenant, model):
    name = _name()
    _publish(client, name, ProxyPolicy.for_model(model, width=8, seed=1))
    _publish(client, name, ProxyPolicy.for_model(model, width=8, seed=2))
    # target + api_key: the updater owns (and closes) its client
    with ProxyUpdater(server.target, tenant.api_key, name=name, model=model, interval_seconds=0.2) as updater:
        assert updater.version == 2  # fetched at construction
        v3 = ProxyPolicy.for_model(model, width=8, seed=3)
        assert _publish(client, name, v3) == 3
        assert updater.wait_for_version(3, timeout=15)
        assert _same_weights(updater.policy, v3) and updater.last_error is None


def test_a_proxy_for_another_model_is_refused_and_the_current_one_kept(client, model, stranger):
    name = _name()
    mine = ProxyPolicy.for_model(model, width=8, seed=1)
    _publish(client, name, mine)
    with ProxyUpdater(client, name=name, model=model) as updater:
        assert updater.version == 1
        theirs = ProxyPolicy.for_model(stranger, width=8, seed=1)

        # registered for the other model: the registry refuses it to us
        assert _publish(client, name, theirs) == 2
        with pytest.raises(ProxyModelMismatch, match="trained for model") as info:
            updater.refresh()
        assert model_fingerprint(model) in str(info.value) and model_fingerprint(stranger) in str(info.value)
        assert updater.version == 1 and _same_weights(updater.policy, mine)

        # registered under our fingerprint by mistake: the weights' own config gives it away
        assert _publish(client, name, theirs, fingerprint=model_fingerprint(model)) == 3
        with pytest.raises(ProxyModelMismatch, match="weights were trained for model"):
            updater.refresh()
        assert updater.version == 1 and _same_weights(updater.policy, mine)

        # the background poller keeps the sampler running: it records the error, keeps version 1
        updater.start(0.1)
        deadline = time.monotonic() + 10
        while updater.last_error is None and time.monotonic() < deadline:
            updater.wait_for_version(99, timeout=0.1)
        assert isinstance(updater.last_error, ProxyModelMismatch) and updater.version == 1

    with pytest.raises(ProxyModelMismatch):  # at construction too
        ProxyUpdater(client, name=name, model=stranger)
