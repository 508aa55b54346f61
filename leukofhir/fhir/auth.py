"""Authentication strategies for the FHIR server; secrets come from the environment or files, never argv."""

from __future__ import annotations

import os
from pathlib import Path

import requests
from requests.auth import AuthBase, HTTPBasicAuth

from leukofhir.errors import UsageError


class BearerAuth(AuthBase):
    """`Authorization: Bearer <token>`; the token is re-read on `refresh()` so a rotated file is picked up."""

    def __init__(self, token_source):
        self._token_source = token_source
        self._token = token_source()

    def refresh(self) -> None:
        self._token = self._token_source()

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request


def secret(name: str, environ=os.environ) -> str | None:
    """The value of `name`, or the contents of the file named by `name_FILE` (Docker/K8s secret style)."""
    value = environ.get(name)
    if value:
        return value
    path = environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"cannot read {name}_FILE: {exc.strerror}") from exc
    return None


def make_auth(kind: str | None, *, token: str | None = None, user: str | None = None,
              password: str | None = None, environ=os.environ) -> AuthBase | None:
    """Choose and check the auth strategy. Explicit values (from an Airflow connection) win over the
    environment (LEUKOFHIR_FHIR_TOKEN, LEUKOFHIR_FHIR_USER, LEUKOFHIR_FHIR_PASSWORD, each with a *_FILE twin)."""
    if kind is None:
        kind = "bearer" if (token or secret("LEUKOFHIR_FHIR_TOKEN", environ)) else (
            "basic" if (user or secret("LEUKOFHIR_FHIR_USER", environ)) else "none")
    if kind == "none":
        return None
    if kind == "bearer":
        if token:
            return BearerAuth(lambda: token)

        def from_env() -> str:
            value = secret("LEUKOFHIR_FHIR_TOKEN", environ)
            if not value:
                raise UsageError("bearer auth needs LEUKOFHIR_FHIR_TOKEN or LEUKOFHIR_FHIR_TOKEN_FILE")
            return value

        return BearerAuth(from_env)
    if kind == "basic":
        user = user or secret("LEUKOFHIR_FHIR_USER", environ)
        password = password if password is not None else secret("LEUKOFHIR_FHIR_PASSWORD", environ)
        if not user or password is None:
            raise UsageError("basic auth needs a user and a password (LEUKOFHIR_FHIR_USER, LEUKOFHIR_FHIR_PASSWORD)")
        return HTTPBasicAuth(user, password)
    raise UsageError(f"unknown auth kind {kind!r} (expected none, basic or bearer)")
