import datetime

from coresdk.v1 import problem_pb2 as _problem_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ALLOW: _ClassVar[Decision]
    DECISION_DENY: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
DECISION_ALLOW: Decision
DECISION_DENY: Decision

class VerifyTokenRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class Claims(_message.Message):
    __slots__ = ("subject", "tenant_id", "roles", "scopes", "issued_at", "expires_at", "issuer", "audience", "claims")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    subject: str
    tenant_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    issuer: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    claims: _struct_pb2.Struct
    def __init__(self, subject: _Optional[str] = ..., tenant_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., scopes: _Optional[_Iterable[str]] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., issuer: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ..., claims: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class AuthorizeRequest(_message.Message):
    __slots__ = ("token", "tenant_id", "required_features", "deny_if", "resource", "include_claims")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    DENY_IF_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CLAIMS_FIELD_NUMBER: _ClassVar[int]
    token: str
    tenant_id: str
    required_features: _containers.RepeatedScalarFieldContainer[str]
    deny_if: _containers.RepeatedScalarFieldContainer[str]
    resource: str
    include_claims: bool
    def __init__(self, token: _Optional[str] = ..., tenant_id: _Optional[str] = ..., required_features: _Optional[_Iterable[str]] = ..., deny_if: _Optional[_Iterable[str]] = ..., resource: _Optional[str] = ..., include_claims: _Optional[bool] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("decision", "problem", "tenant_id", "subject", "fail_mode_applied", "claims")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    FAIL_MODE_APPLIED_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    problem: _problem_pb2.Problem
    tenant_id: str
    subject: str
    fail_mode_applied: bool
    claims: Claims
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., problem: _Optional[_Union[_problem_pb2.Problem, _Mapping]] = ..., tenant_id: _Optional[str] = ..., subject: _Optional[str] = ..., fail_mode_applied: _Optional[bool] = ..., claims: _Optional[_Union[Claims, _Mapping]] = ...) -> None: ...
