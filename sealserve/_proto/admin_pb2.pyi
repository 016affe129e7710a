from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AccountRequest(_message.Message):
    __slots__ = ("account", "tier", "model")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    account: str
    tier: str
    model: str
    def __init__(self, account: _Optional[str] = ..., tier: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("name", "limit", "remaining", "reset_after")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_AFTER_FIELD_NUMBER: _ClassVar[int]
    name: str
    limit: int
    remaining: int
    reset_after: float
    def __init__(self, name: _Optional[str] = ..., limit: _Optional[int] = ..., remaining: _Optional[int] = ..., reset_after: _Optional[float] = ...) -> None: ...

class AccountInfo(_message.Message):
    __slots__ = ("account", "status_json", "usage", "history_json")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_JSON_FIELD_NUMBER: _ClassVar[int]
    account: str
    status_json: str
    usage: _containers.RepeatedCompositeFieldContainer[Usage]
    history_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, account: _Optional[str] = ..., status_json: _Optional[str] = ..., usage: _Optional[_Iterable[_Union[Usage, _Mapping]]] = ..., history_json: _Optional[_Iterable[str]] = ...) -> None: ...

class SetStatusRequest(_message.Message):
    __slots__ = ("account", "status", "factor", "difficulty", "ttl_seconds", "reason", "tier")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    DIFFICULTY_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    account: str
    status: str
    factor: float
    difficulty: int
    ttl_seconds: float
    reason: str
    tier: str
    def __init__(self, account: _Optional[str] = ..., status: _Optional[str] = ..., factor: _Optional[float] = ..., difficulty: _Optional[int] = ..., ttl_seconds: _Optional[float] = ..., reason: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class ForgiveRequest(_message.Message):
    __slots__ = ("account", "reason", "tier")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    account: str
    reason: str
    tier: str
    def __init__(self, account: _Optional[str] = ..., reason: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...
