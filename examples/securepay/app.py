"""SecurePay: the seed story's billing webhook processor, written with the CoreSDK client.

    CORESDK_USE_MOCK=true uvicorn --factory app:create_app   # no sidecar needed
    uvicorn --factory app:create_app                         # the sidecar at CORESDK_SIDECAR_ADDR

Stripe → POST /webhooks/stripe → the sidecar verifies, deduplicates, maps the customer to a
tenant, flips flags and audits, in one step. The routes below are gated by those flags.
"""
from __future__ import annotations

from fastapi import Depends, FastAPI

import coresdk.fastapi as coresdk_fastapi
from coresdk import SDK, BaseSDK, Decision


def create_app(sdk: BaseSDK | None = None) -> FastAPI:
    sdk = sdk or SDK.from_env()
    app = FastAPI(title="SecurePay")
    coresdk_fastapi.install(app, sdk)
    app.include_router(coresdk_fastapi.stripe_webhook_router(sdk))

    @app.get("/api/analytics")
    def analytics(access: Decision = Depends(coresdk_fastapi.require(sdk, features=["advanced_analytics"]))) -> dict:
        return {"tenant": access.tenant_id, "data": {"mrr": 12_400, "churn": 0.021}}

    @app.get("/api/dashboard")
    def dashboard(access: Decision = Depends(coresdk_fastapi.require(sdk, deny_if=["paywall_active"]))) -> dict:
        return {"tenant": access.tenant_id, "status": "active"}

    return app

