"""Retry policy for FHIR requests: which failures are temporary, which requests may be repeated, and how long to
wait before the next try."""

from __future__ import annotations

import email.utils
import time
from urllib.parse import urlsplit

# Statuses a later identical request may succeed on (RFC 9110 §15; HAPI answers 503 while it starts up).
TEMPORARY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

# Of those, the ones that say the server did not act on the request (RFC 9110 §15.5.9 408: the request was not
# received whole; RFC 6585 §4 429 and RFC 9110 §15.6.4 503: not handled now). After 500, 502 or 504 a write may or
# may not have been applied, so only a request that can be repeated safely is retried.
NOT_APPLIED_STATUSES = frozenset({408, 429, 503})

# RFC 9110 §9.2.2: repeating these has the effect of sending them once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

MAX_RETRY_AFTER = 60.0  # seconds: a server asking for longer is treated as down, not obeyed


def is_temporary(status: int, *, conditional_write: bool = False) -> bool:
    """Worth retrying. 409 is temporary for a conditional write: HAPI answers 409 to one of several simultaneous
    `PUT Flag?identifier=…` with the same identifier (the others win; the retry finds the Flag and updates it)."""
    return status in TEMPORARY_STATUSES or (status == 409 and conditional_write)


def _entries(body) -> list:
    if isinstance(body, dict) and body.get("resourceType") == "Bundle" and body.get("type") in ("transaction", "batch"):
        return [e for e in body.get("entry") or [] if isinstance(e, dict)]
    return []


def is_conditional_write(method: str, url: str, body=None, headers=None) -> bool:
    """A conditional create/update/delete (`PUT Flag?identifier=…`, `If-None-Exist`), or a transaction holding one."""
    method, parts = method.upper(), urlsplit(url)
    if parts.path.rstrip("/").endswith("/_search"):
        return False
    if method in ("PUT", "POST", "DELETE", "PATCH") and parts.query:
        return True
    if any(k.lower() == "if-none-exist" for k in (headers or {})):
        return True
    for entry in _entries(body):
        request = entry.get("request") or {}
        if "?" in str(request.get("url", "")) or request.get("ifNoneExist"):
            return True
    return False


def replay_safe(method: str, url: str, body=None) -> bool:
    """True when sending the request again cannot change the server more than sending it once: idempotent methods,
    a search by POST (`…/_search`), and a transaction or batch made only of PUTs (conditional ones included),
    DELETEs and reads. Any other POST (a create, an operation) may already have been applied when its answer is
    lost."""
    method = method.upper()
    if method in IDEMPOTENT_METHODS:
        return True
    if method != "POST":
        return False
    if urlsplit(url).path.rstrip("/").endswith("/_search"):
        return True
    entries = _entries(body)
    return bool(entries) and all(
        str((e.get("request") or {}).get("method", "")).upper() in ("PUT", "DELETE", "GET", "HEAD") for e in entries
    )


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
