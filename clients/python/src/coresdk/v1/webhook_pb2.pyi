from coresdk.v1 import audit_pb2 as _audit_pb2
from coresdk.v1 import flags_pb2 as _flags_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WebhookOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEBHOOK_OUTCOME_UNSPECIFIED: _ClassVar[WebhookOutcome]
    WEBHOOK_OUTCOME_APPLIED: _ClassVar[WebhookOutcome]
    WEBHOOK_OUTCOME_DUPLICATE: _ClassVar[WebhookOutcome]
    WEBHOOK_OUTCOME_STALE: _ClassVar[WebhookOutcome]
    WEBHOOK_OUTCOME_IGNORED: _ClassVar[WebhookOutcome]
WEBHOOK_OUTCOME_UNSPECIFIED: WebhookOutcome
WEBHOOK_OUTCOME_APPLIED: WebhookOutcome
WEBHOOK_OUTCOME_DUPLICATE: WebhookOutcome
WEBHOOK_OUTCOME_STALE: WebhookOutcome
WEBHOOK_OUTCOME_IGNORED: WebhookOutcome

class ReplayStripeEventRequest(_message.Message):
    __slots__ = ("payload", "reason")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reason: str
    def __init__(self, payload: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...

class HandleStripeWebhookRequest(_message.Message):
    __slots__ = ("payload", "signature_header", "include_proof")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_HEADER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROOF_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    signature_header: str
    include_proof: bool
    def __init__(self, payload: _Optional[bytes] = ..., signature_header: _Optional[str] = ..., include_proof: _Optional[bool] = ...) -> None: ...

class FlagChange(_message.Message):
    __slots__ = ("key", "old_value", "new_value", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OLD_VALUE_FIELD_NUMBER: _ClassVar[int]
    NEW_VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: str
    old_value: _flags_pb2.FlagValue
    new_value: _flags_pb2.FlagValue
    version: int
    def __init__(self, key: _Optional[str] = ..., old_value: _Optional[_Union[_flags_pb2.FlagValue, _Mapping]] = ..., new_value: _Optional[_Union[_flags_pb2.FlagValue, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class HandleStripeWebhookResponse(_message.Message):
    __slots__ = ("event_id", "event_type", "tenant_id", "outcome", "flag_changes", "audit_seq", "stale_flags", "inclusion_proof")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    FLAG_CHANGES_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQ_FIELD_NUMBER: _ClassVar[int]
    STALE_FLAGS_FIELD_NUMBER: _ClassVar[int]
    INCLUSION_PROOF_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    event_type: str
    tenant_id: str
    outcome: WebhookOutcome
    flag_changes: _containers.RepeatedCompositeFieldContainer[FlagChange]
    audit_seq: int
    stale_flags: _containers.RepeatedScalarFieldContainer[str]
    inclusion_proof: _audit_pb2.InclusionProof
    def __init__(self, event_id: _Optional[str] = ..., event_type: _Optional[str] = ..., tenant_id: _Optional[str] = ..., outcome: _Optional[_Union[WebhookOutcome, str]] = ..., flag_changes: _Optional[_Iterable[_Union[FlagChange, _Mapping]]] = ..., audit_seq: _Optional[int] = ..., stale_flags: _Optional[_Iterable[str]] = ..., inclusion_proof: _Optional[_Union[_audit_pb2.InclusionProof, _Mapping]] = ...) -> None: ...
