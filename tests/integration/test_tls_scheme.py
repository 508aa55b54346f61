"""A TLS failure against a server that answers plain HTTP names the scheme setting, not certificates: an https URL,
or an Airflow `fhir` connection without `scheme`, to the real (plain-HTTP) HAPI server."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest

from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import FhirError

pytestmark = pytest.mark.fhir


def test_an_https_url_to_a_plain_http_server_says_to_use_http(fhir_base_url):
    https = fhir_base_url.replace("http://", "https://", 1)
    with FhirClient(https, max_retries=0) as client, pytest.raises(FhirError) as raised:
        client.capabilities()
    message = str(raised.value)
    assert "answered plain HTTP" in message and "http://" in message and "certificate" not in message


def test_a_connection_without_scheme_to_a_plain_http_server_names_the_extra_scheme(fhir_base_url, monkeypatch):
    from leukofhir.airflow.hook import FhirHook

    where = urlsplit(fhir_base_url)
    monkeypatch.setenv("AIRFLOW_CONN_FHIR_DEFAULT", f"fhir://{where.hostname}:{where.port}{where.path}")
    ok, message = FhirHook().test_connection()
    assert not ok and message.startswith("FHIR server:") and "set the extra `scheme` to `http`" in message
    # The setting it names is the fix: the same connection with that extra reaches the server.
    monkeypatch.setenv(
        "AIRFLOW_CONN_FHIR_DEFAULT",
        json.dumps(
            {
                "conn_type": "fhir",
                "host": where.hostname,
                "port": where.port,
                "schema": where.path.strip("/"),
                "extra": {"scheme": "http"},
            }
        ),
    )
    assert FhirHook().test_connection()[0] is True
