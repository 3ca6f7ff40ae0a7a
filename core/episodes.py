"""What a proxy-guided generation leaves behind: one Episode per response, one Decision per
accept/reject (Proxy-RLHF, arXiv 2403.04283). The SDK logs these to the service; the offline
trainer reads them back. Shared by the sampler, the logger, the service and the trainer.

Decisions travel and rest column-wise (one array per field): :data:`DECISION_FIELDS` is the one
list of those columns — the wire record's field, the database and Parquet column (the same name),
their types, and the Decision attribute — used by every conversion.

Hidden states are not part of an episode by default: the trainer recomputes them with the frozen
LLM. ``hidden_states`` (compressed bytes) is only for trainers that cannot run the LLM.

``prompt_text`` / ``response_text`` are the ids decoded by the model's tokenizer where the episode
was made (``make_episodes`` with a tokenizer; the decoding loop always has one), logged with the
episode so an export carries text beside the ids without a tokenizer at hand. None: not logged.
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
    prompt_text: str | None = None      # the prompt ids decoded (skip_special_tokens); None: not logged
    response_text: str | None = None    # the response ids decoded likewise


@dataclass(frozen=True)
class DecisionField:
    attribute: str  # the Decision attribute
    column: str  # the EpisodeRecord field, the episodes table column and the Parquet column
    sql_type: str  # the column's PostgreSQL array type
    arrow_type: str  # the Parquet list's item type (a pyarrow type factory name)


DECISION_FIELDS = (
    DecisionField("position", "decision_position", "int4[]", "int32"),
    DecisionField("candidate_token", "decision_token", "int4[]", "int32"),
    DecisionField("llm_prob", "decision_llm_prob", "float4[]", "float32"),
    DecisionField("rank", "decision_rank", "int4[]", "int32"),
    DecisionField("p_accept", "decision_p_accept", "float4[]", "float32"),
    DecisionField("accepted", "decision_accepted", "bool[]", "bool_"),
    DecisionField("rejections", "decision_rejections", "int4[]", "int32"),
)
DECISION_COLUMNS = tuple(f.column for f in DECISION_FIELDS)


def decision_columns(decisions: list[Decision]) -> list[list]:
    """Decisions -> one list per field, in DECISION_FIELDS order."""
    return [[getattr(d, f.attribute) for d in decisions] for f in DECISION_FIELDS]


def decisions_from_columns(columns) -> list[Decision]:
    """One list per field, in DECISION_FIELDS order -> decisions."""
    return [Decision(*values) for values in zip(*columns)]
