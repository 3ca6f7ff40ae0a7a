from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FilterOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILTER_OP_UNSPECIFIED: _ClassVar[FilterOp]
    FILTER_OP_EQ: _ClassVar[FilterOp]
    FILTER_OP_IN: _ClassVar[FilterOp]
    FILTER_OP_GT: _ClassVar[FilterOp]
    FILTER_OP_GTE: _ClassVar[FilterOp]
    FILTER_OP_LT: _ClassVar[FilterOp]
    FILTER_OP_LTE: _ClassVar[FilterOp]
    FILTER_OP_EXISTS: _ClassVar[FilterOp]
FILTER_OP_UNSPECIFIED: FilterOp
FILTER_OP_EQ: FilterOp
FILTER_OP_IN: FilterOp
FILTER_OP_GT: FilterOp
FILTER_OP_GTE: FilterOp
FILTER_OP_LT: FilterOp
FILTER_OP_LTE: FilterOp
FILTER_OP_EXISTS: FilterOp

class ReferenceRecord(_message.Message):
    __slots__ = ("external_id", "text", "metadata", "embedding", "memory_size", "memory_chunk", "metadata_json")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EXTERNAL_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CHUNK_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    external_id: str
    text: str
    metadata: _containers.ScalarMap[str, str]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    memory_size: int
    memory_chunk: bytes
    metadata_json: str
    def __init__(self, external_id: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., embedding: _Optional[_Iterable[float]] = ..., memory_size: _Optional[int] = ..., memory_chunk: _Optional[bytes] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class WriteRequest(_message.Message):
    __slots__ = ("bank", "reference", "memory_chunk")
    BANK_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CHUNK_FIELD_NUMBER: _ClassVar[int]
    bank: str
    reference: ReferenceRecord
    memory_chunk: bytes
    def __init__(self, bank: _Optional[str] = ..., reference: _Optional[_Union[ReferenceRecord, _Mapping]] = ..., memory_chunk: _Optional[bytes] = ...) -> None: ...

class WriteSummary(_message.Message):
    __slots__ = ("inserted", "updated", "unchanged", "memory_bytes", "consistency_token")
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    inserted: int
    updated: int
    unchanged: int
    memory_bytes: int
    consistency_token: str
    def __init__(self, inserted: _Optional[int] = ..., updated: _Optional[int] = ..., unchanged: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("bank", "text", "vector", "top_k", "filter", "max_overlap", "include_memory", "include_text", "where", "consistency_token")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BANK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    MAX_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TEXT_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    bank: str
    text: str
    vector: Vector
    top_k: int
    filter: _containers.ScalarMap[str, str]
    max_overlap: float
    include_memory: bool
    include_text: bool
    where: MetadataFilter
    consistency_token: str
    def __init__(self, bank: _Optional[str] = ..., text: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Mapping[str, str]] = ..., max_overlap: _Optional[float] = ..., include_memory: _Optional[bool] = ..., include_text: _Optional[bool] = ..., where: _Optional[_Union[MetadataFilter, _Mapping]] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class BatchQuery(_message.Message):
    __slots__ = ("text", "vector")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    text: str
    vector: Vector
    def __init__(self, text: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class RetrieveBatchRequest(_message.Message):
    __slots__ = ("bank", "queries", "top_k", "filter", "where", "max_overlap", "include_memory", "include_text", "consistency_token")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BANK_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    MAX_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TEXT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    bank: str
    queries: _containers.RepeatedCompositeFieldContainer[BatchQuery]
    top_k: int
    filter: _containers.ScalarMap[str, str]
    where: MetadataFilter
    max_overlap: float
    include_memory: bool
    include_text: bool
    consistency_token: str
    def __init__(self, bank: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[BatchQuery, _Mapping]]] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Mapping[str, str]] = ..., where: _Optional[_Union[MetadataFilter, _Mapping]] = ..., max_overlap: _Optional[float] = ..., include_memory: _Optional[bool] = ..., include_text: _Optional[bool] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class BatchHit(_message.Message):
    __slots__ = ("query", "reference")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    query: int
    reference: StoredReference
    def __init__(self, query: _Optional[int] = ..., reference: _Optional[_Union[StoredReference, _Mapping]] = ...) -> None: ...

class RetrieveBatchResponse(_message.Message):
    __slots__ = ("hits", "frames")
    HITS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[BatchHit]
    frames: _containers.RepeatedCompositeFieldContainer[ReferenceFrame]
    def __init__(self, hits: _Optional[_Iterable[_Union[BatchHit, _Mapping]]] = ..., frames: _Optional[_Iterable[_Union[ReferenceFrame, _Mapping]]] = ...) -> None: ...

class MetadataCondition(_message.Message):
    __slots__ = ("key", "op", "value_json")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_JSON_FIELD_NUMBER: _ClassVar[int]
    key: str
    op: FilterOp
    value_json: str
    def __init__(self, key: _Optional[str] = ..., op: _Optional[_Union[FilterOp, str]] = ..., value_json: _Optional[str] = ...) -> None: ...

class MetadataFilter(_message.Message):
    __slots__ = ("conditions",)
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    conditions: _containers.RepeatedCompositeFieldContainer[MetadataCondition]
    def __init__(self, conditions: _Optional[_Iterable[_Union[MetadataCondition, _Mapping]]] = ...) -> None: ...

class StoredReference(_message.Message):
    __slots__ = ("external_id", "text", "metadata", "score", "memory_size", "memory_crc32", "rank", "metadata_json")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EXTERNAL_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CRC32_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    external_id: str
    text: str
    metadata: _containers.ScalarMap[str, str]
    score: float
    memory_size: int
    memory_crc32: int
    rank: int
    metadata_json: str
    def __init__(self, external_id: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., score: _Optional[float] = ..., memory_size: _Optional[int] = ..., memory_crc32: _Optional[int] = ..., rank: _Optional[int] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class ReferenceFrame(_message.Message):
    __slots__ = ("reference", "memory_chunk")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CHUNK_FIELD_NUMBER: _ClassVar[int]
    reference: StoredReference
    memory_chunk: bytes
    def __init__(self, reference: _Optional[_Union[StoredReference, _Mapping]] = ..., memory_chunk: _Optional[bytes] = ...) -> None: ...

class ReferenceFrames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[ReferenceFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[ReferenceFrame, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("bank", "external_ids", "include_memory", "allow_missing", "consistency_token")
    BANK_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    bank: str
    external_ids: _containers.RepeatedScalarFieldContainer[str]
    include_memory: bool
    allow_missing: bool
    consistency_token: str
    def __init__(self, bank: _Optional[str] = ..., external_ids: _Optional[_Iterable[str]] = ..., include_memory: _Optional[bool] = ..., allow_missing: _Optional[bool] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("bank", "external_ids")
    BANK_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_IDS_FIELD_NUMBER: _ClassVar[int]
    bank: str
    external_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bank: _Optional[str] = ..., external_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("bank", "consistency_token")
    BANK_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    bank: str
    consistency_token: str
    def __init__(self, bank: _Optional[str] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("references", "with_memory", "memory_bytes", "text_bytes")
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    WITH_MEMORY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    references: int
    with_memory: int
    memory_bytes: int
    text_bytes: int
    def __init__(self, references: _Optional[int] = ..., with_memory: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., text_bytes: _Optional[int] = ...) -> None: ...

class ScrollRequest(_message.Message):
    __slots__ = ("bank", "where", "page_size", "page_token", "include_text", "include_memory", "consistency_token")
    BANK_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TEXT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    bank: str
    where: MetadataFilter
    page_size: int
    page_token: str
    include_text: bool
    include_memory: bool
    consistency_token: str
    def __init__(self, bank: _Optional[str] = ..., where: _Optional[_Union[MetadataFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_text: _Optional[bool] = ..., include_memory: _Optional[bool] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class ScrollResponse(_message.Message):
    __slots__ = ("frames", "next_page_token")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[ReferenceFrame]
    next_page_token: str
    def __init__(self, frames: _Optional[_Iterable[_Union[ReferenceFrame, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
