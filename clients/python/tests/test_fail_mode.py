"""What the client does while the sidecar is away, against the real binary stopped and started
again on the same address."""
from __future__ import annotations

import time

import grpc
import pytest

from conftest import Sidecar, client_for, sign, stripe_event, token
from coresdk import SidecarUnavailable


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        time.sleep(0.05)


def test_fail_open_serves_last_known_values_and_spools_audit(tmp_path):
    process = Sidecar(tmp_path)
    process.start()
    client = client_for(process, fail_mode="open", timeout_ms=300)
    body = stripe_event("invoice.paid", "cus_acme_001")
    client.handle_stripe_webhook(body, sign(body))
    assert client.is_enabled("acme-corp", "pro_features")

    process.stop()
    wait_until(lambda: not client.cache.connected)
    assert client.is_enabled("acme-corp", "pro_features"), "last known value"
    assert not client.is_enabled("globex", "pro_features"), "default value"
    decision = client.authorize(token=token("acme-corp"), require=["pro_features"])
    assert decision.allowed and decision.fail_mode_applied
    # Webhooks never fail open: Stripe must retry.
    with pytest.raises(SidecarUnavailable) as caught:
        client.handle_stripe_webhook(body, sign(body))
    assert caught.value.status == 503
    assert client.audit("app.login", outcome="success", actor="user:1", tenant_id="acme-corp") is None
    assert client.spooled == 1

    process.start()
    wait_until(lambda: client.cache.connected)
    wait_until(lambda: client.spooled == 0)
    assert [r.event for r in client.audit_query(event_prefix="app.login")] == ["app.login"]
    assert client.outage.fail_mode_decisions >= 1
    client.close()
    process.stop()


def test_fail_closed_denies_with_503(tmp_path):
    process = Sidecar(tmp_path)
    process.start()
    client = client_for(process, fail_mode="closed", timeout_ms=300)
    process.stop()
    wait_until(lambda: not client.cache.connected)
    decision = client.authorize(token=token("acme-corp"), require=["pro_features"])
    assert not decision.allowed and decision.fail_mode_applied
    assert decision.problem.status == 503
    with pytest.raises(SidecarUnavailable):
        client.is_enabled("acme-corp", "pro_features")
    with pytest.raises(SidecarUnavailable):
        client.audit("app.login", outcome="success", actor="user:1")
    client.close()


def test_changes_reach_the_cache_through_the_watch_stream(sidecar):
    watcher = client_for(sidecar)
    writer = client_for(sidecar)
    writer.set_flag("hooli", "beta_ui", True, actor="ops")
    wait_until(lambda: watcher.is_enabled("hooli", "beta_ui"), timeout=5)
    watcher.close()
    writer.close()


def test_an_outage_is_logged_once_not_per_call(tmp_path, caplog):
    import logging

    process = Sidecar(tmp_path)
    process.start()
    client = client_for(process, fail_mode="open", timeout_ms=200)
    process.stop()
    wait_until(lambda: not client.cache.connected)
    with caplog.at_level(logging.WARNING, logger="coresdk"):
        for _ in range(5):
            client.authorize(token=token("acme-corp"), require=["pro_features"])
            client.audit("app.click", outcome="ok", actor="u")
    unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(unavailable) <= 1, [r.getMessage() for r in unavailable]
    assert client.outage.fail_mode_decisions >= 5
    client.close()


