"""What a proxy-guided generation leaves behind: one Episode per response, one Decision per
accept/reject (Proxy-RLHF, arXiv 2403.04283). The SDK logs these to the service; the offline
trainer reads them back. Shared by the sampler, the logger, the service and the trainer.

Hidden states are not part of an episode by default: the trainer recomputes them with the frozen
LLM. ``hidden_states`` (compressed bytes) is only for trainers that cannot run the LLM.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


@dataclass
class Decision:
    """The proxy's verdict on one candidate token proposed by the LLM."""

    position: int            # index of the response token being chosen (0 = first response token)
    candidate_token: int     # token id the LLM proposed
    llm_prob: float          # the LLM's (nucleus-renormalised) probability of the candidate
    rank: int                # the candidate's rank in the LLM's distribution (0 = most likely)
    p_accept: float          # the behaviour proxy's probability of accepting it
    accepted: bool           # the action taken
    rejections: int          # how many candidates were rejected before this one at this position


@dataclass
class Episode:
    """One prompt's response under one proxy version."""

    prompt_ids: list[int]
    response_ids: list[int]
    decisions: list[Decision]
    model_fingerprint: str
    proxy_version: int
    bank: str = ""
    rewards: dict[str, float] = field(default_factory=dict)
    episode_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    hidden_states: bytes | None = None
