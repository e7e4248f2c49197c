"""RFC 9457 problems, as the sidecar sends them in gRPC status details."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import status_pb2
from grpc_status import rpc_status

from coresdk.v1 import problem_pb2


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


# The sidecar refused a call unstarted: its connection had all the calls it may run at once.
CONNECTION_BUSY = "TOO_MANY_CALLS_ON_CONNECTION"


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
        """Worth trying again shortly: the sidecar was away or slow, or it refused the call
        before starting it because this connection already had as many calls running as it
        allows (`CORESDK_MAX_CONCURRENT_PER_CONNECTION`), which a moment's wait frees."""
        return self.connection_busy or self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    @property
    def connection_busy(self) -> bool:
        """Refused unstarted for the connection's call limit: the sidecar is up, only busy."""
        return self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.problem.reason == CONNECTION_BUSY


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


def _problem_in(error: grpc.RpcError) -> "Problem | None":
    """The sidecar's problem in the call's `google.rpc.Status` details, if it sent one."""
    if not (hasattr(error, "trailing_metadata") and hasattr(error, "code")):
        return None
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        # The message in the details differs from the call's (grpc-message encodes some
        # characters its own way): the details are still the sidecar's.
        status = next(
            (
                status_pb2.Status.FromString(value)
                for key, value in error.trailing_metadata() or ()
                if key == "grpc-status-details-bin"
            ),
            None,
        )
    for detail in status.details if status is not None else ():
        if detail.Is(problem_pb2.Problem.DESCRIPTOR):
            message = problem_pb2.Problem()
            detail.Unpack(message)
            return Problem.from_proto(message)
    return None


def problem_from_rpc_error(error: grpc.RpcError) -> ProblemError:
    """Turns a failed call into a ProblemError carrying the sidecar's problem."""
    code = error.code() if hasattr(error, "code") else None
    problem = _problem_in(error)
    if problem is not None:
        if problem.reason == "FLAG_NOT_FOUND":
            return FlagNotFound(problem, code)
        return ProblemError(problem, code)
    details = error.details() if hasattr(error, "details") else str(error)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return SidecarUnavailable(unavailable_problem(f"the sidecar did not answer: {details}"), code)
    return ProblemError(
        Problem(type="about:blank", title="Error", status=500, detail=str(details)), code
    )
