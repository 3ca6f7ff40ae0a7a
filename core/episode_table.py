"""Episodes as rows of one Arrow table: the columns of the Parquet export and of the Export RPC's
Arrow stream, in the shape RLHF libraries (TRL, OpenRLHF) expect — defined once, here, because
the service streams them and the SDK writes them.

One row per episode: ``prompt_ids``, ``response_ids``, ``action_mask`` (1 where the proxy accepted
the response token), ``logprobs`` (per token, the behaviour proxy's summed log-probability of its
decisions there), ``behaviour_logprobs`` (per decision, log p_accept or log(1 - p_accept)),
``rewards`` and ``reward`` (``rewards[reward_key]``, else their sum), ``model_version``,
``proxy_version``, ``episode_id``, ``bank``, the decision columns, and optionally hidden states.
"""

from __future__ import annotations

import math

import pyarrow as pa

from .episodes import DECISION_COLUMNS, DECISION_FIELDS, Decision, Episode, decision_columns

LOG_EPS = 1e-12  # log(0) guard for a logged p_accept of exactly 0 or 1

SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("model_version", pa.string()),
        ("proxy_version", pa.int64()),
        ("bank", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("action_mask", pa.list_(pa.int8())),
        ("logprobs", pa.list_(pa.float32())),
        ("behaviour_logprobs", pa.list_(pa.float32())),
        ("rewards", pa.map_(pa.string(), pa.float64())),
        ("reward", pa.float64()),
        *[(f.column, pa.list_(getattr(pa, f.arrow_type)())) for f in DECISION_FIELDS],
        ("hidden_states", pa.binary()),
    ]
)


def behaviour_logprob(decision: Decision) -> float:
    """log π_b(action): the behaviour proxy's log-probability of the action it took."""
    p = decision.p_accept if decision.accepted else 1.0 - decision.p_accept
    return math.log(max(p, LOG_EPS))


def episode_row(episode: Episode, reward_key: str | None, include_hidden_states: bool) -> dict:
    """One episode as a row of :data:`SCHEMA`."""
    n = len(episode.response_ids)
    mask, token_logprobs = [0] * n, [0.0] * n
    decision_logprobs = []
    for d in episode.decisions:
        lp = behaviour_logprob(d)
        decision_logprobs.append(lp)
        if 0 <= d.position < n:
            token_logprobs[d.position] += lp
            if d.accepted and d.candidate_token == episode.response_ids[d.position]:
                mask[d.position] = 1
    if reward_key is not None:
        reward = episode.rewards.get(reward_key)
    else:
        reward = sum(episode.rewards.values()) if episode.rewards else None
    row = {
        "episode_id": episode.episode_id, "model_version": episode.model_fingerprint,
        "proxy_version": episode.proxy_version, "bank": episode.bank, "prompt_ids": episode.prompt_ids,
        "response_ids": episode.response_ids, "action_mask": mask, "logprobs": token_logprobs,
        "behaviour_logprobs": decision_logprobs, "rewards": list(episode.rewards.items()), "reward": reward,
        "hidden_states": episode.hidden_states if include_hidden_states else None,
    }
    row.update(zip(DECISION_COLUMNS, decision_columns(episode.decisions)))
    return row


def episodes_batch(episodes: list[Episode], reward_key: str | None, include_hidden_states: bool) -> pa.RecordBatch:
    """The episodes as one record batch of :data:`SCHEMA`."""
    rows = [episode_row(e, reward_key, include_hidden_states) for e in episodes]
    return pa.RecordBatch.from_pylist(rows, schema=SCHEMA)
