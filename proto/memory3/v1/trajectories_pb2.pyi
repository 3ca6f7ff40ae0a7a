import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EpisodeRecord(_message.Message):
    __slots__ = ("episode_id", "bank", "model_fingerprint", "proxy_version", "prompt_ids", "response_ids", "decision_position", "decision_token", "decision_llm_prob", "decision_rank", "decision_p_accept", "decision_accepted", "decision_rejections", "rewards", "hidden_states", "logged_at", "prompt_text", "response_text")
    class RewardsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    BANK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROXY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    DECISION_POSITION_FIELD_NUMBER: _ClassVar[int]
    DECISION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DECISION_LLM_PROB_FIELD_NUMBER: _ClassVar[int]
    DECISION_RANK_FIELD_NUMBER: _ClassVar[int]
    DECISION_P_ACCEPT_FIELD_NUMBER: _ClassVar[int]
    DECISION_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DECISION_REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    LOGGED_AT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TEXT_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    bank: str
    model_fingerprint: str
    proxy_version: int
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    response_ids: _containers.RepeatedScalarFieldContainer[int]
    decision_position: _containers.RepeatedScalarFieldContainer[int]
    decision_token: _containers.RepeatedScalarFieldContainer[int]
    decision_llm_prob: _containers.RepeatedScalarFieldContainer[float]
    decision_rank: _containers.RepeatedScalarFieldContainer[int]
    decision_p_accept: _containers.RepeatedScalarFieldContainer[float]
    decision_accepted: _containers.RepeatedScalarFieldContainer[bool]
    decision_rejections: _containers.RepeatedScalarFieldContainer[int]
    rewards: _containers.ScalarMap[str, float]
    hidden_states: bytes
    logged_at: _timestamp_pb2.Timestamp
    prompt_text: str
    response_text: str
    def __init__(self, episode_id: _Optional[str] = ..., bank: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., proxy_version: _Optional[int] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., response_ids: _Optional[_Iterable[int]] = ..., decision_position: _Optional[_Iterable[int]] = ..., decision_token: _Optional[_Iterable[int]] = ..., decision_llm_prob: _Optional[_Iterable[float]] = ..., decision_rank: _Optional[_Iterable[int]] = ..., decision_p_accept: _Optional[_Iterable[float]] = ..., decision_accepted: _Optional[_Iterable[bool]] = ..., decision_rejections: _Optional[_Iterable[int]] = ..., rewards: _Optional[_Mapping[str, float]] = ..., hidden_states: _Optional[bytes] = ..., logged_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., prompt_text: _Optional[str] = ..., response_text: _Optional[str] = ...) -> None: ...

class LogRequest(_message.Message):
    __slots__ = ("episodes",)
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    episodes: _containers.RepeatedCompositeFieldContainer[EpisodeRecord]
    def __init__(self, episodes: _Optional[_Iterable[_Union[EpisodeRecord, _Mapping]]] = ...) -> None: ...

class LogSummary(_message.Message):
    __slots__ = ("logged", "duplicates", "decisions", "consistency_token")
    LOGGED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    logged: int
    duplicates: int
    decisions: int
    consistency_token: str
    def __init__(self, logged: _Optional[int] = ..., duplicates: _Optional[int] = ..., decisions: _Optional[int] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class AttachRewardRequest(_message.Message):
    __slots__ = ("episode_id", "name", "value")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    name: str
    value: float
    def __init__(self, episode_id: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class AttachRewardResponse(_message.Message):
    __slots__ = ("changed", "rewards")
    class RewardsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    rewards: _containers.ScalarMap[str, float]
    def __init__(self, changed: _Optional[bool] = ..., rewards: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EpisodeFilter(_message.Message):
    __slots__ = ("bank", "proxy_version", "model_fingerprint", "logged_after", "logged_before", "episode_ids", "proxy_versions")
    BANK_FIELD_NUMBER: _ClassVar[int]
    PROXY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LOGGED_AFTER_FIELD_NUMBER: _ClassVar[int]
    LOGGED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EPISODE_IDS_FIELD_NUMBER: _ClassVar[int]
    PROXY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    bank: str
    proxy_version: int
    model_fingerprint: str
    logged_after: _timestamp_pb2.Timestamp
    logged_before: _timestamp_pb2.Timestamp
    episode_ids: _containers.RepeatedScalarFieldContainer[str]
    proxy_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, bank: _Optional[str] = ..., proxy_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., logged_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., logged_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., episode_ids: _Optional[_Iterable[str]] = ..., proxy_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("filter", "cursor", "page_size", "limit", "omit_decisions", "include_hidden_states", "consistency_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OMIT_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: EpisodeFilter
    cursor: str
    page_size: int
    limit: int
    omit_decisions: bool
    include_hidden_states: bool
    consistency_token: str
    def __init__(self, filter: _Optional[_Union[EpisodeFilter, _Mapping]] = ..., cursor: _Optional[str] = ..., page_size: _Optional[int] = ..., limit: _Optional[int] = ..., omit_decisions: _Optional[bool] = ..., include_hidden_states: _Optional[bool] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class ReadPage(_message.Message):
    __slots__ = ("episodes", "next_cursor")
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    episodes: _containers.RepeatedCompositeFieldContainer[EpisodeRecord]
    next_cursor: str
    def __init__(self, episodes: _Optional[_Iterable[_Union[EpisodeRecord, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("filter", "reward_key", "include_hidden_states", "consistency_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    REWARD_KEY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: EpisodeFilter
    reward_key: str
    include_hidden_states: bool
    consistency_token: str
    def __init__(self, filter: _Optional[_Union[EpisodeFilter, _Mapping]] = ..., reward_key: _Optional[str] = ..., include_hidden_states: _Optional[bool] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class CountRequest(_message.Message):
    __slots__ = ("filter", "consistency_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: EpisodeFilter
    consistency_token: str
    def __init__(self, filter: _Optional[_Union[EpisodeFilter, _Mapping]] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class CountResponse(_message.Message):
    __slots__ = ("episodes", "decisions")
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    episodes: int
    decisions: int
    def __init__(self, episodes: _Optional[int] = ..., decisions: _Optional[int] = ...) -> None: ...
