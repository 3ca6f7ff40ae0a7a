import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_FP16: _ClassVar[Codec]
    CODEC_INT8: _ClassVar[Codec]
    CODEC_INT4: _ClassVar[Codec]
    CODEC_PQ: _ClassVar[Codec]

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    METRIC_COSINE: _ClassVar[Metric]
    METRIC_L2: _ClassVar[Metric]
    METRIC_IP: _ClassVar[Metric]
CODEC_UNSPECIFIED: Codec
CODEC_FP16: Codec
CODEC_INT8: Codec
CODEC_INT4: Codec
CODEC_PQ: Codec
METRIC_UNSPECIFIED: Metric
METRIC_COSINE: Metric
METRIC_L2: Metric
METRIC_IP: Metric

class MemorySpec(_message.Message):
    __slots__ = ("memory_layers", "kv_heads", "head_dim", "tokens_per_head", "reference_length", "codec", "scheme")
    MEMORY_LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_HEAD_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    memory_layers: _containers.RepeatedScalarFieldContainer[int]
    kv_heads: int
    head_dim: int
    tokens_per_head: int
    reference_length: int
    codec: str
    scheme: Codec
    def __init__(self, memory_layers: _Optional[_Iterable[int]] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., tokens_per_head: _Optional[int] = ..., reference_length: _Optional[int] = ..., codec: _Optional[str] = ..., scheme: _Optional[_Union[Codec, str]] = ...) -> None: ...

class EmbedderSpec(_message.Message):
    __slots__ = ("name", "dimension", "metric", "distance")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dimension: int
    metric: str
    distance: Metric
    def __init__(self, name: _Optional[str] = ..., dimension: _Optional[int] = ..., metric: _Optional[str] = ..., distance: _Optional[_Union[Metric, str]] = ...) -> None: ...

class Bank(_message.Message):
    __slots__ = ("name", "model_fingerprint", "memory_spec", "embedder", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SPEC_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_fingerprint: str
    memory_spec: MemorySpec
    embedder: EmbedderSpec
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., memory_spec: _Optional[_Union[MemorySpec, _Mapping]] = ..., embedder: _Optional[_Union[EmbedderSpec, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateBankRequest(_message.Message):
    __slots__ = ("bank",)
    BANK_FIELD_NUMBER: _ClassVar[int]
    bank: Bank
    def __init__(self, bank: _Optional[_Union[Bank, _Mapping]] = ...) -> None: ...

class GetBankRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListBanksRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBanksResponse(_message.Message):
    __slots__ = ("banks", "next_page_token")
    BANKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedCompositeFieldContainer[Bank]
    next_page_token: str
    def __init__(self, banks: _Optional[_Iterable[_Union[Bank, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteBankRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteBankResponse(_message.Message):
    __slots__ = ("references_deleted",)
    REFERENCES_DELETED_FIELD_NUMBER: _ClassVar[int]
    references_deleted: int
    def __init__(self, references_deleted: _Optional[int] = ...) -> None: ...

class Codebook(_message.Message):
    __slots__ = ("bank", "version", "digest", "size", "created_at")
    BANK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    bank: str
    version: int
    digest: str
    size: int
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, bank: _Optional[str] = ..., version: _Optional[int] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PutCodebookRequest(_message.Message):
    __slots__ = ("bank", "chunk")
    BANK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    bank: str
    chunk: bytes
    def __init__(self, bank: _Optional[str] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class GetCodebookRequest(_message.Message):
    __slots__ = ("bank", "version")
    BANK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    bank: str
    version: int
    def __init__(self, bank: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class CodebookChunk(_message.Message):
    __slots__ = ("codebook", "chunk")
    CODEBOOK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    codebook: Codebook
    chunk: bytes
    def __init__(self, codebook: _Optional[_Union[Codebook, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...
