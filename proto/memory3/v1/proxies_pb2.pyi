import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProxyInfo(_message.Message):
    __slots__ = ("name", "version", "model_fingerprint", "parent_version", "metrics", "config_json", "weights_size", "weights_sha256", "created_at", "consistency_token")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    model_fingerprint: str
    parent_version: int
    metrics: _containers.ScalarMap[str, float]
    config_json: str
    weights_size: int
    weights_sha256: bytes
    created_at: _timestamp_pb2.Timestamp
    consistency_token: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., parent_version: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., config_json: _Optional[str] = ..., weights_size: _Optional[int] = ..., weights_sha256: _Optional[bytes] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("info", "weights_chunk")
    INFO_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CHUNK_FIELD_NUMBER: _ClassVar[int]
    info: ProxyInfo
    weights_chunk: bytes
    def __init__(self, info: _Optional[_Union[ProxyInfo, _Mapping]] = ..., weights_chunk: _Optional[bytes] = ...) -> None: ...

class GetProxyRequest(_message.Message):
    __slots__ = ("name", "version", "model_fingerprint", "include_weights", "consistency_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    model_fingerprint: str
    include_weights: bool
    consistency_token: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., include_weights: _Optional[bool] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class ProxyFrame(_message.Message):
    __slots__ = ("info", "weights_chunk")
    INFO_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CHUNK_FIELD_NUMBER: _ClassVar[int]
    info: ProxyInfo
    weights_chunk: bytes
    def __init__(self, info: _Optional[_Union[ProxyInfo, _Mapping]] = ..., weights_chunk: _Optional[bytes] = ...) -> None: ...

class ListProxiesRequest(_message.Message):
    __slots__ = ("name", "page_size", "page_token", "consistency_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    page_size: int
    page_token: str
    consistency_token: str
    def __init__(self, name: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class ListProxiesResponse(_message.Message):
    __slots__ = ("proxies", "next_page_token")
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    proxies: _containers.RepeatedCompositeFieldContainer[ProxyInfo]
    next_page_token: str
    def __init__(self, proxies: _Optional[_Iterable[_Union[ProxyInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
