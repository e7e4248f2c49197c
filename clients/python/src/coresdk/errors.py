"""RFC 9457 problems, as the sidecar sends them in gRPC status details."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format

from coresdk.v1 import problem_pb2

_DETAILS_KEY = "grpc-status-details-bin"
_PROBLEM_TYPE_URL = "type.googleapis.com/coresdk.v1.Problem"
_ERROR_INFO_TYPE_URL = "type.googleapis.com/google.rpc.ErrorInfo"


@dataclass(frozen=True)
class Problem:
    """An RFC 9457 problem detail; `to_dict()` is the `application/problem+json` body."""

    type: str
    title: str
    status: int
    detail: str = ""
    instance: str = ""
    extensions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status}
        if self.detail:
            body["detail"] = self.detail
        if self.instance:
            body["instance"] = self.instance
        body.update(self.extensions)
        return body

    @property
    def reason(self) -> str:
        return str(self.extensions.get("reason", ""))

    @classmethod
    def from_proto(cls, message: problem_pb2.Problem) -> "Problem":
        extensions = json_format.MessageToDict(message.extensions) if message.HasField("extensions") else {}
        return cls(
            type=message.type,
            title=message.title,
            status=message.status,
            detail=message.detail,
            instance=message.instance,
            extensions=extensions,
        )


class ProblemError(Exception):
    """A call failed; `problem` is what to return to your own HTTP caller, as is."""

    def __init__(self, problem: Problem, code: grpc.StatusCode | None = None):
        super().__init__(f"{problem.status} {problem.title}: {problem.detail}")
        self.problem = problem
        self.code = code

    @property
    def status(self) -> int:
        return self.problem.status

    @property
    def retryable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class FlagNotFound(ProblemError, LookupError):
    """No flag of that key is defined."""


class SidecarUnavailable(ProblemError):
    """The sidecar could not be reached (or did not answer in time)."""


def unavailable_problem(detail: str, type_base: str = "https://coresdk.dev/problems") -> Problem:
    return Problem(
        type=f"{type_base}/sidecar-unavailable",
        title="Service Unavailable",
        status=503,
        detail=detail,
        extensions={"reason": "SIDECAR_UNAVAILABLE"},
    )


def _decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes):
    """Yields (field number, wire type, value) of a protobuf message; enough for google.rpc.Status."""
    pos = 0
    while pos < len(data):
        key, pos = _decode_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _decode_varint(data, pos)
        elif wire == 2:
            length, pos = _decode_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            return
        yield number, wire, value


def problem_from_rpc_error(error: grpc.RpcError) -> ProblemError:
    """Turns a failed call into a ProblemError carrying the sidecar's problem."""
    code = error.code() if hasattr(error, "code") else None
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key != _DETAILS_KEY:
            continue
        # google.rpc.Status: 3 = repeated Any (1 = type_url, 2 = value).
        for number, _, any_bytes in _fields(value):
            if number != 3:
                continue
            parts = {n: v for n, _, v in _fields(any_bytes)}
            if parts.get(1, b"").decode() == _PROBLEM_TYPE_URL:
                problem = Problem.from_proto(problem_pb2.Problem.FromString(parts.get(2, b"")))
                if problem.reason == "FLAG_NOT_FOUND":
                    return FlagNotFound(problem, code)
                return ProblemError(problem, code)
    details = error.details() if hasattr(error, "details") else str(error)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return SidecarUnavailable(unavailable_problem(f"the sidecar did not answer: {details}"), code)
    return ProblemError(
        Problem(type="about:blank", title="Error", status=500, detail=str(details)), code
    )
