"""The sidecar's input rules for ids and flag keys, for answers served from a local cache (or
the mock) without a round trip: both must refuse exactly what the sidecar refuses."""
from __future__ import annotations

import re
from typing import Optional

from coresdk.errors import Problem, ProblemError

# `\Z`, not `$`: `$` also matches before a trailing newline ("key\n"); used with fullmatch.
FLAG_KEY = re.compile(r"\A[A-Za-z0-9_.:-]{1,128}\Z")


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


def id_defect(value: str) -> Optional[str]:
    """What makes `value` no valid tenant or customer id, or None. As the sidecar: 1-128 bytes,
    and no character of the Unicode separator or "other" categories (whitespace, controls, bidi
    and zero-width format characters), which `str.isprintable` excludes except the space."""
    if not value:
        return "is required"
    # surrogatepass: a lone surrogate (JSON `"\ud800"`) is refused below, not a crash here.
    if len(value.encode("utf-8", "surrogatepass")) > 128:
        return "is longer than 128 bytes"
    if any(c.isspace() or not c.isprintable() for c in value):
        return "must not contain whitespace, control, bidi or zero-width characters"
    return None


def check_ids(tenant_id: str, key: Optional[str], type_base: str) -> None:
    if (defect := id_defect(tenant_id)) is not None:
        raise invalid(f"tenant_id: {defect}", type_base)
    if key is not None and not FLAG_KEY.fullmatch(key):
        raise invalid("key: must be 1-128 characters of letters, digits, _ - . :", type_base)
