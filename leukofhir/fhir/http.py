"""Retry policy for FHIR requests: which failures are temporary, and how long to wait before the next try."""

from __future__ import annotations

import email.utils
import time

# Statuses a later identical request may succeed on (RFC 9110 §15; HAPI answers 503 while it starts up).
TEMPORARY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

MAX_RETRY_AFTER = 60.0  # seconds: a server asking for longer is treated as down, not obeyed


def is_temporary(status: int) -> bool:
    return status in TEMPORARY_STATUSES


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Parse `Retry-After` (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_delay(attempt: int, retry_after: str | None = None, base: float = 1.0) -> float:
    """Delay before retry number `attempt` (1-based): the server's Retry-After when it gives one, bounded;
    otherwise exponential backoff base·2^(attempt-1), also bounded. Predictable, so tests can reason on it."""
    asked = retry_after_seconds(retry_after)
    if asked is not None:
        return min(asked, MAX_RETRY_AFTER)
    return min(base * 2 ** (attempt - 1), MAX_RETRY_AFTER)
