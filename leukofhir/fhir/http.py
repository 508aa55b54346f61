"""Retry policy for FHIR requests: which failures are temporary, which requests may be repeated, and how long to
wait before the next try."""

from __future__ import annotations

import email.utils
import time
from urllib.parse import urlsplit

from leukofhir.fhir.errors import outcome_text

# Statuses a later identical request may succeed on (RFC 9110 §15; HAPI answers 503 while it starts up).
TEMPORARY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

# Of those, the ones that say the server did not act on the request (RFC 9110 §15.5.9 408: the request was not
# received whole; RFC 6585 §4 429 and RFC 9110 §15.6.4 503: not handled now). After 500, 502 or 504 a write may or
# may not have been applied, so only a request that can be repeated safely is retried.
NOT_APPLIED_STATUSES = frozenset({408, 429, 503})

# RFC 9110 §9.2.2: repeating these has the effect of sending them once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

MAX_RETRY_AFTER = 60.0  # seconds: a server asking for longer is treated as down, not obeyed


# HAPI 8.8's message codes in a 409 to a write that lost to a simultaneous write of the same resource (its
# HapiFhirHibernateJpaDialect: "two clients/threads were trying to update the same resource at the same time"):
# HAPI-0825, a resource created at the same client-assigned id; HAPI-0823, 0826 and 0827, the same version written by
# both; HAPI-2745, the same conditional create. The same request a moment later meets the winner's version
# (benchmarks/concurrent_create.py). Not HAPI-0824, a unique index of the data: the same request fails again.
SIMULTANEOUS_WRITE_CODES = ("HAPI-0823", "HAPI-0825", "HAPI-0826", "HAPI-0827", "HAPI-2745")
# HAPI 8.8's code for an If-Match that names a version which is not the current one, answered with 409 where FHIR R4
# (http.html#concurrency) says 412 (/work/shared/fhir-server.md).
STALE_VERSION_CODE = "HAPI-0989"


def is_version_conflict(status: int, outcome=None, *, preconditioned: bool = False) -> bool:
    """The version moved since the request's If-Match was read: 412 to a request carrying If-Match, or a 409 whose
    OperationOutcome holds HAPI-0989. Never temporary: the same request cannot succeed; the caller decides again."""
    return (status == 412 and preconditioned) or (status == 409 and STALE_VERSION_CODE in outcome_text(outcome))


def is_temporary(status: int, *, conditional_write: bool = False, outcome=None) -> bool:
    """Worth retrying. A 409 is, unless the version moved (is_version_conflict), when another writer of the same
    resource won: HAPI says so with SIMULTANEOUS_WRITE_CODES; and to a conditional write (HAPI answers one of several
    simultaneous `PUT Flag?identifier=…` with 409, with or without those codes)."""
    if status == 409:
        if is_version_conflict(status, outcome):
            return False
        text = outcome_text(outcome)
        return conditional_write or any(code in text for code in SIMULTANEOUS_WRITE_CODES)
    return status in TEMPORARY_STATUSES


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


def has_precondition(headers=None, body=None) -> bool:
    """The request carries If-Match, as a header or in an entry of its transaction or batch."""
    if any(k.lower() == "if-match" for k in (headers or {})):
        return True
    return any((entry.get("request") or {}).get("ifMatch") for entry in _entries(body))


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
