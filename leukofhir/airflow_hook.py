"""Airflow hook: an Airflow Connection of type `fhir` → a configured FhirClient, and nothing more."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from leukofhir.fhir.auth import make_auth
from leukofhir.fhir.client import FhirClient


class FhirHook(BaseHook):
    """Connection fields: host = FHIR base URL (https://… in production); login/password for basic auth;
    extra `{"auth": "none|basic|bearer", "token": "…", "timeout": 60, "max_retries": 4}`. Resolved lazily,
    inside the task, never at DAG parse time."""

    conn_name_attr = "fhir_conn_id"
    default_conn_name = "fhir_default"
    conn_type = "fhir"
    hook_name = "FHIR server"

    def __init__(self, fhir_conn_id: str = default_conn_name, **kwargs: Any):
        super().__init__(**kwargs)
        self.fhir_conn_id = fhir_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "port"],
            "relabeling": {"host": "FHIR base URL", "login": "User (basic auth)", "password": "Password or token"},
            "placeholders": {"host": "https://fhir.hospital.example/fhir", "extra": '{"auth": "bearer"}'},
        }

    def get_client(self) -> FhirClient:
        conn = self.get_connection(self.fhir_conn_id)
        extra = conn.extra_dejson
        base_url = conn.host or ""
        if "://" not in base_url:
            base_url = f"https://{base_url}"  # a bare host name means TLS, never plain HTTP by accident
        kind = extra.get("auth")
        # A bearer token may sit in the password field (masked in the UI) or in extra.
        token = extra.get("token") or (conn.password if kind == "bearer" else None)
        auth = make_auth(kind, token=token, user=conn.login, password=conn.password if kind != "bearer" else None)
        return FhirClient(base_url, auth, timeout=float(extra.get("timeout", 60)),
                          max_retries=int(extra.get("max_retries", 4)))

    def test_connection(self) -> tuple[bool, str]:
        """The UI's Test button: GET /metadata and check it is FHIR R4."""
        try:
            with self.get_client() as client:
                version = client.capabilities().get("fhirVersion")
        except Exception as exc:  # the UI shows the message; any failure is a failed test
            return False, str(exc)
        return (version or "").startswith("4.0"), f"FHIR server answered, fhirVersion {version}"
