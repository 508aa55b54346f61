"""The shared secret between the FHIR server's rest-hook deliveries and the receiver: read, checked, compared."""

from __future__ import annotations

import hmac
import os
import re

from leukofhir.errors import UsageError
from leukofhir.fhir.secrets import secret

SECRET_ENV = "LEUKOFHIR_HOOK_SECRET"
MIN_LENGTH = 16
# Sent by the FHIR server as a literal HTTP header (Subscription.channel.header): visible ASCII, no spaces.
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]+$")


def hook_secret(environ=os.environ) -> str:
    """The secret from LEUKOFHIR_HOOK_SECRET or the file named by LEUKOFHIR_HOOK_SECRET_FILE (never argv)."""
    value = secret(SECRET_ENV, environ)
    if not value:
        raise UsageError(f"the shared secret is missing: set {SECRET_ENV} or {SECRET_ENV}_FILE")
    if len(value) < MIN_LENGTH or not _HEADER_SAFE.match(value):
        raise UsageError(
            f"{SECRET_ENV} must be at least {MIN_LENGTH} visible ASCII characters without spaces "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return value


def authorization_header(value: str) -> str:
    """The header line the FHIR server sends with each notification (Subscription.channel.header)."""
    return f"Authorization: Bearer {value}"


def is_authorized(header_value: str | None, value: str) -> bool:
    """Whether an Authorization header carries the secret; constant-time, so timing tells nothing about it."""
    expected = f"Bearer {value}".encode()
    given = (header_value or "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, expected)
