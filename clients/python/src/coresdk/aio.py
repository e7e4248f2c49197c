"""asyncio variant: the same client for `async def` handlers. Calls that talk to the sidecar
run in the default thread pool so they never block the event loop; `is_enabled` and
`get_flags` answer from the local cache and stay plain synchronous calls.

    sdk = AsyncSDK.from_env()
    decision = await sdk.authorize(token=..., require=["advanced_analytics"])
"""
from __future__ import annotations

import asyncio
import functools
from typing import Any, Optional

from coresdk import SDK
from coresdk.base import BaseSDK
from coresdk.config import Settings


class AsyncSDK:
    _BLOCKING = {
        "handle_stripe_webhook",
        "replay_event",
        "get_flag",
        "explain_flag",
        "set_flag",
        "verify_token",
        "authorize",
        "audit",
        "audit_query",
        "audit_verify",
        "map_customer",
        "resolve_customer",
    }

    def __init__(self, sdk: BaseSDK):
        self.sync = sdk
        self.settings = sdk.settings

    @classmethod
    def from_env(cls, settings: Optional[Settings] = None) -> "AsyncSDK":
        return cls(SDK.from_env(settings))

    def is_enabled(self, tenant_id: str, key: str) -> bool:
        return self.sync.is_enabled(tenant_id, key)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.sync, name)
        if name not in self._BLOCKING:
            return method

        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)
