import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FlagValue(_message.Message):
    __slots__ = ("bool_value", "string_value", "number_value", "json_value")
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_VALUE_FIELD_NUMBER: _ClassVar[int]
    JSON_VALUE_FIELD_NUMBER: _ClassVar[int]
    bool_value: bool
    string_value: str
    number_value: float
    json_value: _struct_pb2.Value
    def __init__(self, bool_value: _Optional[bool] = ..., string_value: _Optional[str] = ..., number_value: _Optional[float] = ..., json_value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class Flag(_message.Message):
    __slots__ = ("tenant_id", "key", "value", "version", "is_default", "updated_at", "updated_by", "source_event_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_BY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    key: str
    value: FlagValue
    version: int
    is_default: bool
    updated_at: _timestamp_pb2.Timestamp
    updated_by: str
    source_event_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[_Union[FlagValue, _Mapping]] = ..., version: _Optional[int] = ..., is_default: _Optional[bool] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_by: _Optional[str] = ..., source_event_id: _Optional[str] = ...) -> None: ...

class GetFlagRequest(_message.Message):
    __slots__ = ("tenant_id", "key")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    key: str
    def __init__(self, tenant_id: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class GetFlagsRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class GetFlagsResponse(_message.Message):
    __slots__ = ("tenant_id", "flags")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    flags: _containers.RepeatedCompositeFieldContainer[Flag]
    def __init__(self, tenant_id: _Optional[str] = ..., flags: _Optional[_Iterable[_Union[Flag, _Mapping]]] = ...) -> None: ...

class SetFlagRequest(_message.Message):
    __slots__ = ("tenant_id", "key", "value", "actor", "reason")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    key: str
    value: FlagValue
    actor: str
    reason: str
    def __init__(self, tenant_id: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[_Union[FlagValue, _Mapping]] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class WatchFlagsRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class FlagSnapshot(_message.Message):
    __slots__ = ("flags", "version", "defaults")
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    flags: _containers.RepeatedCompositeFieldContainer[Flag]
    version: int
    defaults: _containers.RepeatedCompositeFieldContainer[Flag]
    def __init__(self, flags: _Optional[_Iterable[_Union[Flag, _Mapping]]] = ..., version: _Optional[int] = ..., defaults: _Optional[_Iterable[_Union[Flag, _Mapping]]] = ...) -> None: ...

class WatchFlagsResponse(_message.Message):
    __slots__ = ("snapshot", "change")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    snapshot: FlagSnapshot
    change: Flag
    def __init__(self, snapshot: _Optional[_Union[FlagSnapshot, _Mapping]] = ..., change: _Optional[_Union[Flag, _Mapping]] = ...) -> None: ...

class ExplainFlagRequest(_message.Message):
    __slots__ = ("tenant_id", "key")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    key: str
    def __init__(self, tenant_id: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class FlagEvent(_message.Message):
    __slots__ = ("event_id", "event_type", "created", "audit_seq", "received_at", "actor", "reason")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQ_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    event_type: str
    created: int
    audit_seq: int
    received_at: _timestamp_pb2.Timestamp
    actor: str
    reason: str
    def __init__(self, event_id: _Optional[str] = ..., event_type: _Optional[str] = ..., created: _Optional[int] = ..., audit_seq: _Optional[int] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AdminFlagChange(_message.Message):
    __slots__ = ("actor", "reason", "at", "version", "audit_seq")
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQ_FIELD_NUMBER: _ClassVar[int]
    actor: str
    reason: str
    at: _timestamp_pb2.Timestamp
    version: int
    audit_seq: int
    def __init__(self, actor: _Optional[str] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version: _Optional[int] = ..., audit_seq: _Optional[int] = ...) -> None: ...

class ExplainFlagResponse(_message.Message):
    __slots__ = ("flag", "event", "admin", "rule", "stale_events", "searched_from_seq", "searched_through_seq", "newest_event")
    FLAG_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    STALE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_THROUGH_SEQ_FIELD_NUMBER: _ClassVar[int]
    NEWEST_EVENT_FIELD_NUMBER: _ClassVar[int]
    flag: Flag
    event: FlagEvent
    admin: AdminFlagChange
    rule: str
    stale_events: _containers.RepeatedCompositeFieldContainer[FlagEvent]
    searched_from_seq: int
    searched_through_seq: int
    newest_event: FlagEvent
    def __init__(self, flag: _Optional[_Union[Flag, _Mapping]] = ..., event: _Optional[_Union[FlagEvent, _Mapping]] = ..., admin: _Optional[_Union[AdminFlagChange, _Mapping]] = ..., rule: _Optional[str] = ..., stale_events: _Optional[_Iterable[_Union[FlagEvent, _Mapping]]] = ..., searched_from_seq: _Optional[int] = ..., searched_through_seq: _Optional[int] = ..., newest_event: _Optional[_Union[FlagEvent, _Mapping]] = ...) -> None: ...
