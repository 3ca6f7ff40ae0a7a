"""The proxy policy: a small network that accepts or rejects the frozen LLM's proposed tokens.

Proxy-RLHF (arXiv 2403.04283) aligns a model without touching it: the LLM proposes, a policy of about
1% of its size disposes. :class:`ProxyPolicy` reads what the LLM already computes, its last hidden
state and the candidate token's input embedding (each through a parameter-free LayerNorm), and gives
an accept logit and a value; :func:`width_for_budget` sizes it to the budget. Constant modes
(``"accept"`` / ``"reject"``) ignore their inputs: ``"accept"`` makes proxy sampling plain nucleus
sampling and is a safe version 0. Weights travel as one safetensors blob with the config in its
metadata (:meth:`ProxyPolicy.to_bytes`).

Details: docs/design.md ("Proxy policy").
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save, save_file
from torch import nn

MODES = ("learned", "accept", "reject")
WEIGHTS_FILENAME = "proxy.safetensors"
CONFIG_FILENAME = "proxy.json"
METADATA_KEY = "memory3.proxy"


@dataclass
class ProxyConfig:
    """Shape of a proxy, plus what it belongs to. Stored beside the weights."""

    hidden_size: int  # the LLM's hidden size (last hidden state)
    embed_size: int  # the LLM's input embedding size (== hidden_size for Llama)
    width: int = 16  # trunk width: the parameter budget knob
    mode: str = "learned"  # "learned" | "accept" | "reject"
    init_accept_logit: float = 0.0  # bias of the accept head at init: 0 -> p(accept) ~ 0.5, explores
    version: int = 0  # set by whoever publishes it (the registry); logged with every decision
    model_fingerprint: str = ""  # the frozen LLM it reads; a proxy for another model is refused

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"proxy mode must be one of {MODES}, got {self.mode!r}")
        if min(self.hidden_size, self.embed_size, self.width) <= 0:
            raise ValueError("proxy sizes must be positive")


class ProxyPolicy(nn.Module):
    """p(accept | LLM hidden state, candidate embedding), and a value head for training."""

    def __init__(self, config: ProxyConfig):
        super().__init__()
        self.config = config
        self.hidden_proj = nn.Linear(config.hidden_size, config.width)
        self.candidate_proj = nn.Linear(config.embed_size, config.width, bias=False)
        self.accept_head = nn.Linear(config.width, 1)
        self.value_head = nn.Linear(config.width, 1)
        with torch.no_grad():
            self.accept_head.weight.mul_(0.1)  # start near the init bias: a gentle explorer
            self.accept_head.bias.fill_(config.init_accept_logit)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def for_model(cls, model: nn.Module, width: int | None = None, mode: str = "learned", seed: int | None = None,
                  budget: float = 0.01, **kwargs) -> "ProxyPolicy":
        """A proxy sized for ``model``: ``width`` or the largest width within ``budget`` of its params."""
        from memory3.sdk.model.fingerprint import model_fingerprint

        hidden_size = model.config.hidden_size
        embed_size = model.get_input_embeddings().embedding_dim
        if width is None:
            width = width_for_budget(model, budget)
        if seed is not None:
            torch.manual_seed(seed)
        config = ProxyConfig(hidden_size, embed_size, width, mode, model_fingerprint=model_fingerprint(model), **kwargs)
        param = next(model.parameters())
        return cls(config).to(device=param.device)

    @classmethod
    def always_accept(cls, model: nn.Module) -> "ProxyPolicy":
        return cls.for_model(model, width=1, mode="accept")

    @classmethod
    def always_reject(cls, model: nn.Module) -> "ProxyPolicy":
        return cls.for_model(model, width=1, mode="reject")

    @property
    def version(self) -> int:
        return self.config.version

    @version.setter
    def version(self, value: int) -> None:
        self.config.version = int(value)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden: torch.Tensor, candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (..., hidden_size), candidate (..., embed_size) -> (accept logit (...), value (...)).

        Constant modes return +-inf logits (p exactly 1 or 0) and a zero value.
        """
        if self.config.mode != "learned":
            shape = hidden.shape[:-1]
            sign = 1.0 if self.config.mode == "accept" else -1.0
            logit = torch.full(shape, sign * float("inf"), dtype=torch.float32, device=hidden.device)
            return logit, torch.zeros(shape, dtype=torch.float32, device=hidden.device)
        dtype = self.hidden_proj.weight.dtype
        hidden_n = F.layer_norm(hidden.to(dtype), hidden.shape[-1:])
        candidate_n = F.layer_norm(candidate.to(dtype), candidate.shape[-1:])
        trunk = torch.relu(self.hidden_proj(hidden_n) + self.candidate_proj(candidate_n))
        return self.accept_head(trunk).squeeze(-1), self.value_head(trunk).squeeze(-1)

    def p_accept(self, hidden: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """Probability of accepting each candidate, float32."""
        logit, _ = self(hidden, candidate)
        return torch.sigmoid(logit.float())

    # ------------------------------------------------------------------ persistence
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def _metadata(self) -> dict[str, str]:
        return {METADATA_KEY: json.dumps(asdict(self.config), sort_keys=True)}

    def to_bytes(self) -> bytes:
        """One safetensors blob: the weights, with the config (and version) in its metadata."""
        return save(self._tensors(), metadata=self._metadata())

    @classmethod
    def from_bytes(cls, data: bytes) -> "ProxyPolicy":
        config = ProxyConfig(**json.loads(safetensors_metadata(data)[METADATA_KEY]))
        proxy = cls(config)
        proxy.load_state_dict(st_load(data))
        return proxy.eval()

    def save(self, directory: str | Path) -> Path:
        """``proxy.safetensors`` + ``proxy.json`` (the same config, for people and tools)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self._tensors(), directory / WEIGHTS_FILENAME, metadata=self._metadata())
        (directory / CONFIG_FILENAME).write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ProxyPolicy":
        directory = Path(directory)
        proxy = cls(ProxyConfig(**json.loads((directory / CONFIG_FILENAME).read_text())))
        proxy.load_state_dict(load_file(directory / WEIGHTS_FILENAME))
        return proxy.eval()

    def check_model(self, model: nn.Module) -> None:
        """Refuse to run on a model other than the one this proxy was trained to read."""
        from memory3.sdk.model.fingerprint import model_fingerprint

        want = self.config.model_fingerprint
        if want and want != model_fingerprint(model):
            raise ValueError(f"proxy v{self.version} belongs to model {want[:16]}…, not this one")


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header size, JSON header)."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]).get("__metadata__", {}) or {}


def count_trainable(module: nn.Module) -> int:
    """Distinct parameters with ``requires_grad`` (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters() if p.requires_grad}.values())


def count_distinct(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def parameter_ratio(proxy: nn.Module, model: nn.Module) -> float:
    """Trainable proxy parameters / all LLM parameters (the paper's headline figure, ~1%)."""
    return count_trainable(proxy) / count_distinct(model)


def width_for_budget(model: nn.Module, budget: float = 0.01) -> int:
    """Largest trunk width whose proxy stays within ``budget`` x the model's parameters."""
    hidden = model.config.hidden_size
    embed = model.get_input_embeddings().embedding_dim
    per_width = hidden + 1 + embed + 2  # hidden_proj row + bias, candidate_proj row, two head weights
    fixed = 2  # the two head biases
    return max(1, int((budget * count_distinct(model) - fixed) // per_width))
