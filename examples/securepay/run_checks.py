"""The SecurePay walkthrough's 12 checks, run against the app in `app.py`.

    CORESDK_USE_MOCK=true python run_checks.py     # the in-process mock
    python run_checks.py                           # a sidecar at CORESDK_SIDECAR_ADDR

Against a real sidecar, it must know the tenants cus_acme_001 → acme-corp, cus_globex_001 →
globex, cus_initech_001 → initech (mock mode, or examples/tenants.json), and share
STRIPE_WEBHOOK_SECRET and CORESDK_JWT_SECRET with this script. Test events are signed with
Stripe's own library; every run uses fresh event ids and sets up the state it checks, so it
passes run after run against the same durable sidecar. Needs the packages in
requirements.txt and the client (`pip install '../../clients/python[fastapi]'`). Exit status 0
only when all 12 pass.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import jwt
import stripe
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app import create_app  # noqa: E402

from coresdk import SDK  # noqa: E402

SECRET = os.environ.setdefault("STRIPE_WEBHOOK_SECRET", "whsec_test_secret")
JWT_SECRET = os.environ.setdefault("CORESDK_JWT_SECRET", "securepay-demo-jwt-secret-32-bytes-min")
# Event ids sort in the order this script sends them, this run's after an earlier run's: the
# sidecar orders events of the same second (and tie rank) by id (README: the tie rule), and
# these checks send several per second.
RUN = f"{time.time_ns():016x}"
SENT = itertools.count()


def token(tenant: str) -> str:
    claims = {"sub": f"user@{tenant}", "tenant_id": tenant, "exp": int(time.time()) + 600}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def event(event_type: str, customer: str, *, seconds_ago: int = 0, **object_fields) -> str:
    return json.dumps(
        {
            "id": f"evt_{RUN}_{next(SENT):04d}",
            "object": "event",
            "type": event_type,
            "created": int(time.time()) - seconds_ago,
            "data": {"object": {"customer": customer, **object_fields}},
        }
    )


def main() -> int:
    sdk = SDK.from_env()
    client = TestClient(create_app(sdk))
    results: list[bool] = []

    def check(label: str, ok: bool) -> None:
        results.append(bool(ok))
        print(f"  [{'PASS' if ok else 'FAIL'}] {label}")

    def post(body: str, signature: str | None):
        headers = {"content-type": "application/json"}
        if signature is not None:
            headers["stripe-signature"] = signature
        return client.post("/webhooks/stripe", content=body.encode(), headers=headers)

    def signed(body: str) -> str:
        return stripe.WebhookSignature.generate_signature_header(body, SECRET)

    def audited(tenant: str, event_name: str) -> bool:
        return any(r.event == event_name and r.tenant_id == tenant for r in sdk.audit_query(tenant_id=tenant, event_prefix=event_name))

    mode = "mock" if sdk.settings.use_mock else f"sidecar at {sdk.settings.sidecar_addr}"
    print(f"SecurePay Webhook Processor — Test Suite ({mode})")
    print("==========================================")

    print("▸ Webhook Validation")
    body = event("invoice.paid", "cus_acme_001", id=f"in_{RUN}")
    check("Valid Stripe signature accepted", post(body, signed(body)).status_code == 200)
    forged = stripe.WebhookSignature.generate_signature_header(body, "whsec_forged")
    check("Invalid signature → 400 (replay/forgery blocked)", post(body, forged).status_code == 400)
    missing = post(body, None)
    check("Missing signature header → 400", missing.status_code == 400 and missing.headers["content-type"].startswith("application/problem+json"))

    print("▸ invoice.paid — Feature Flag Activation")
    body = event("invoice.paid", "cus_acme_001", id=f"in_{RUN}_2")
    answer = post(body, signed(body)).json()
    check("invoice.paid enables pro_features for acme-corp", answer.get("tenant_id") == "acme-corp" and answer.get("outcome") == "applied")
    check("pro_features flag is ON after payment", sdk.is_enabled("acme-corp", "pro_features"))
    check("Audit event recorded: billing.invoice.paid", audited("acme-corp", "billing.invoice.paid"))

    print("▸ payment.failed — Paywall Enforcement")
    body = event("invoice.paid", "cus_globex_001")
    post(body, signed(body))  # globex was paying before its payment failed
    body = event("payment.failed", "cus_globex_001")
    answer = post(body, signed(body)).json()
    turned_off = {"key": "pro_features", "value": False} in answer.get("flag_changes", [])
    check("payment.failed disables pro_features for globex", answer.get("tenant_id") == "globex" and turned_off)
    check("pro_features flag is OFF after failure", not sdk.is_enabled("globex", "pro_features") and sdk.is_enabled("globex", "paywall_active"))
    check("Audit event recorded: billing.payment.failed", audited("globex", "billing.payment.failed"))

    print("▸ subscription.upgraded — Tier Promotion")
    initech = {"authorization": f"Bearer {token('initech')}"}
    # A durable sidecar remembers the last run's upgrade: start from a cancelled subscription,
    # so "before the upgrade" holds on every run against the same sidecar, not only the first.
    # Flags follow the newest event by `created`, and within one second a deletion is the last
    # word (the tie rule in the README). So: cancel at the start of a fresh second, later than
    # any earlier run's upgrade, and upgrade one second after the cancellation.
    time.sleep(1 - time.time() % 1)
    body = event("customer.subscription.deleted", "cus_initech_001")
    post(body, signed(body))
    before = client.get("/api/analytics", headers=initech)
    body = event("subscription.upgraded", "cus_initech_001", seconds_ago=-1)
    post(body, signed(body))
    check("subscription.upgraded enables advanced_analytics", sdk.is_enabled("initech", "advanced_analytics"))
    check("/api/analytics returns 200 after upgrade", client.get("/api/analytics", headers=initech).status_code == 200)
    check("/api/analytics returns 403 before upgrade", before.status_code == 403 and before.json().get("type", "").endswith("/feature-locked"))

    passed = sum(results)
    print(f"{passed}/{len(results)} passed")
    sdk.close()
    return 0 if passed == len(results) == 12 else 1


if __name__ == "__main__":
    sys.exit(main())
