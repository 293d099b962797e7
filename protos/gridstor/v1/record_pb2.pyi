from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardRef(_message.Message):
    __slots__ = ("backend", "key", "checksum")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    backend: int
    key: bytes
    checksum: bytes
    def __init__(self, backend: _Optional[int] = ..., key: _Optional[bytes] = ..., checksum: _Optional[bytes] = ...) -> None: ...

class ChunkRecord(_message.Message):
    __slots__ = ("plain_size", "cipher_size", "shards")
    PLAIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    CIPHER_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    plain_size: int
    cipher_size: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardRef]
    def __init__(self, plain_size: _Optional[int] = ..., cipher_size: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardRef, _Mapping]]] = ...) -> None: ...

class FileRecord(_message.Message):
    __slots__ = ("version", "hash", "size", "ext", "content_type", "chunk_size", "k", "m", "ec_type", "wrapped_key", "backends", "chunks", "created", "cipher")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    EXT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    EC_TYPE_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CIPHER_FIELD_NUMBER: _ClassVar[int]
    version: int
    hash: bytes
    size: int
    ext: str
    content_type: str
    chunk_size: int
    k: int
    m: int
    ec_type: str
    wrapped_key: bytes
    backends: _containers.RepeatedScalarFieldContainer[str]
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkRecord]
    created: int
    cipher: str
    def __init__(self, version: _Optional[int] = ..., hash: _Optional[bytes] = ..., size: _Optional[int] = ..., ext: _Optional[str] = ..., content_type: _Optional[str] = ..., chunk_size: _Optional[int] = ..., k: _Optional[int] = ..., m: _Optional[int] = ..., ec_type: _Optional[str] = ..., wrapped_key: _Optional[bytes] = ..., backends: _Optional[_Iterable[str]] = ..., chunks: _Optional[_Iterable[_Union[ChunkRecord, _Mapping]]] = ..., created: _Optional[int] = ..., cipher: _Optional[str] = ...) -> None: ...
