"""FastAPI glue: problems as `application/problem+json`, a dependency that gates a route on
flags through the sidecar's Authorize, and a ready-made Stripe webhook route.

    app = FastAPI()
    coresdk.fastapi.install(app, sdk)
    app.include_router(coresdk.fastapi.stripe_webhook_router(sdk))

    @app.get("/api/analytics")
    def analytics(access: Decision = Depends(coresdk.fastapi.require(sdk, features=["advanced_analytics"]))):
        ...
"""
from __future__ import annotations

from typing import Callable, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from coresdk.base import BaseSDK
from coresdk.errors import Problem, ProblemError
from coresdk.models import Decision

PROBLEM_JSON = "application/problem+json"


def problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse(problem.to_dict(), status_code=problem.status, media_type=PROBLEM_JSON)


def install(app: FastAPI, sdk: BaseSDK) -> None:
    """Answers every ProblemError raised in a route with its problem, as is."""

    async def handler(_request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ProblemError)
        return problem_response(error.problem)

    app.add_exception_handler(ProblemError, handler)
    app.state.coresdk = sdk


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def require(
    sdk: BaseSDK, *, features: Sequence[str] = (), deny_if: Sequence[str] = ()
) -> Callable[[Request], Decision]:
    """A dependency: verifies the request's bearer token and the tenant's flags in one sidecar
    call, and raises the sidecar's problem (401/402/403/503) when the request may not go on."""

    def dependency(request: Request) -> Decision:
        token = bearer_token(request)
        resource = f"{request.method} {request.url.path}"
        if not token:
            raise ProblemError(
                Problem(
                    type=f"{sdk.settings.problem_type_base.rstrip('/')}/unauthenticated",
                    title="Unauthenticated",
                    status=401,
                    detail="The request carries no bearer token.",
                    instance=resource,
                    extensions={"reason": "UNAUTHENTICATED"},
                )
            )
        decision = sdk.authorize(token=token, require=features, deny_if=deny_if, resource=resource)
        if not decision.allowed:
            assert decision.problem is not None
            raise ProblemError(decision.problem)
        return decision

    return dependency


def stripe_webhook_router(sdk: BaseSDK, path: str = "/webhooks/stripe") -> APIRouter:
    """POST `path`: forwards the raw body (never a re-serialised one) and the Stripe-Signature
    header. 200 once the effect is committed; the problem's status otherwise (Stripe retries)."""
    router = APIRouter()

    @router.post(path)
    async def stripe_webhook(request: Request) -> JSONResponse:
        payload = await request.body()
        signature = request.headers.get("stripe-signature", "")
        # The sidecar call blocks until the commit is durable: keep it off the event loop.
        result = await run_in_threadpool(sdk.handle_stripe_webhook, payload, signature)
        return JSONResponse(
            {
                "received": True,
                "event_id": result.event_id,
                "tenant_id": result.tenant_id,
                "outcome": result.outcome,
                "flag_changes": [{"key": c.key, "value": c.new_value} for c in result.flag_changes],
            }
        )

    return router
