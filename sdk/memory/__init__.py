"""Explicit memories (Memory³): compute them from references, store them compactly, read them back.

Encoder (text -> :class:`ExplicitMemory`), codec (memory <-> checksummed blob, one scheme per
:class:`SchemeCodec`), PQ codebooks, the writer (encode + write to a bank), the supply (retrieve,
fetch, decode, cache), the injector (memories into attention) and the retrieval head (keys and
queries in the model's own space).
"""

from memory3.core.blob import SCHEMES, CodecError

from .codec import SchemeCodec, decode_memory, encode_memory, register_scheme
from .encoder import MemoryEncoder, ReferenceTooShortError
from .injection import MemoryInjector
from .pq import CodebookError, PQCodebook, train_codebook
from .retrieval_head import RetrievalHead, RetrievalSpaceError
from .supply import FingerprintMismatchError, MemorySupply, Retrieved
from .tensors import ExplicitMemory
from .writer import MemoryWriter

__all__ = [
    "CodebookError", "CodecError", "ExplicitMemory", "FingerprintMismatchError", "MemoryEncoder", "MemoryInjector",
    "MemorySupply", "MemoryWriter", "PQCodebook", "ReferenceTooShortError", "RetrievalHead", "RetrievalSpaceError",
    "Retrieved", "SCHEMES", "SchemeCodec",
    "decode_memory", "encode_memory", "register_scheme", "train_codebook",
]
