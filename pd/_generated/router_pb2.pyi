from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerInfo(_message.Message):
    __slots__ = ("node_id", "role", "address", "block_size", "model", "num_blocks", "health_url")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_URL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: str
    address: str
    block_size: int
    model: str
    num_blocks: int
    health_url: str
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[str] = ..., address: _Optional[str] = ..., block_size: _Optional[int] = ..., model: _Optional[str] = ..., num_blocks: _Optional[int] = ..., health_url: _Optional[str] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("num_running", "num_waiting", "num_free_blocks", "num_blocks")
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    def __init__(self, num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class BlockEvent(_message.Message):
    __slots__ = ("stored", "hashes")
    STORED_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, stored: _Optional[bool] = ..., hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("resident", "session_key")
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    resident: bool
    session_key: str
    def __init__(self, resident: _Optional[bool] = ..., session_key: _Optional[str] = ...) -> None: ...

class FullState(_message.Message):
    __slots__ = ("hashes", "sessions", "load")
    HASHES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    hashes: _containers.RepeatedScalarFieldContainer[int]
    sessions: _containers.RepeatedScalarFieldContainer[str]
    load: LoadReport
    def __init__(self, hashes: _Optional[_Iterable[int]] = ..., sessions: _Optional[_Iterable[str]] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ...) -> None: ...

class Deregister(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("seq", "register", "blocks", "session", "load", "full_state", "deregister")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    FULL_STATE_FIELD_NUMBER: _ClassVar[int]
    DEREGISTER_FIELD_NUMBER: _ClassVar[int]
    seq: int
    register: WorkerInfo
    blocks: BlockEvent
    session: SessionEvent
    load: LoadReport
    full_state: FullState
    deregister: Deregister
    def __init__(self, seq: _Optional[int] = ..., register: _Optional[_Union[WorkerInfo, _Mapping]] = ..., blocks: _Optional[_Union[BlockEvent, _Mapping]] = ..., session: _Optional[_Union[SessionEvent, _Mapping]] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ..., full_state: _Optional[_Union[FullState, _Mapping]] = ..., deregister: _Optional[_Union[Deregister, _Mapping]] = ...) -> None: ...

class Resync(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class RouterMessage(_message.Message):
    __slots__ = ("resync",)
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    resync: Resync
    def __init__(self, resync: _Optional[_Union[Resync, _Mapping]] = ...) -> None: ...
