"""Airflow hook: an Airflow Connection of type `fhir` → a configured FhirClient, and nothing more."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from leukofhir.errors import LeukofhirError, UsageError
from leukofhir.fhir.auth import make_auth
from leukofhir.fhir.auth_kinds import auth_kind
from leukofhir.fhir.capabilities import check_capabilities
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import CapabilityError, FhirError, SmartAuthError
from leukofhir.fhir.urls import base_url_from_parts, redact_url


def _extra(extra: dict, name: str):
    """An extra field as the connection form stores it (plain, or `extra__fhir__` prefixed by older UIs)."""
    value = extra.get(name)
    return value if value not in (None, "") else extra.get(f"extra__fhir__{name}") or None


class FhirHook(BaseHook):
    """Connection fields: host (a host name, or the whole base URL), port, schema (the path, e.g. `fhir`);
    extra `scheme` (https unless it says http), `auth` (none | basic | bearer | smart), `timeout`,
    `max_retries`; basic auth from login/password; a bearer token in password or extra `token`; SMART Backend
    Services from extra `smart_client_id`, `smart_key_id`, `smart_scopes`, `smart_token_url` (discovered when
    absent) and the private key from extra `smart_private_key_path` or the password field (so a secrets backend
    can hold it). Resolved lazily, inside the task, never at DAG parse time. The connection form (labels, extra
    fields) is described in provider.get_provider_info, where Airflow ≥ 3.2 reads it."""

    conn_name_attr = "fhir_conn_id"
    default_conn_name = "fhir_default"
    conn_type = "fhir"
    hook_name = "FHIR server"

    def __init__(self, fhir_conn_id: str = default_conn_name, **kwargs: Any):
        super().__init__(**kwargs)
        self.fhir_conn_id = fhir_conn_id

    def get_client(self) -> FhirClient:
        conn = self.get_connection(self.fhir_conn_id)
        extra = conn.extra_dejson
        base_url = base_url_from_parts(conn.host, conn.port, conn.schema, _extra(extra, "scheme"))
        # Only the connection counts here: environ={} keeps the worker's environment out of it.
        kind = auth_kind(
            _extra(extra, "auth"),
            smart_client_id=_extra(extra, "smart_client_id"),
            token=_extra(extra, "token"),
            user=conn.login,
            environ={},
        )
        smart = {
            "client_id": _extra(extra, "smart_client_id"),
            "key_id": _extra(extra, "smart_key_id"),
            "scopes": _extra(extra, "smart_scopes"),
            "token_url": _extra(extra, "smart_token_url"),
            "private_key_path": _extra(extra, "smart_private_key_path"),
        }
        if kind == "smart" and not smart["private_key_path"]:
            smart["private_key"] = conn.password
        # A bearer token may sit in the password field (masked in the UI) or in extra.
        token = _extra(extra, "token") or (conn.password if kind == "bearer" else None)
        password = conn.password if kind == "basic" else None
        auth = make_auth(
            kind,
            token=token,
            user=conn.login if kind == "basic" else None,
            password=password,
            smart=smart,
            base_url=base_url,
            environ={},
        )
        try:
            timeout = float(_extra(extra, "timeout") or 60)
            max_retries = int(_extra(extra, "max_retries") if _extra(extra, "max_retries") is not None else 4)
        except (TypeError, ValueError):
            raise UsageError(f"connection {self.fhir_conn_id}: timeout and max_retries must be numbers") from None
        return FhirClient(base_url, auth, timeout=timeout, max_retries=max_retries)

    def test_connection(self) -> tuple[bool, str]:
        """The UI's Test button: build the client, read /metadata, check it declares what leukofhir needs; the
        message says which step failed."""
        try:
            client = self.get_client()
        except LeukofhirError as exc:
            return False, f"connection settings: {exc}"
        with client:
            try:
                statement = check_capabilities(client)
            except SmartAuthError as exc:
                return False, f"SMART authorization: {exc}"
            except CapabilityError as exc:
                return False, f"capabilities: {exc}"
            except FhirError as exc:
                return False, f"FHIR server: {exc}"
            except LeukofhirError as exc:
                return False, f"connection settings: {exc}"
            except Exception as exc:  # the UI shows the message; never str(exc), which may quote a setting
                return False, f"unexpected {type(exc).__name__} talking to {redact_url(client.base_url)}"
        return True, (
            f"FHIR server {redact_url(client.base_url)} answers (fhirVersion "
            f"{statement.get('fhirVersion')}) and declares everything leukofhir needs"
        )
