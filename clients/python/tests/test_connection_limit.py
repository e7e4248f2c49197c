"""A call the sidecar refuses because its connection already runs as many calls as
`CORESDK_MAX_CONCURRENT_PER_CONNECTION` allows was never started: the client retries it within
its deadline instead of failing the app's request."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from coresdk.errors import Problem, ProblemError

from conftest import Sidecar, client_for


def test_a_refusal_for_the_connections_limit_is_retryable_and_other_exhaustion_is_not():
    import grpc

    def refusal(reason: str) -> ProblemError:
        problem = Problem(type="about:blank", title="t", status=429, detail="d", instance="", extensions={"reason": reason})
        return ProblemError(problem, grpc.StatusCode.RESOURCE_EXHAUSTED)

    assert refusal("TOO_MANY_CALLS_ON_CONNECTION").retryable
    assert not refusal("TOO_MANY_STREAMS").retryable


def test_a_call_refused_while_the_connection_is_busy_is_retried_until_served(tmp_path: Path):
    process = Sidecar(tmp_path, {"CORESDK_MAX_CONCURRENT_PER_CONNECTION": "1"})
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
        write.join(10)
        assert not write.is_alive()
        assert client.get_flag("acme-corp", "paywall_active").value is True
    finally:
        client.close()
        process.stop()

