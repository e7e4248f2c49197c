"""OpenTelemetry traces from the real sidecar, received by an OTLP/gRPC collector of the test's
own (the OpenTelemetry project's published trace service definitions, not the sidecar's code):
the caller's trace continues, the calls' child spans hang where they should, and the problem a
user sees names the trace to look up."""
from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from coresdk.errors import problem_from_rpc_error
from coresdk.v1 import auth_pb2, auth_pb2_grpc, webhook_pb2, webhook_pb2_grpc

from conftest import Sidecar, free_port, sign, stripe_event

PARENT_SPAN_ID = "00f067aa0ba902b7"
SERVER = trace_pb2.Span.SpanKind.SPAN_KIND_SERVER
UNAUTHENTICATED = 16


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it, with its resource's attributes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[dict, trace_pb2.Span]] = []

    def Export(self, request, context):  # noqa: N802 (the service's method name)
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((resource, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[trace_pb2.Span]:
        with self.lock:
            return [span for _, span in self.spans if span.trace_id.hex() == trace_id]


def attributes(pairs) -> dict:
    found = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        found[pair.key] = getattr(pair.value, kind) if kind else None
    return found


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    received = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield received, port
    server.stop(grace=None)


def traced_sidecar(tmp_path: Path, port: int, **extra: str) -> Sidecar:
    process = Sidecar(tmp_path, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **extra,
    })
    process.start()
    return process


def traceparent(trace_id: str) -> list[tuple[str, str]]:
    return [("traceparent", f"00-{trace_id}-{PARENT_SPAN_ID}-01"), ("tracestate", "vendor=kept")]


def new_trace_id() -> str:
    import secrets

    return secrets.token_hex(16)


def trace_in(instance: str) -> tuple[str, str]:
    """The trace and span ids of a `urn:coresdk:trace:<trace>:<span>` instance."""
    prefix = "urn:coresdk:trace:"
    assert instance.startswith(prefix), instance
    trace_id, span_id = instance.removeprefix(prefix).split(":")
    return trace_id, span_id


def named(spans: list[trace_pb2.Span], name: str) -> trace_pb2.Span:
    matches = [span for span in spans if span.name == name]
    assert len(matches) == 1, (name, [span.name for span in spans])
    return matches[0]


def test_a_refused_call_continues_the_callers_trace_and_its_problem_names_it(tmp_path, collector):
    received, port = collector
    process = traced_sidecar(tmp_path, port)
    trace_id = new_trace_id()
    try:
        with grpc.insecure_channel(process.addr) as channel:
            body = stripe_event("invoice.paid", "cus_acme_001")
            forged = webhook_pb2.HandleStripeWebhookRequest(payload=body, signature_header=sign(body, "whsec_forged"))
            with pytest.raises(grpc.RpcError) as refused:
                webhook_pb2_grpc.WebhookServiceStub(channel).HandleStripeWebhook(
                    forged, metadata=traceparent(trace_id), timeout=10)
    finally:
        # The stop flushes what is queued: everything the call made has been exported after it.
        process.stop()
    problem = problem_from_rpc_error(refused.value).problem
    assert problem.reason == "SIGNATURE_MISMATCH"
    instance_trace, instance_span = trace_in(problem.instance)
    assert instance_trace == trace_id

    spans = received.of_trace(trace_id)
    server = named(spans, "coresdk.v1.WebhookService/HandleStripeWebhook")
    assert server.kind == SERVER
    assert server.parent_span_id.hex() == PARENT_SPAN_ID
    assert server.span_id.hex() == instance_span
    assert server.trace_state == "vendor=kept"
    rpc = {k: v for k, v in attributes(server.attributes).items() if k.startswith("rpc.")}
    assert rpc == {
        "rpc.system": "grpc",
        "rpc.service": "coresdk.v1.WebhookService",
        "rpc.method": "HandleStripeWebhook",
        "rpc.grpc.status_code": UNAUTHENTICATED,
    }
    # A caller's mistake is not the server's error.
    assert server.status.code != trace_pb2.Status.StatusCode.STATUS_CODE_ERROR

    verify = named(spans, "webhook.verify")
    assert verify.parent_span_id == server.span_id
    assert verify.status.code == trace_pb2.Status.StatusCode.STATUS_CODE_ERROR
    assert attributes(verify.attributes)["error.type"] == "SIGNATURE_MISMATCH"
    # Refused before the rules: they never ran.
    assert not [span for span in spans if span.name == "rules.apply"]

    resources = {resource.get("service.name") for resource, _ in received.spans}
    assert resources == {"coresdk"}


def test_an_applied_webhook_traces_its_verification_write_commit_and_rules(tmp_path, collector):
    received, port = collector
    process = traced_sidecar(tmp_path, port, OTEL_SERVICE_NAME="billing-sidecar")
    trace_id = new_trace_id()
    try:
        with grpc.insecure_channel(process.addr) as channel:
            body = stripe_event("invoice.paid", "cus_acme_001")
            answer = webhook_pb2_grpc.WebhookServiceStub(channel).HandleStripeWebhook(
                webhook_pb2.HandleStripeWebhookRequest(payload=body, signature_header=sign(body)),
                metadata=traceparent(trace_id), timeout=10)
            assert answer.tenant_id == "acme-corp"
    finally:
        process.stop()

    spans = received.of_trace(trace_id)
    server = named(spans, "coresdk.v1.WebhookService/HandleStripeWebhook")
    assert server.parent_span_id.hex() == PARENT_SPAN_ID
    assert attributes(server.attributes)["rpc.grpc.status_code"] == 0
    verify = named(spans, "webhook.verify")
    write = named(spans, "store.write")
    commit = named(spans, "store.commit")
    rules = named(spans, "rules.apply")
    assert verify.parent_span_id == server.span_id
    assert verify.status.code != trace_pb2.Status.StatusCode.STATUS_CODE_ERROR
    assert write.parent_span_id == server.span_id
    # A lone write's batch commits in its trace; the rules run inside its write.
    assert commit.parent_span_id == write.span_id
    assert attributes(commit.attributes)["store.jobs"] == 1
    assert rules.parent_span_id == write.span_id
    assert attributes(rules.attributes)["stripe.event_type"] == "invoice.paid"
    # Nested in time, as in the tree.
    assert server.start_time_unix_nano <= write.start_time_unix_nano <= commit.start_time_unix_nano
    assert commit.end_time_unix_nano <= write.end_time_unix_nano <= server.end_time_unix_nano
    assert {resource.get("service.name") for resource, _ in received.spans} == {"billing-sidecar"}


def test_a_denial_keeps_its_resource_and_names_the_trace_beside_it(tmp_path, collector):
    received, port = collector
    process = traced_sidecar(tmp_path, port)
    trace_id = new_trace_id()
    try:
        with grpc.insecure_channel(process.addr) as channel:
            answer = auth_pb2_grpc.AuthServiceStub(channel).Authorize(
                auth_pb2.AuthorizeRequest(tenant_id="acme-corp", required_features=["pro_features"],
                                          resource="GET /api/reports"),
                metadata=traceparent(trace_id), timeout=10)
    finally:
        process.stop()
    assert answer.problem.instance == "GET /api/reports"
    trace = answer.problem.extensions.fields["trace"].string_value
    assert trace_in(trace)[0] == trace_id
    server = named(received.of_trace(trace_id), "coresdk.v1.AuthService/Authorize")
    assert server.span_id.hex() == trace_in(trace)[1]


def test_a_collector_that_is_down_never_holds_a_call(tmp_path):
    process = traced_sidecar(tmp_path, free_port(), OTEL_EXPORTER_OTLP_TIMEOUT="30000")
    try:
        with grpc.insecure_channel(process.addr) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            for _ in range(50):
                answer = stub.Authorize(
                    auth_pb2.AuthorizeRequest(tenant_id="acme-corp", required_features=["pro_features"]),
                    metadata=traceparent(new_trace_id()), timeout=5)
                assert answer.problem.instance.startswith("urn:coresdk:trace:")
    finally:
        # Bounded by the stop's own flush timeout; Sidecar.stop fails past 15 s.
        process.stop()


@pytest.mark.parametrize("env", [{}, {"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}])
def test_without_an_endpoint_or_when_disabled_nothing_is_exported(tmp_path, collector, env):
    received, port = collector
    extra = dict(env)
    if env:
        # Pointed at the collector, and told not to use it.
        extra["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
    process = Sidecar(tmp_path, extra)
    process.start()
    trace_id = new_trace_id()
    try:
        with grpc.insecure_channel(process.addr) as channel:
            answer = auth_pb2_grpc.AuthServiceStub(channel).Authorize(
                auth_pb2.AuthorizeRequest(tenant_id="acme-corp", required_features=["pro_features"]),
                metadata=traceparent(trace_id), timeout=10)
    finally:
        process.stop()
    assert answer.problem.instance == ""
    assert "trace" not in answer.problem.extensions.fields
    assert received.spans == []


def test_an_ofrep_request_is_traced_by_its_route(tmp_path, collector):
    import json
    import urllib.request

    received, port = collector
    process = Sidecar(tmp_path, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "CORESDK_OFREP_LISTEN": "127.0.0.1:0",
    })
    process.start()
    trace_id = new_trace_id()
    try:
        assert process.process is not None and process.process.stdout is not None
        line = process.process.stdout.readline()
        assert line.startswith("coresdk ofrep listening on "), line
        ofrep = line.removeprefix("coresdk ofrep listening on ").strip()
        request = urllib.request.Request(
            f"http://{ofrep}/ofrep/v1/evaluate/flags/pro_features",
            data=json.dumps({"context": {"targetingKey": "u1", "tenant_id": "acme-corp"}}).encode(),
            headers={"Content-Type": "application/json", **dict(traceparent(trace_id))},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
    finally:
        process.stop()
    server = named(received.of_trace(trace_id), "POST /ofrep/v1/evaluate/flags/{key}")
    assert server.kind == SERVER
    assert server.parent_span_id.hex() == PARENT_SPAN_ID
    found = attributes(server.attributes)
    assert found["http.route"] == "/ofrep/v1/evaluate/flags/{key}"
    assert found["http.response.status_code"] == 200
