"""asyncio variant: the same client for `async def` handlers. Every call that may talk to the
sidecar runs in the default thread pool, so it never blocks the event loop. That includes
`is_enabled` and `get_flags`: they answer from the local cache while it is current, but ask the
sidecar (within its timeout) while it is not, or for a key the cache does not know.

    sdk = AsyncSDK.from_env()
    if await sdk.is_enabled("acme-corp", "pro_features"): ...
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
        "get_flags",
        "is_enabled",
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
