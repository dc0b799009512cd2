from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class User(_message.Message):
    __slots__ = ("issuer", "subject")
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    subject: str
    def __init__(self, issuer: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class Grant(_message.Message):
    __slots__ = ("level", "acr", "amr", "auth_time", "issued_at", "expires_at", "device", "ip")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    ACR_FIELD_NUMBER: _ClassVar[int]
    AMR_FIELD_NUMBER: _ClassVar[int]
    AUTH_TIME_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    level: str
    acr: str
    amr: _containers.RepeatedScalarFieldContainer[str]
    auth_time: int
    issued_at: int
    expires_at: int
    device: str
    ip: str
    def __init__(self, level: _Optional[str] = ..., acr: _Optional[str] = ..., amr: _Optional[_Iterable[str]] = ..., auth_time: _Optional[int] = ..., issued_at: _Optional[int] = ..., expires_at: _Optional[int] = ..., device: _Optional[str] = ..., ip: _Optional[str] = ...) -> None: ...

class RecordGrantRequest(_message.Message):
    __slots__ = ("user", "session_id", "level", "acr", "amr", "auth_time", "ttl_s", "device", "ip", "proof")
    USER_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    ACR_FIELD_NUMBER: _ClassVar[int]
    AMR_FIELD_NUMBER: _ClassVar[int]
    AUTH_TIME_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    user: User
    session_id: str
    level: str
    acr: str
    amr: _containers.RepeatedScalarFieldContainer[str]
    auth_time: int
    ttl_s: int
    device: str
    ip: str
    proof: str
    def __init__(self, user: _Optional[_Union[User, _Mapping]] = ..., session_id: _Optional[str] = ..., level: _Optional[str] = ..., acr: _Optional[str] = ..., amr: _Optional[_Iterable[str]] = ..., auth_time: _Optional[int] = ..., ttl_s: _Optional[int] = ..., device: _Optional[str] = ..., ip: _Optional[str] = ..., proof: _Optional[str] = ...) -> None: ...

class RecordGrantResponse(_message.Message):
    __slots__ = ("grant_id", "expires_at", "session_key")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    expires_at: int
    session_key: str
    def __init__(self, grant_id: _Optional[str] = ..., expires_at: _Optional[int] = ..., session_key: _Optional[str] = ...) -> None: ...

class RevokeSessionRequest(_message.Message):
    __slots__ = ("user", "session_id", "session_key", "reason")
    USER_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    user: User
    session_id: str
    session_key: str
    reason: str
    def __init__(self, user: _Optional[_Union[User, _Mapping]] = ..., session_id: _Optional[str] = ..., session_key: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeSessionResponse(_message.Message):
    __slots__ = ("known", "session_key")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    known: bool
    session_key: str
    def __init__(self, known: _Optional[bool] = ..., session_key: _Optional[str] = ...) -> None: ...

class RevokeUserRequest(_message.Message):
    __slots__ = ("user", "reason")
    USER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    user: User
    reason: str
    def __init__(self, user: _Optional[_Union[User, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeUserResponse(_message.Message):
    __slots__ = ("sessions", "revoked_before")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    sessions: int
    revoked_before: int
    def __init__(self, sessions: _Optional[int] = ..., revoked_before: _Optional[int] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: User
    def __init__(self, user: _Optional[_Union[User, _Mapping]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_key", "created", "last_seen", "ip", "device", "grants")
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    session_key: str
    created: int
    last_seen: int
    ip: str
    device: str
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    def __init__(self, session_key: _Optional[str] = ..., created: _Optional[int] = ..., last_seen: _Optional[int] = ..., ip: _Optional[str] = ..., device: _Optional[str] = ..., grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ...) -> None: ...
