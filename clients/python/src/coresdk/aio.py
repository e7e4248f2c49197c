"""asyncio variant: the same client for `async def` handlers. Every call that may talk to the
sidecar runs in the default thread pool, so it never blocks the event loop. That includes
`is_enabled` and `get_flags`: they answer from the local cache while it is current, but ask the
sidecar (within its timeout) while it is not, or for a key the cache does not know.

    sdk = AsyncSDK.from_env()
    if await sdk.is_enabled("acme-corp", "pro_features"): ...   # awaited: without `await` a
                                                                # coroutine is always truthy
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
        "audit_checkpoint",
        "audit_inclusion_proof",
        "audit_consistency_proof",
        "map_customer",
        "resolve_customer",
    }

    def __init__(self, sdk: BaseSDK):
        self.sync = sdk
        self.settings = sdk.settings

    @classmethod
    def from_env(cls, settings: Optional[Settings] = None) -> "AsyncSDK":
        return cls(SDK.from_env(settings))

    async def is_enabled(self, tenant_id: str, key: str) -> bool:
        # A current cache that knows the key answers with a lookup: no thread hop, and no
        # place taken in the pool that blocking calls share during an outage. Only an answer
        # that needs no I/O is taken on the loop's thread.
        cached = self.sync.cached_is_enabled(tenant_id, key)
        if cached is not None:
            return cached
        return await asyncio.to_thread(self.sync.is_enabled, tenant_id, key)

    async def get_flags(self, tenant_id: str) -> Any:
        cached = self.sync.cached_flags(tenant_id)
        if cached is not None:
            return cached
        return await asyncio.to_thread(self.sync.get_flags, tenant_id)

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
