"""Fixtures: the real sidecar binary on a free loopback port, and the SDK parametrized over
the in-process mock and that sidecar, so one suite holds both to the same behaviour."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

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
    "CORESDK_OPS_LISTEN": "off",
    # Sidecars are stopped often: no shutdown delay (the Rust suite tests it).
    "CORESDK_SHUTDOWN_DELAY_S": "0",
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


# What each OpenFeature listener's setting names it in its `coresdk <name> listening on ADDR` line.
OPENFEATURE_LISTENERS = {
    "CORESDK_FLAGD_LISTEN": "flagd",
    "CORESDK_FLAGD_SYNC_LISTEN": "flagd-sync",
    "CORESDK_OFREP_LISTEN": "ofrep",
}


@pytest.fixture
def openfeature_sidecar(tmp_path: Path) -> Iterator[Callable[..., tuple[Sidecar, list[str]]]]:
    """A factory: `openfeature_sidecar(*listener_env_vars, restartable=False)` starts a sidecar
    with those OpenFeature listeners and returns it with their addresses, in the order asked,
    read from the lines that follow the main listener's. Each listener gets an ephemeral port
    (no port to race for) unless `restartable`: then a fixed free one, so that a restarted
    sidecar is found where the providers look. The sidecar stops when the test ends."""
    started: list[Sidecar] = []

    def start(*listeners: str, restartable: bool = False) -> tuple[Sidecar, list[str]]:
        wanted = {env: f"127.0.0.1:{free_port() if restartable else 0}" for env in listeners}
        process = Sidecar(tmp_path, wanted)
        started.append(process)
        process.start()
        assert process.process is not None and process.process.stdout is not None
        announced = {}
        for _ in listeners:
            line = process.process.stdout.readline()
            name, _, addr = line.removeprefix("coresdk ").rstrip("\n").partition(" listening on ")
            assert name in OPENFEATURE_LISTENERS.values() and addr, line
            announced[name] = addr
        addrs = [announced[OPENFEATURE_LISTENERS[env]] for env in listeners]
        if restartable:
            assert addrs == list(wanted.values()), addrs
        return process, addrs

    yield start
    for process in started:
        process.stop()


def tenant(tenant_id: str):
    """The evaluation context that names `tenant_id` by the default tenant attribute."""
    from openfeature.evaluation_context import EvaluationContext

    return EvaluationContext(attributes={"tenant_id": tenant_id})


Details = TypeVar("Details")

# Only a hang guard: a change normally reaches a provider in well under a second.
HANG_GUARD_S = 20


def eventually(evaluate: Callable[[], Details], wanted: Callable[[Details], bool]) -> Details:
    """Evaluates until `wanted` holds; fails only when the hang guard runs out."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        details = evaluate()
        if wanted(details):
            return details
        assert time.monotonic() < deadline, f"still {details}"
        time.sleep(0.05)


def webhook(process: Sidecar, event_type: str, customer: str, **fields) -> None:
    """Delivers a signed Stripe event about `customer` to `process` through the SDK."""
    sidecar = client_for(process)
    try:
        body = stripe_event(event_type, customer, **fields)
        sidecar.handle_stripe_webhook(body, sign(body))
    finally:
        sidecar.close()


def pay(process: Sidecar, invoice: str = "in_1") -> None:
    """A paid invoice of `cus_acme_001`: `acme-corp`'s `pro_features` turns on."""
    webhook(process, "invoice.paid", "cus_acme_001", id=invoice)


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
