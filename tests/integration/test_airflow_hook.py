"""The `fhir` Airflow connection type: registered by the provider entry point, resolved into a working client."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest

from leukofhir.airflow_hook import FhirHook
from leukofhir.fhir.auth import BearerAuth


def test_provider_entry_point_registers_the_fhir_connection_type():
    (ep,) = [e for e in entry_points(group="apache_airflow_provider") if e.value.startswith("leukofhir.")]
    info = ep.load()()
    assert {"connection-type": "fhir", "hook-class-name": "leukofhir.airflow_hook.FhirHook"} in info["connection-types"]


def test_connection_from_environment_builds_the_client(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_FHIR_SECURE", json.dumps(
        {"conn_type": "fhir", "host": "fhir.hospital.example/fhir", "password": "tok",
         "extra": {"auth": "bearer", "timeout": 12, "max_retries": 2}}))
    with FhirHook("fhir_secure").get_client() as client:
        # A bare host means TLS; the token from the (masked) password field becomes a bearer token.
        assert client.base_url == "https://fhir.hospital.example/fhir/"
        assert client.timeout == 12 and client.max_retries == 2
        assert isinstance(client.session.auth, BearerAuth) and client.session.auth._token == "tok"


@pytest.mark.fhir
def test_test_connection_against_the_real_server(monkeypatch, fhir_base_url):
    monkeypatch.setenv("AIRFLOW_CONN_FHIR_LOCAL", json.dumps({"conn_type": "fhir", "host": fhir_base_url}))
    ok, message = FhirHook("fhir_local").test_connection()
    assert ok and "4.0.1" in message
    monkeypatch.setenv("AIRFLOW_CONN_FHIR_DOWN", json.dumps({"conn_type": "fhir", "host": "http://127.0.0.1:9/fhir",
                                                            "extra": {"max_retries": 0}}))
    ok, message = FhirHook("fhir_down").test_connection()
    assert not ok and "no answer" in message
