"""Fixtures: the real sidecar binary on a free loopback port, and the SDK parametrized over
the in-process mock and that sidecar, so one suite holds both to the same behaviour."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from coresdk import Settings
from coresdk.client import SidecarClient
from coresdk.mock import MockSidecar

ROOT = Path(__file__).resolve().parents[3]
STRIPE_SECRET = "whsec_test_secret"
JWT_SECRET = "python-suite-jwt-secret-at-least-32-bytes"
ADMIN_TOKEN = "python-suite-admin-token-0123456789"
ENV = {
    "STRIPE_WEBHOOK_SECRET": STRIPE_SECRET,
    "CORESDK_JWT_SECRET": JWT_SECRET,
    "CORESDK_ADMIN_TOKEN": ADMIN_TOKEN,
    "CORESDK_PROBLEM_TYPE_BASE": "https://securepay.example/errors",
    "CORESDK_BILLING_URL": "https://securepay.example/billing",
    "CORESDK_UPGRADE_URL": "https://securepay.example/pricing",
    # Tests that want an OpenFeature listener give it a free port of their own.
    "CORESDK_FLAGD_LISTEN": "off",
    "CORESDK_FLAGD_SYNC_LISTEN": "off",
    "CORESDK_OFREP_LISTEN": "off",
}


def binary() -> Path:
    path = Path(os.environ.get("CORESDK_BIN", ROOT / "target" / "debug" / "coresdk"))
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo build` (./scripts/test does) before the Python tests")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sidecar:
    """The real binary on a fixed port, so it can be stopped and started again at one address."""

    def __init__(self, tmp: Path, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.store = f"sqlite://{tmp / 'coresdk.db'}"
        self.env = {**ENV, **(extra_env or {}), "PATH": os.environ.get("PATH", ""), "CORESDK_LOG": "error"}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(binary()), "serve", "--listen", self.addr, "--store", self.store,
             "--tenants-file", str(ROOT / "examples" / "tenants.json")],
            env=self.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("coresdk listening on"), line

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=15)
            self.process = None


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Sidecar]:
    process = Sidecar(tmp_path)
    process.start()
    yield process
    process.stop()


def client_for(sidecar: Sidecar, **overrides) -> SidecarClient:
    settings = Settings(sidecar_addr=sidecar.addr, admin_token=ADMIN_TOKEN, problem_type_base=ENV["CORESDK_PROBLEM_TYPE_BASE"], **overrides)
    client = SidecarClient(settings)
    assert client.cache.warm.wait(5), "the flag cache never warmed"
    return client


@pytest.fixture(params=["mock", "sidecar"])
def sdk(request, tmp_path: Path):
    if request.param == "mock":
        yield MockSidecar(Settings(use_mock=True), env=ENV)
        return
    process = Sidecar(tmp_path)
    process.start()
    client = client_for(process)
    yield client
    client.close()
    process.stop()


def stripe_event(event_type: str, customer: str | None, *, created: int | None = None, event_id: str | None = None, **fields) -> bytes:
    obj = dict(fields)
    if customer is not None:
        obj["customer"] = customer
    return json.dumps(
        {
            "id": event_id or f"evt_{time.time_ns()}",
            "object": "event",
            "type": event_type,
            "created": created if created is not None else int(time.time()),
            "data": {"object": obj},
        }
    ).encode()


def sign(body: bytes, secret: str = STRIPE_SECRET) -> str:
    import stripe

    return stripe.WebhookSignature.generate_signature_header(body.decode(), secret)


def token(tenant: str, **claims) -> str:
    import jwt

    body = {"sub": f"user@{tenant}", "tenant_id": tenant, "exp": int(time.time()) + 600, **claims}
    return jwt.encode(body, JWT_SECRET, algorithm="HS256")
