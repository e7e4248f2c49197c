"""The sidecar's input rules for ids and flag keys, for answers served from a local cache (or
the mock) without a round trip: both must refuse exactly what the sidecar refuses."""
from __future__ import annotations

import re
from typing import Optional

from coresdk.errors import Problem, ProblemError

FLAG_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def invalid(detail: str, type_base: str) -> ProblemError:
    return ProblemError(
        Problem(
            type=f"{type_base.rstrip('/')}/invalid-request",
            title="Invalid request",
            status=400,
            detail=detail,
            extensions={"reason": "INVALID_ARGUMENT"},
        )
    )


def check_ids(tenant_id: str, key: Optional[str], type_base: str) -> None:
    if not tenant_id or len(tenant_id.encode()) > 128 or any(c.isspace() or not c.isprintable() for c in tenant_id):
        raise invalid("tenant_id: must be 1-128 bytes without whitespace or control characters", type_base)
    if key is not None and not FLAG_KEY.match(key):
        raise invalid("key: must be 1-128 characters of letters, digits, _ - . :", type_base)
