"""Episodes as rows of one Arrow table: the columns of the Parquet export and of the Export RPC's
Arrow stream — defined once, here, because the service streams them and the SDK writes them.

Every column has a type that Hugging Face ``datasets``, pandas and polars load as is: rewards are
a list of ``{name, value}`` structs, not an Arrow map (``datasets`` has no dtype for maps). Names
follow TRL where the meaning is TRL's (``prompt``, ``completion``: the logged texts, null when not
logged; ``reward``: ``rewards[reward_key]``, else their sum) and say ``proxy_`` where a name would
otherwise read as the LLM's (in TRL and OpenRLHF ``logprobs`` / ``action_mask`` are the policy
LLM's): ``proxy_action_mask`` (1 where the proxy accepted the response token), ``proxy_logprobs``
(per response token, the behaviour proxy's summed log-probability of its decisions there),
``proxy_decision_logprobs`` (per decision, log p_accept or log(1 - p_accept)). The decision
columns, ids and ``hidden_states`` make :func:`episode_from_row` rebuild an episode exactly.
Column list and the TRL / OpenRLHF mapping: docs/design.md ("Trajectory export").
"""

from __future__ import annotations

import math

import pyarrow as pa

from .episodes import DECISION_COLUMNS, DECISION_FIELDS, Decision, Episode, decision_columns, decisions_from_columns

LOG_EPS = 1e-12  # log(0) guard for a logged p_accept of exactly 0 or 1

REWARD = pa.struct([("name", pa.string()), ("value", pa.float64())])

SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("model_version", pa.string()),
        ("proxy_version", pa.int64()),
        ("bank", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("proxy_action_mask", pa.list_(pa.int8())),
        ("proxy_logprobs", pa.list_(pa.float32())),
        ("proxy_decision_logprobs", pa.list_(pa.float32())),
        ("rewards", pa.list_(REWARD)),
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
        "proxy_version": episode.proxy_version, "bank": episode.bank,
        "prompt": episode.prompt_text, "completion": episode.response_text,
        "prompt_ids": episode.prompt_ids, "response_ids": episode.response_ids, "proxy_action_mask": mask,
        "proxy_logprobs": token_logprobs, "proxy_decision_logprobs": decision_logprobs,
        "rewards": [{"name": k, "value": v} for k, v in sorted(episode.rewards.items())], "reward": reward,
        "hidden_states": episode.hidden_states if include_hidden_states else None,
    }
    row.update(zip(DECISION_COLUMNS, decision_columns(episode.decisions)))
    return row


def episodes_batch(episodes: list[Episode], reward_key: str | None, include_hidden_states: bool) -> pa.RecordBatch:
    """The episodes as one record batch of :data:`SCHEMA`."""
    rows = [episode_row(e, reward_key, include_hidden_states) for e in episodes]
    return pa.RecordBatch.from_pylist(rows, schema=SCHEMA)


def _rewards(value) -> dict[str, float]:
    """A row's rewards: ``[{name, value}, ...]``, or the ``[(name, value), ...]`` of a file written
    before rewards were a list of structs (an Arrow map)."""
    return {r["name"]: r["value"] for r in value} if value and isinstance(value[0], dict) else dict(value or ())


def episode_from_row(row: dict) -> Episode:
    """The episode a row of :data:`SCHEMA` (as ``to_pylist`` gives it) was made from: the inverse
    of :func:`episode_row` (hidden states only where they were included). Files written before
    the renames (``logprobs``, ``action_mask``, map rewards, no texts) read too: only the ids,
    decision columns, rewards and metadata are read back, and the texts when present."""
    return Episode(
        prompt_ids=row["prompt_ids"], response_ids=row["response_ids"],
        decisions=decisions_from_columns(row[column] for column in DECISION_COLUMNS),
        model_fingerprint=row["model_version"], proxy_version=row["proxy_version"], bank=row["bank"],
        rewards=_rewards(row["rewards"]), episode_id=row["episode_id"], hidden_states=row["hidden_states"],
        prompt_text=row.get("prompt"), response_text=row.get("completion"),
    )
