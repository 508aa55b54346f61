"""Authentication strategies for the FHIR server; secrets come from connections, the environment or files, never
argv, and are stripped and checked where they are read, so no message or traceback ever shows one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import requests
from requests.auth import AuthBase, HTTPBasicAuth

from leukofhir.errors import UsageError
from leukofhir.fhir.auth_kinds import AUTH_KINDS, auth_kind
from leukofhir.fhir.secrets import check_token, clean_secret, pem, secret

__all__ = ["AUTH_KINDS", "BearerAuth", "make_auth"]


class BearerAuth(AuthBase):
    """`Authorization: Bearer <token>`; the token is re-read on `refresh()` so a rotated file is picked up."""

    def __init__(self, token_source: Callable[[], str]):
        self._token_source = token_source
        self._token = token_source()

    def __repr__(self) -> str:
        return "BearerAuth(<token>)"

    def refresh(self) -> None:
        self._token = self._token_source()

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request


def make_auth(
    kind: str | None,
    *,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    smart: dict | None = None,
    base_url: str | None = None,
    environ=os.environ,
) -> AuthBase | None:
    """Choose and check the auth strategy. Explicit values (from an Airflow connection) win over the environment:
    LEUKOFHIR_FHIR_TOKEN, LEUKOFHIR_FHIR_USER, LEUKOFHIR_FHIR_PASSWORD, and for SMART Backend Services
    LEUKOFHIR_SMART_CLIENT_ID, LEUKOFHIR_SMART_PRIVATE_KEY, LEUKOFHIR_SMART_KEY_ID, LEUKOFHIR_SMART_SCOPES,
    LEUKOFHIR_SMART_TOKEN_URL (each with a *_FILE twin). `smart` holds the connection's SMART settings
    (client_id, private_key or private_key_path, key_id, scopes, token_url); `base_url` is where the token endpoint
    is discovered when none is given."""
    smart = {k: v for k, v in (smart or {}).items() if v not in (None, "")}
    kind = auth_kind(kind, smart_client_id=smart.get("client_id"), token=token, user=user, environ=environ)
    if kind == "none":
        return None
    if kind == "bearer":
        if token:
            fixed = check_token(token, "the connection's token")
            return BearerAuth(lambda: fixed)

        def from_env() -> str:
            value = secret("LEUKOFHIR_FHIR_TOKEN", environ, check=check_token)
            if not value:
                raise UsageError("bearer auth needs LEUKOFHIR_FHIR_TOKEN or LEUKOFHIR_FHIR_TOKEN_FILE")
            return value

        return BearerAuth(from_env)
    if kind == "basic":
        user = clean_secret(user, "the connection's login") if user else secret("LEUKOFHIR_FHIR_USER", environ)
        password = (
            clean_secret(password, "the connection's password")
            if password
            else secret("LEUKOFHIR_FHIR_PASSWORD", environ)
        )
        if not user or password is None:
            raise UsageError("basic auth needs a user and a password (LEUKOFHIR_FHIR_USER, LEUKOFHIR_FHIR_PASSWORD)")
        # RFC 7617 §2.1: UTF-8 (requests would encode str as Latin-1 and fail on other characters).
        return HTTPBasicAuth(user.encode(), password.encode())
    if kind == "smart":
        return _smart_auth(smart, base_url, environ)
    raise UsageError(f"unknown auth kind {kind!r} (expected {', '.join(AUTH_KINDS)})")


def _smart_auth(settings: dict, base_url: str | None, environ) -> AuthBase:
    from leukofhir.fhir.smart import DEFAULT_SCOPES, SmartBackendAuth

    def setting(key: str, env: str) -> str | None:
        value = settings.get(key)
        return clean_secret(str(value), f"the connection's {key}") if value else secret(env, environ)

    client_id = setting("client_id", "LEUKOFHIR_SMART_CLIENT_ID")
    if settings.get("private_key"):
        key, key_source = pem(settings["private_key"], "the connection's private key"), "the connection's private key"
    elif settings.get("private_key_path"):
        path = str(settings["private_key_path"])
        key_source = f"the private key file {path}"
        try:
            key = pem(Path(path).read_text(encoding="utf-8"), key_source)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {key_source}: {getattr(exc, 'strerror', None) or 'not UTF-8'}") from None
    else:
        key = secret("LEUKOFHIR_SMART_PRIVATE_KEY", environ, check=pem)
        key_source = (
            "LEUKOFHIR_SMART_PRIVATE_KEY"
            if environ.get("LEUKOFHIR_SMART_PRIVATE_KEY")
            else f"LEUKOFHIR_SMART_PRIVATE_KEY_FILE ({environ.get('LEUKOFHIR_SMART_PRIVATE_KEY_FILE')})"
        )
    if not client_id or not key:
        raise UsageError(
            "SMART auth needs a client id and a private key (LEUKOFHIR_SMART_CLIENT_ID and "
            "LEUKOFHIR_SMART_PRIVATE_KEY_FILE, or the connection's smart_client_id and private key)"
        )
    return SmartBackendAuth(
        client_id=client_id,
        private_key=key,
        key_source=key_source,
        base_url=base_url,
        token_url=setting("token_url", "LEUKOFHIR_SMART_TOKEN_URL"),
        key_id=setting("key_id", "LEUKOFHIR_SMART_KEY_ID"),
        scopes=setting("scopes", "LEUKOFHIR_SMART_SCOPES") or DEFAULT_SCOPES,
    )
