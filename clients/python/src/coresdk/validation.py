"""The sidecar's input rules for ids and flag keys, for answers served from a local cache (or
the mock) without a round trip: both must refuse exactly what the sidecar refuses."""
from __future__ import annotations

import re
from typing import Optional

from coresdk.errors import Problem, ProblemError

# Rust's `str::trim` set, the Unicode White_Space property. Not `str.strip()`'s, which also
# takes U+001C..U+001F (the sidecar keeps those).
WHITE_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def rust_trim(text: str) -> str:
    """`text` as the sidecar's `str::trim` leaves it."""
    return text.strip(WHITE_SPACE)


def ascii_lower(text: str) -> str:
    """Lowercases A-Z only, as Rust's `to_ascii_lowercase`/`eq_ignore_ascii_case` compare: the
    Kelvin sign U+212A is no `k` to the sidecar, though `str.lower()` makes it one."""
    return text.translate(ASCII_LOWER)


ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# `\Z`, not `$`: `$` also matches before a trailing newline ("key\n"); used with fullmatch.
FLAG_KEY = re.compile(r"\A[A-Za-z0-9_.:-]{1,128}\Z")


def invalid(detail: str, type_base: str) -> ProblemError:
    """The sidecar's INVALID_ARGUMENT problem; `detail` is its `field: description` list."""
    return ProblemError(
        Problem(
            type=f"{type_base.rstrip('/')}/invalid-request",
            title="Invalid request",
            status=400,
            detail=f"invalid request: {detail}",
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
    # Unicode separators and "other" characters (the sidecar's general categories Z* and C*):
    # exactly what `isprintable` refuses, but for the space, which `isspace` catches.
    for position, c in enumerate(value, start=1):
        if c.isspace() or not c.isprintable():
            return (
                f"must be printable: U+{ord(c):04X} (character {position}) is whitespace, a control, "
                "a format character such as a bidi override or zero-width space, or unassigned"
            )
    return None


def quoted(text: str, limit: int = 64) -> str:
    """Input as a problem quotes it: cut short, so a problem always fits in response headers."""
    return text if len(text) <= limit else text[:limit] + "…"


def check_ids(tenant_id: str, key: Optional[str], type_base: str) -> None:
    if (defect := id_defect(tenant_id)) is not None:
        raise invalid(f"tenant_id: {defect}", type_base)
    if key is not None and not FLAG_KEY.fullmatch(key):
        raise invalid(f"key: '{quoted(key)}' is not a valid flag key: use 1-128 characters of letters, digits, _ - . :", type_base)
