"""Proxy policy: shapes, constant policies, parameter budget, safetensors round trips."""

from __future__ import annotations

import pytest
import torch

from memory3.sdk.proxy.policy import ProxyPolicy, count_trainable, parameter_ratio, width_for_budget
from memory3.trainer.model import build_model

from tiny_models import tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)



def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)

def test_outputs_probabilities_and_values(model):
    proxy = ProxyPolicy.for_model(model, width=8, seed=0)
    hidden, candidate = torch.randn(5, 64, generator=_rng(1)), torch.randn(5, 64, generator=_rng(2))
    logit, value = proxy(hidden, candidate)
    assert logit.shape == value.shape == (5,)
    p = proxy.p_accept(hidden, candidate)
    assert ((p > 0) & (p < 1)).all()
    assert abs(float(p.detach().mean()) - 0.5) < 0.1  # the initial proxy explores: p(accept) ~ 0.5


def test_constant_policies(model):
    hidden, candidate = torch.randn(3, 64, generator=_rng(3)), torch.randn(3, 64, generator=_rng(4))
    assert torch.equal(ProxyPolicy.always_accept(model).p_accept(hidden, candidate), torch.ones(3))
    assert torch.equal(ProxyPolicy.always_reject(model).p_accept(hidden, candidate), torch.zeros(3))


def test_parameter_ratio_within_one_percent_on_the_reference_preset():
    """The 'tiny' reference preset (~1.05M parameters, 2048 tokens): proxy at most 1% of it."""
    llm = build_model("tiny", vocab_size=2048, seed=0)
    proxy = ProxyPolicy.for_model(llm, seed=0)
    ratio = parameter_ratio(proxy, llm)
    print(f"proxy {count_trainable(proxy)} params, width {proxy.config.width}, ratio {ratio:.4%}")
    assert 0.005 < ratio <= 0.01
    assert proxy.config.width == width_for_budget(llm)


def test_bytes_and_directory_round_trip(model, tmp_path):
    proxy = ProxyPolicy.for_model(model, width=8, seed=3)
    proxy.version = 7
    hidden, candidate = torch.randn(4, 64, generator=_rng(5)), torch.randn(4, 64, generator=_rng(6))
    for loaded in (ProxyPolicy.from_bytes(proxy.to_bytes()), ProxyPolicy.load(proxy.save(tmp_path / "p"))):
        assert loaded.config == proxy.config and loaded.version == 7
        assert torch.equal(loaded.p_accept(hidden, candidate), proxy.p_accept(hidden, candidate))


def test_refuses_another_model(model):
    proxy = ProxyPolicy.for_model(model, width=8)
    proxy.check_model(model)
    with pytest.raises(ValueError, match="belongs to model"):
        proxy.check_model(tiny_llama(seed=5))