class _ConnectionLost(grpc.RpcError):
    """What grpc raises when the connection drops mid-call: no answer, so no problem."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection reset"

    def trailing_metadata(self):
        return ()


def test_writes_that_are_not_idempotent_are_not_retried_after_a_lost_connection():
    from coresdk import Settings
    from coresdk.client import SidecarClient

    # Nothing listens there; the fake method below never uses the channel.
    client = SidecarClient(Settings(sidecar_addr="127.0.0.1:9", timeout_ms=2000), watch=False)
    calls = []

    def lost(request, timeout, metadata, **_):
        calls.append(request)
        raise _ConnectionLost()

    try:
        # The write may have committed before the connection dropped: one attempt only.
        with pytest.raises(SidecarUnavailable):
            client._call(lost, "append", idempotent=False)
        assert len(calls) == 1
        # A read, or a deduplicated webhook, is tried again within the deadline.
        calls.clear()
        with pytest.raises(SidecarUnavailable):
            client._call(lost, "get")
        assert len(calls) > 1
        # audit() carries an idempotency key, so it is retried like a read, every attempt
        # and then (fail mode open) the spool with the same key.
        calls.clear()

        class LostAudit:
            def Append(self, request, timeout, metadata, **_):
                return lost(request, timeout, metadata)

        client._audit = LostAudit()
        assert client.audit("app.login", outcome="success", actor="user:1") is None
        assert len(calls) > 1 and client.spooled == 1
        keys = {c.idempotency_key for c in calls} | {client._spool[0].idempotency_key}
        assert len(keys) == 1 and len(keys.pop()) == 32
    finally:
        client.close()


def test_an_append_whose_answer_was_lost_is_stored_once(tmp_path):
    process = Sidecar(tmp_path)
    process.start()
    client = client_for(process)
    stub = client._audit
    attempts = []

    class AnswerLostOnce:
        def Append(self, request, **kwargs):
            attempts.append(request.idempotency_key)
            answer = stub.Append(request, **kwargs)
            if len(attempts) == 1:
                raise _ConnectionLost()  # committed, but the caller never hears of it
            return answer

    try:
        client._audit = AnswerLostOnce()
        record = client.audit("app.export", outcome="success", actor="user:1", tenant_id="acme-corp")
        assert record is not None and len(attempts) == 2 and attempts[0] == attempts[1]
        client._audit = stub
        assert [r.seq for r in client.audit_query(event_prefix="app.export")] == [record.seq]
    finally:
        client.close()
        process.stop()


def test_fail_mode_closed_asks_the_sidecar_while_the_flag_stream_is_down(tmp_path):
    process = Sidecar(tmp_path)
    process.start()
    client = client_for(process, fail_mode="closed")
    try:
        body = stripe_event("invoice.paid", "cus_acme_001")
        client.handle_stripe_webhook(body, sign(body))
        # The stream is reconnecting (its backoff can reach seconds) while calls succeed: the
        # cache may not answer under fail mode closed, the sidecar does.
        client.cache.connected = False
        assert client.get_flag("acme-corp", "pro_features").value is True
        assert client.is_enabled("acme-corp", "pro_features")
    finally:
        client.close()
        process.stop()


def test_the_flag_stream_survives_a_failure_handling_a_message(tmp_path):
    process = Sidecar(tmp_path)
    process.start()
    client = client_for(process)
    try:
        wait_until(lambda: client.cache.connected)
        failed = []
        apply = client.cache.apply

        def fails_once(change):
            if not failed:
                failed.append(change.key)
                raise RuntimeError("a bug in handling a change")
            apply(change)

        client.cache.apply = fails_once
        body = stripe_event("invoice.paid", "cus_acme_001")
        client.handle_stripe_webhook(body, sign(body))
        wait_until(lambda: failed)
        # The loop reconnects, and its snapshot brings what the failure lost.
        wait_until(lambda: client.cache.connected and (flag := client.cache.get("acme-corp", "pro_features")) is not None and flag.value is True)
        assert client._watcher.is_alive()
    finally:
        client.close()
        process.stop()


def test_a_call_after_an_outage_does_not_wait_for_the_spool_to_be_sent():
    import threading

    from coresdk import Settings
    from coresdk.client import SidecarClient
    from coresdk.v1 import audit_pb2

    client = SidecarClient(Settings(sidecar_addr="127.0.0.1:9", timeout_ms=2000), watch=False)
    release, sending, sent = threading.Event(), threading.Event(), []

    class SlowAudit:
        def Append(self, request, timeout, metadata):
            sending.set()
            release.wait(30)
            sent.append(request)

    try:
        client._audit = SlowAudit()
        client._spool.append(audit_pb2.AppendAuditRequest(event="app.spooled", outcome="x", actor="y"))
        client.outage.failed("a test outage")
        # The first call that succeeds after the outage returns at once; the spool is sent
        # by a thread of its own.
        assert client._call(lambda request, timeout, metadata, **_: "answer", None) == "answer"
        assert sending.wait(10) and client.spooled == 1
        release.set()
        wait_until(lambda: client.spooled == 0)
        assert [r.event for r in sent] == ["app.spooled"]
    finally:
        release.set()
        client.close()


def test_the_client_reaches_a_tls_sidecar_and_a_mutual_tls_one(tmp_path):
    import subprocess
    import sys
    from dataclasses import replace
    from pathlib import Path

    from coresdk import Settings
    from coresdk.client import SidecarClient

    certs = tmp_path / "certs"
    certs.mkdir()
    mint = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "mint_certs.py"
    subprocess.run([sys.executable, str(mint), str(certs)], check=True)
    server = {"CORESDK_TLS_CERT_FILE": str(certs / "server.pem"), "CORESDK_TLS_KEY_FILE": str(certs / "server.key")}
    client_env = {
        "CORESDK_SIDECAR_TLS_CA_FILE": str(certs / "ca.pem"),
        "CORESDK_SIDECAR_TLS_CLIENT_CERT_FILE": str(certs / "client.pem"),
        "CORESDK_SIDECAR_TLS_CLIENT_KEY_FILE": str(certs / "client.key"),
    }
    for mutual in (False, True):
        mutual_env = {"CORESDK_TLS_CLIENT_CA_FILE": str(certs / "ca.pem")} if mutual else {}
        process = Sidecar(tmp_path / f"mutual-{mutual}", {**server, **mutual_env})
        process.start()
        try:
            settings = Settings.from_env({**client_env, "CORESDK_SIDECAR_ADDR": process.addr})
            assert settings.uses_tls
            client = client_for(process, **{k: v for k, v in vars(settings).items() if k.startswith("tls_")})
            try:
                assert client.get_flag("acme-corp", "pro_features").is_default
            finally:
                client.close()
            # The server-name override is what the certificate is checked against.
            for server_name, reaches in (("sidecar.coresdk.test", True), ("elsewhere.coresdk.test", False)):
                named = Settings.from_env(
                    {**client_env, "CORESDK_SIDECAR_ADDR": process.addr, "CORESDK_SIDECAR_TLS_SERVER_NAME": server_name}
                )
                client = SidecarClient(replace(named, timeout_ms=500, fail_mode="closed"), watch=False)
                try:
                    if reaches:
                        assert client.get_flag("acme-corp", "pro_features").is_default
                    else:
                        with pytest.raises(SidecarUnavailable):
                            client.get_flag("acme-corp", "pro_features")
                finally:
                    client.close()
            # A plaintext client cannot talk to it.
            plain = SidecarClient(Settings(sidecar_addr=process.addr, timeout_ms=300, fail_mode="closed"), watch=False)
            try:
                with pytest.raises(SidecarUnavailable):
                    plain.get_flag("acme-corp", "pro_features")
            finally:
                plain.close()
        finally:
            process.stop()
    with pytest.raises(ValueError):
        Settings.from_env({"CORESDK_SIDECAR_TLS_CLIENT_CERT_FILE": "client.pem"})


def test_a_spooled_record_the_sidecar_refuses_is_dropped_and_the_rest_is_sent(tmp_path, caplog):
    """A refusal (here: an event in the sidecar's reserved `billing.` namespace) is no outage:
    the record is dropped with an error logged, and the records behind it are stored."""
    from coresdk.v1 import audit_pb2

    process = Sidecar(tmp_path)
    process.start()
    client = client_for(process, fail_mode="open")
    try:
        client._spool.append(audit_pb2.AppendAuditRequest(event="billing.forged", outcome="ok", actor="app", idempotency_key="k1"))
        client._spool.append(audit_pb2.AppendAuditRequest(event="app.after", outcome="ok", actor="app", idempotency_key="k2"))
        client.outage.failed("a test outage")
        with caplog.at_level("ERROR", logger="coresdk"):
            client.audit_verify()  # any answer ends the outage
            wait_until(lambda: client.spooled == 0)
        assert [r.event for r in client.audit_query(event_prefix="app.")] == ["app.after"]
        assert not client.outage.down
        assert any("refused a spooled audit record" in m for m in caplog.messages)
    finally:
        client.close()
        process.stop()
