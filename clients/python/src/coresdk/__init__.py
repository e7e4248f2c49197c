"""CoreSDK: the Python client of the CoreSDK sidecar.

    from coresdk import SDK
    sdk = SDK.from_env()          # CORESDK_USE_MOCK=true gives the in-process mock
    sdk.is_enabled("acme-corp", "pro_features")
"""
from __future__ import annotations

from typing import Optional

from coresdk.base import BaseSDK
from coresdk.config import Settings
from coresdk.errors import FlagNotFound, Problem, ProblemError, SidecarUnavailable
from coresdk.models import (
    AdminFlagChange,
    AuditRecord,
    Claims,
    ConsistencyProof,
    Decision,
    Flag,
    FlagChange,
    FlagEvent,
    FlagExplanation,
    InclusionProof,
    VerifyResult,
    WebhookResult,
)

__all__ = [
    "SDK",
    "BaseSDK",
    "Settings",
    "Problem",
    "ProblemError",
    "FlagNotFound",
    "SidecarUnavailable",
    "AdminFlagChange",
    "AuditRecord",
    "Claims",
    "ConsistencyProof",
    "Decision",
    "Flag",
    "FlagChange",
    "FlagEvent",
    "FlagExplanation",
    "InclusionProof",
    "VerifyResult",
    "WebhookResult",
]


class SDK:
    """Factory: `SDK.from_env()` returns a sidecar client, or the mock when CORESDK_USE_MOCK is true."""

    @staticmethod
    def from_env(settings: Optional[Settings] = None) -> BaseSDK:
        settings = settings or Settings.from_env()
        if settings.use_mock:
            from coresdk.mock import MockSidecar

            return MockSidecar(settings)
        from coresdk.client import SidecarClient

        return SidecarClient(settings)
