"""The `fhir` Airflow connection type: registered by the provider entry point with its form, resolved from the URI
or JSON form into a working client, and a Test button that says what failed."""

from __future__ import annotations

import copy
import json
from importlib.metadata import entry_points, version
from urllib.parse import quote

import jsonschema
import pytest

from leukofhir.airflow.hook import FhirHook
from leukofhir.fhir.auth import BearerAuth
from support.faultproxy import Fault, FaultProxy


def _provider_info() -> dict:
    (ep,) = [e for e in entry_points(group="apache_airflow_provider") if e.value.startswith("leukofhir.")]
    return ep.load()()


def test_provider_info_is_complete_and_valid_for_airflow():
    import airflow

    info = _provider_info()
    assert info["package-name"] == "leukofhir" and info["versions"] == [version("leukofhir")]
    (conn,) = info["connection-types"]
    assert conn["connection-type"] == "fhir" and conn["hook-class-name"] == "leukofhir.airflow.hook.FhirHook"
    # Airflow's own schema for provider.yaml describes the connection form fields (conn-fields, ui-field-behaviour).
    with open(f"{airflow.__path__[0]}/provider.yaml.schema.json") as fh:
        schema = json.load(fh)
    jsonschema.validate(conn, schema["properties"]["connection-types"]["items"])
    with open(f"{airflow.__path__[0]}/provider_info.schema.json") as fh:
        jsonschema.validate(info, json.load(fh))
    assert {
        "smart_client_id",
        "smart_private_key_path",
        "smart_key_id",
        "smart_scopes",
        "smart_token_url",
        "scheme",
        "auth",
    } <= set(conn["conn-fields"])


def test_airflow_registers_the_connection_type_and_its_form():
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    assert ProvidersManagerTaskRuntime().hooks["fhir"].hook_class_name == "leukofhir.airflow.hook.FhirHook"
    manager = ProvidersManager()
    widgets = manager.connection_form_widgets
    names = ("smart_client_id", "smart_private_key_path", "scheme", "auth")
    assert {f"extra__fhir__{name}" for name in names} <= set(widgets)
    assert manager.field_behaviours["fhir"]["relabeling"]["schema"].startswith("Path")


def test_json_form_with_a_bare_host_means_tls_and_a_token(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_FHIR_SECURE",
        json.dumps(
            {
                "conn_type": "fhir",
                "host": "fhir.hospital.example/fhir",
                "password": "tok\n",
                "extra": {"auth": "bearer", "timeout": 12, "max_retries": 2},
            }
        ),
    )
    with FhirHook("fhir_secure").get_client() as client:
        # A bare host means TLS; the token from the (masked) password field becomes a bearer token, stripped.
        assert client.base_url == "https://fhir.hospital.example/fhir/"
        assert client.timeout == 12 and client.max_retries == 2
        assert isinstance(client.session.auth, BearerAuth) and client.session.auth._token == "tok"


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("fhir://fhir.hospital.example:8443/r4/fhir", "https://fhir.hospital.example:8443/r4/fhir/"),
        ("fhir://fhir.hospital.example/fhir?scheme=http", "http://fhir.hospital.example/fhir/"),
        (
            "fhir://" + quote("https://fhir.hospital.example/base/fhir", safe=""),
            "https://fhir.hospital.example/base/fhir/",
        ),
    ],
)
def test_uri_form_keeps_port_and_path(monkeypatch, uri, expected):
    monkeypatch.setenv("AIRFLOW_CONN_FHIR_URI", uri)
    with FhirHook("fhir_uri").get_client() as client:
        assert client.base_url == expected


@pytest.mark.fhir
@pytest.mark.parametrize("form", ["uri", "uri-whole-url", "json-parts", "json-whole-url"])
def test_every_form_of_fhir_default_gives_a_working_client(monkeypatch, fhir_base_url, form):
    host, path = fhir_base_url.split("//", 1)[1].split("/", 1)
    hostname, port = host.split(":")
    value = {
        "uri": f"fhir://{hostname}:{port}/{path}?scheme=http",
        "uri-whole-url": "fhir://" + quote(fhir_base_url, safe=""),
        "json-parts": json.dumps(
            {"conn_type": "fhir", "host": hostname, "port": int(port), "schema": path, "extra": {"scheme": "http"}}
        ),
        "json-whole-url": json.dumps({"conn_type": "fhir", "host": fhir_base_url}),
    }[form]
    monkeypatch.setenv("AIRFLOW_CONN_FHIR_DEFAULT", value)
    ok, message = FhirHook().test_connection()
    assert ok, message
    assert "fhirVersion 4.0.1" in message
    with FhirHook().get_client() as client:
        assert client.base_url == fhir_base_url + "/"
        assert client.count("Patient") >= 0


@pytest.mark.fhir
def test_test_connection_says_what_failed(monkeypatch, fhir_base_url, fhir_client):
    monkeypatch.setenv(
        "AIRFLOW_CONN_FHIR_DOWN",
        json.dumps({"conn_type": "fhir", "host": "http://127.0.0.1:9/fhir", "extra": {"max_retries": 0}}),
    )
    ok, message = FhirHook("fhir_down").test_connection()
    assert not ok and message.startswith("FHIR server:") and "no answer" in message and "cannot connect" in message

    monkeypatch.setenv(
        "AIRFLOW_CONN_FHIR_BAD", json.dumps({"conn_type": "fhir", "host": "fhir.example", "extra": {"scheme": "ftp"}})
    )
    ok, message = FhirHook("fhir_bad").test_connection()
    assert not ok and message.startswith("connection settings:") and "ftp" in message

    monkeypatch.setenv(
        "AIRFLOW_CONN_FHIR_NOKEY",
        json.dumps({"conn_type": "fhir", "host": fhir_base_url, "extra": {"auth": "smart", "smart_client_id": "c"}}),
    )
    ok, message = FhirHook("fhir_nokey").test_connection()
    assert not ok and message.startswith("connection settings:") and "private key" in message

    statement = copy.deepcopy(fhir_client.capabilities())
    for resource in statement["rest"][0]["resource"]:
        if resource["type"] == "Flag":
            resource["interaction"] = [i for i in resource["interaction"] if i["code"] != "update"]
    with FaultProxy(fhir_base_url) as proxy:
        proxy.add(
            Fault(
                "status",
                status=200,
                body=json.dumps(statement),
                path_regex="/metadata",
                headers={"Content-Type": "application/fhir+json"},
            )
        )
        monkeypatch.setenv("AIRFLOW_CONN_FHIR_LACKING", json.dumps({"conn_type": "fhir", "host": proxy.base_url}))
        ok, message = FhirHook("fhir_lacking").test_connection()
    assert not ok and message.startswith("capabilities:") and "update of Flag" in message


def test_uri_form_carries_the_smart_settings(monkeypatch, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from leukofhir.fhir.smart import SmartBackendAuth

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "smart.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_FHIR_DEFAULT",
        "fhir://fhir.hospital.example:443/r4?auth=smart&smart_client_id="
        f"leukopenia&smart_private_key_path={quote(str(path), safe='')}&smart_scopes=system%2F*.read",
    )
    with FhirHook().get_client() as client:
        auth = client.session.auth
        assert client.base_url == "https://fhir.hospital.example:443/r4/"
        assert isinstance(auth, SmartBackendAuth) and auth.client_id == "leukopenia"
        assert auth.scopes == "system/*.read" and auth.base_url == client.base_url
