"""A call the sidecar refuses because its connection already runs as many calls as
`CORESDK_MAX_CONCURRENT_PER_CONNECTION` allows was never started: the client retries it within
its deadline instead of failing the app's request."""
from __future__ import annotations

import sqlite3
import threading
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from coresdk.errors import Problem, ProblemError

from conftest import Sidecar, client_for, free_port


def refused_explains(ops_addr: str) -> float:
    """ExplainFlag calls the sidecar refused for the connection's limit, from its metrics."""
    with urllib.request.urlopen(f"http://{ops_addr}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
        and sample.labels.get("grpc_method") == "ExplainFlag"
        and sample.labels.get("grpc_code") == "ResourceExhausted"
    )


def test_a_refusal_for_the_connections_limit_is_retryable_and_other_exhaustion_is_not():
    import grpc

    def refusal(reason: str) -> ProblemError:
        problem = Problem(type="about:blank", title="t", status=429, detail="d", instance="", extensions={"reason": reason})
        return ProblemError(problem, grpc.StatusCode.RESOURCE_EXHAUSTED)

    assert refusal("TOO_MANY_CALLS_ON_CONNECTION").retryable
    assert not refusal("TOO_MANY_STREAMS").retryable


def test_a_call_refused_while_the_connection_is_busy_is_retried_until_served(tmp_path: Path):
    ops_addr = f"127.0.0.1:{free_port()}"
    process = Sidecar(tmp_path, {"CORESDK_MAX_CONCURRENT_PER_CONNECTION": "1", "CORESDK_OPS_LISTEN": ops_addr})
    process.start()
    client = client_for(process, timeout_ms=10_000)
    try:
        # The write lock makes the client's SetFlag wait in the sidecar, holding the
        # connection's one place until the lock is released.
        lock = sqlite3.connect(str(tmp_path / "coresdk.db"), isolation_level=None, timeout=5, check_same_thread=False)
        lock.execute("BEGIN IMMEDIATE")
        write = threading.Thread(
            target=client.set_flag, args=("acme-corp", "paywall_active", True), kwargs={"actor": "ops"}, daemon=True
        )
        write.start()
        write.join(0.5)
        assert write.is_alive(), "the SetFlag waits for the write lock"
        threading.Timer(0.5, lock.rollback).start()
        # Refused at first (the connection is busy), retried, served once the write answered.
        explained = client.explain_flag("acme-corp", "pro_features")
        assert explained.flag.key == "pro_features"
        assert refused_explains(ops_addr) >= 1, "the call was refused at least once, then retried"
        write.join(10)
        assert not write.is_alive()
        assert client.get_flag("acme-corp", "paywall_active").value is True
    finally:
        client.close()
        process.stop()

