"""The auth kinds leukofhir knows, and which one applies when none is named: the one list the command line, the
Airflow connection form and the hook read. Light on purpose: the provider metadata imports it."""

from __future__ import annotations

import os

from leukofhir.fhir.secrets import check_token, secret

AUTH_KINDS = ("none", "basic", "bearer", "smart")


def auth_kind(
    kind: str | None,
    *,
    smart_client_id: str | None = None,
    token: str | None = None,
    user: str | None = None,
    environ=os.environ,
) -> str:
    """`kind` when named; else inferred from what is given, then from the environment: SMART with a client id
    (LEUKOFHIR_SMART_CLIENT_ID), bearer with a token (LEUKOFHIR_FHIR_TOKEN), basic with a user (LEUKOFHIR_FHIR_USER),
    otherwise none."""
    if kind is not None:
        return kind
    if smart_client_id or secret("LEUKOFHIR_SMART_CLIENT_ID", environ):
        return "smart"
    if token or secret("LEUKOFHIR_FHIR_TOKEN", environ, check=check_token):
        return "bearer"
    if user or secret("LEUKOFHIR_FHIR_USER", environ):
        return "basic"
    return "none"
