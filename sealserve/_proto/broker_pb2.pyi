from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetChallengeResponse(_message.Message):
    __slots__ = ("nonce", "ttl_seconds")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    ttl_seconds: int
    def __init__(self, nonce: _Optional[bytes] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class ReleaseKeyRequest(_message.Message):
    __slots__ = ("key_id", "evidence")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    evidence: bytes
    def __init__(self, key_id: _Optional[str] = ..., evidence: _Optional[bytes] = ...) -> None: ...

class ReleaseKeyResponse(_message.Message):
    __slots__ = ("kem_id", "kdf_id", "aead_id", "enc", "ciphertext")
    KEM_ID_FIELD_NUMBER: _ClassVar[int]
    KDF_ID_FIELD_NUMBER: _ClassVar[int]
    AEAD_ID_FIELD_NUMBER: _ClassVar[int]
    ENC_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    kem_id: int
    kdf_id: int
    aead_id: int
    enc: bytes
    ciphertext: bytes
    def __init__(self, kem_id: _Optional[int] = ..., kdf_id: _Optional[int] = ..., aead_id: _Optional[int] = ..., enc: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class AddKeyRequest(_message.Message):
    __slots__ = ("key_id", "key", "generate", "policy_toml", "roots", "unsafe_allow_incomplete_policy")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    POLICY_TOML_FIELD_NUMBER: _ClassVar[int]
    ROOTS_FIELD_NUMBER: _ClassVar[int]
    UNSAFE_ALLOW_INCOMPLETE_POLICY_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    key: bytes
    generate: bool
    policy_toml: str
    roots: _containers.RepeatedScalarFieldContainer[str]
    unsafe_allow_incomplete_policy: bool
    def __init__(self, key_id: _Optional[str] = ..., key: _Optional[bytes] = ..., generate: _Optional[bool] = ..., policy_toml: _Optional[str] = ..., roots: _Optional[_Iterable[str]] = ..., unsafe_allow_incomplete_policy: _Optional[bool] = ...) -> None: ...

class AddKeyResponse(_message.Message):
    __slots__ = ("key_id", "generated_key")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATED_KEY_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    generated_key: bytes
    def __init__(self, key_id: _Optional[str] = ..., generated_key: _Optional[bytes] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("key_id", "policy_toml", "roots", "unsafe_allow_incomplete_policy")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_TOML_FIELD_NUMBER: _ClassVar[int]
    ROOTS_FIELD_NUMBER: _ClassVar[int]
    UNSAFE_ALLOW_INCOMPLETE_POLICY_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    policy_toml: str
    roots: _containers.RepeatedScalarFieldContainer[str]
    unsafe_allow_incomplete_policy: bool
    def __init__(self, key_id: _Optional[str] = ..., policy_toml: _Optional[str] = ..., roots: _Optional[_Iterable[str]] = ..., unsafe_allow_incomplete_policy: _Optional[bool] = ...) -> None: ...

class SetPolicyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("key_id", "policy_toml", "roots", "revoked", "created_at", "updated_at")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_TOML_FIELD_NUMBER: _ClassVar[int]
    ROOTS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    policy_toml: str
    roots: _containers.RepeatedScalarFieldContainer[str]
    revoked: bool
    created_at: float
    updated_at: float
    def __init__(self, key_id: _Optional[str] = ..., policy_toml: _Optional[str] = ..., roots: _Optional[_Iterable[str]] = ..., revoked: _Optional[bool] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeyInfo]
    def __init__(self, keys: _Optional[_Iterable[_Union[KeyInfo, _Mapping]]] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
