from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CustomerMapping(_message.Message):
    __slots__ = ("customer_id", "tenant_id", "parked_events_applied")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PARKED_EVENTS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    tenant_id: str
    parked_events_applied: int
    def __init__(self, customer_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., parked_events_applied: _Optional[int] = ...) -> None: ...

class MapCustomerRequest(_message.Message):
    __slots__ = ("customer_id", "tenant_id", "actor", "reason")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    tenant_id: str
    actor: str
    reason: str
    def __init__(self, customer_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UnmapCustomerRequest(_message.Message):
    __slots__ = ("customer_id", "actor", "reason")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    actor: str
    reason: str
    def __init__(self, customer_id: _Optional[str] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UnmapCustomerResponse(_message.Message):
    __slots__ = ("removed", "previous_tenant_id")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    previous_tenant_id: str
    def __init__(self, removed: _Optional[bool] = ..., previous_tenant_id: _Optional[str] = ...) -> None: ...

class ResolveCustomerRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...
