"""The sidecar's /metrics, scraped as Prometheus does and parsed with Prometheus's own Python
text-format parser: exact counter deltas after known traffic through this client."""
from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coresdk.errors import FlagNotFound, ProblemError

from conftest import Sidecar, client_for, sign, stripe_event


@pytest.fixture
def with_ops(tmp_path: Path) -> Iterator[tuple[Sidecar, str]]:
    """A sidecar with its ops listener on an ephemeral port, and that listener's address."""
    process = Sidecar(tmp_path, {"CORESDK_OPS_LISTEN": "127.0.0.1:0"})
    process.start()
    assert process.process is not None and process.process.stdout is not None
    line = process.process.stdout.readline()
    assert line.startswith("coresdk ops listening on "), line
    yield process, line.removeprefix("coresdk ops listening on ").strip()
    process.stop()


def get(addr: str, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


Samples = dict[tuple[str, frozenset], float]


def scrape(addr: str) -> Samples:
    status, content_type, text = get(addr, "/metrics")
    assert status == 200, text
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def test_probes_answer(with_ops):
    _, ops = with_ops
    assert get(ops, "/livez")[0] == 200
    assert get(ops, "/readyz")[0] == 200


def test_metrics_count_known_traffic_exactly(with_ops):
    process, ops = with_ops
    client = client_for(process)
    try:
        before = scrape(ops)
        body = stripe_event("invoice.paid", "cus_acme_001", event_id="evt_py_metrics_1")
        assert client.handle_stripe_webhook(body, sign(body)).outcome == "applied"
        assert client.handle_stripe_webhook(body, sign(body)).outcome == "duplicate"
        forged = stripe_event("invoice.paid", "cus_acme_001", event_id="evt_py_metrics_2")
        with pytest.raises(ProblemError) as refused:
            client.handle_stripe_webhook(forged, sign(forged, secret="whsec_not_the_secret"))
        assert client.authorize(tenant_id="acme-corp").allowed
        denied = client.authorize(tenant_id="acme-corp", require=["no_such_feature_anywhere"])
        assert not denied.allowed and denied.problem is not None
        # Not in the local cache: the client asks the sidecar, which answers NOT_FOUND.
        with pytest.raises(FlagNotFound):
            client.get_flag("acme-corp", "no_such_flag")
        after = scrape(ops)
    finally:
        client.close()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # The parser names counter samples `<family>_total`, as Prometheus stores them.
    assert delta("coresdk_webhooks_total", outcome="applied") == 1
    assert delta("coresdk_webhooks_total", outcome="duplicate") == 1
    assert delta("coresdk_webhooks_total", outcome="refused") == 1
    reason = refused.value.problem.reason
    assert reason, refused.value.problem
    assert delta("coresdk_webhook_refusals_total", reason=reason) == 1
    assert delta("coresdk_authorize_decisions_total", decision="allow", reason="none") == 1
    assert delta("coresdk_authorize_decisions_total", decision="deny", reason=denied.problem.reason) == 1
    webhook = {"grpc_service": "coresdk.v1.WebhookService", "grpc_method": "HandleStripeWebhook", "grpc_type": "unary"}
    assert delta("grpc_server_started_total", **webhook) == 3
    assert delta("grpc_server_handled_total", grpc_code="OK", **webhook) == 2
    get_flag = {"grpc_service": "coresdk.v1.FlagService", "grpc_method": "GetFlag", "grpc_type": "unary"}
    assert delta("grpc_server_handled_total", grpc_code="NotFound", **get_flag) == 1
    assert delta("grpc_server_handling_seconds_count", **get_flag) == 1
    assert delta("grpc_server_handling_seconds_bucket", le="+Inf", **get_flag) == 1
    # The client's flag stream is open: one WatchFlags started and not yet handled.
    assert value(after, "coresdk_watch_streams") >= 1
