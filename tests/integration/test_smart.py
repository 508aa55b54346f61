"""SMART Backend Services against a real authorization server and a bearer-checking proxy in front of HAPI.

The authorization server (tests/support/smart_server.py) verifies every assertion against the client's public
JWKS; the proxy lets through only requests with one of its live tokens. Every secret involved (the private key,
each assertion, each token) is grepped for in every output, log and written file."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from leukofhir.fhir.auth import make_auth
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import AuthError, SmartAuthError
from leukofhir.fhir.smart import SmartBackendAuth
from support.faultproxy import FaultProxy
from support.smart_server import SmartAuthServer

pytestmark = pytest.mark.fhir

CLIENT_ID = "leukofhir-test-client"
KID = "test-key-1"


def _pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def auth_server(rsa_key):
    with SmartAuthServer(token_lifetime=120) as server:
        server.register(CLIENT_ID, rsa_key.public_key(), KID)
        yield server


@pytest.fixture
def guarded(fhir_base_url, auth_server):
    """HAPI behind the bearer check: the FHIR base URL a hospital would give us."""
    with FaultProxy(fhir_base_url, gate=auth_server.gate) as proxy:
        yield proxy


@pytest.fixture
def key_file(tmp_path, rsa_key):
    path = tmp_path / "keys" / "client.pem"
    path.parent.mkdir()
    path.write_text(_pem(rsa_key))
    path.chmod(0o600)
    return path


def _secrets(auth_server, *keys) -> list[str]:
    """Everything that must never be shown: the private keys (whole and each line of their body), every
    assertion the server received and every token it issued."""
    found = list(auth_server.secrets)
    for key in keys:
        pem = _pem(key)
        found.append(pem)
        found.extend(line for line in pem.splitlines() if len(line) > 40)
    return found


def assert_nothing_secret(secrets: list[str], texts: list[str], folders: list[Path] = ()):
    assert secrets, "no secrets to look for"
    for text in texts:
        for s in secrets:
            assert s not in text, "a secret was shown"
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file() and "keys" not in path.parts:
                data = path.read_text(errors="replace")
                for s in secrets:
                    assert s not in data, f"a secret was written to {path}"


def _cli(*args, env, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "leukofhir.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **env),
    )


def _smart_env(key_file) -> dict:
    return {
        "LEUKOFHIR_SMART_CLIENT_ID": CLIENT_ID,
        "LEUKOFHIR_SMART_PRIVATE_KEY_FILE": str(key_file),
        "LEUKOFHIR_SMART_KEY_ID": KID,
    }


def _bearers(proxy) -> list[str]:
    return [h.get("Authorization", "") for _, p, h in proxy.requests if "/.well-known/" not in p]


def test_a_run_reads_and_writes_with_a_token_bought_by_a_signed_assertion(
    guarded, auth_server, key_file, rsa_key, tmp_path, unique, caplog
):
    caplog.set_level(logging.DEBUG)
    env = _smart_env(key_file)
    pid = f"smart-{unique}"
    data = tmp_path / "in" / "patient.ndjson"
    data.parent.mkdir()
    data.write_text(json.dumps({"resourceType": "Patient", "id": pid}) + "\n")

    loaded = _cli("load", "--fhir-url", guarded.base_url, "--auth", "smart", str(data), env=env)
    assert loaded.returncode == 0, loaded.stderr[-800:]
    assert "wrote 1" in loaded.stdout

    # The pipeline's kind of write, in process: a conditional upsert of a Flag in a transaction, then a search.
    auth = make_auth("smart", base_url=guarded.base_url, environ=env)
    with FhirClient(guarded.base_url, auth) as client:
        flag = {
            "resourceType": "Flag",
            "status": "active",
            "code": {"text": "test"},
            "identifier": [{"system": "urn:leukofhir:test", "value": unique}],
            "subject": {"reference": f"Patient/{pid}"},
        }
        entry = {
            "resource": flag,
            "request": {"method": "PUT", "url": f"Flag?identifier=urn:leukofhir:test%7C{unique}"},
        }
        answer = client.transaction([entry])
        assert answer["entry"][0]["response"]["status"].startswith("201")
        assert [f["id"] for f in client.search("Flag", {"subject": f"Patient/{pid}"})]

    out = tmp_path / "export"
    exported = _cli(
        "export",
        "--fhir-url",
        guarded.base_url,
        "--auth",
        "smart",
        "--type",
        "Patient",
        "--since",
        "2000-01-01T00:00:00Z",
        "--out",
        str(out),
        env=env,
    )
    assert exported.returncode == 0, exported.stderr[-800:]
    patients = [json.loads(line)["id"] for f in out.glob("Patient.*.ndjson") for line in f.read_text().splitlines()]
    assert pid in patients

    assert auth_server.refusals == []
    issued = {t for t in auth_server.secrets if t in auth_server.tokens}
    assert len(issued) == 3  # one per process and client: cached, not one per request
    assert all(b.startswith("Bearer ") and b[7:] in issued for b in _bearers(guarded))  # the gate checked each
    assert any("/Binary/" in p for _, p, _ in guarded.requests)  # downloads went with the token as well
    assert_nothing_secret(
        _secrets(auth_server, rsa_key),
        [loaded.stdout, loaded.stderr, exported.stdout, exported.stderr, caplog.text],
        [tmp_path],
    )


def test_an_ec_p384_key_signs_es384(fhir_base_url, tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    with SmartAuthServer() as server, FaultProxy(fhir_base_url, gate=server.gate) as proxy:
        server.register("ec-client", key.public_key(), "ec-1")
        auth = SmartBackendAuth(client_id="ec-client", private_key=_pem(key), key_id="ec-1", base_url=proxy.base_url)
        assert auth.algorithm == "ES384"
        with FhirClient(proxy.base_url, auth) as client:
            assert client.capabilities()["fhirVersion"] == "4.0.1"
        assert server.refusals == [] and len(server.live_tokens()) == 1


def test_the_token_is_cached_and_refreshed_before_it_expires(guarded, auth_server, rsa_key):
    offset = [0.0]
    auth = SmartBackendAuth(
        client_id=CLIENT_ID,
        private_key=_pem(rsa_key),
        key_id=KID,
        base_url=guarded.base_url,
        clock=lambda: time.time() + offset[0],
    )
    with FhirClient(guarded.base_url, auth) as client:
        for _ in range(5):
            client.capabilities()
        assert auth_server.token_requests == 1
        offset[0] = 70.0  # the 120 s token is refreshed from its 60th second on, before any request is refused
        client.capabilities()
        assert auth_server.token_requests == 2
    assert len(set(_bearers(guarded))) == 2


def test_a_revoked_token_is_replaced_once_then_the_error_says_revoked(guarded, auth_server, rsa_key):
    auth = SmartBackendAuth(client_id=CLIENT_ID, private_key=_pem(rsa_key), key_id=KID, base_url=guarded.base_url)
    with FhirClient(guarded.base_url, auth, sleep=lambda s: None) as client:
        client.capabilities()
        auth_server.revoke()
        client.capabilities()  # 401 → one fresh token → answered
        assert auth_server.token_requests == 2
        auth_server.revoke_on_issue = True  # access withdrawn: every token is refused by the resource server
        auth_server.revoke()
        with pytest.raises(AuthError) as err:
            client.capabilities()
    message = str(err.value)
    assert "HTTP 401" in message and "revoked" in message and "fresh token" in message
    assert auth_server.token_requests == 3  # exactly one re-authorisation per request, then the error
    assert_nothing_secret(_secrets(auth_server, rsa_key), [message])


def test_a_wrong_key_fails_saying_so_without_showing_a_secret(guarded, auth_server, other_rsa_key, rsa_key, tmp_path):
    wrong = tmp_path / "keys" / "wrong.pem"
    wrong.parent.mkdir()
    wrong.write_text(_pem(other_rsa_key))
    done = _cli(
        "export",
        "--fhir-url",
        guarded.base_url,
        "--auth",
        "smart",
        "--type",
        "Patient",
        "--out",
        str(tmp_path / "out"),
        env=_smart_env(wrong),
    )
    assert done.returncode == 3, done.stderr[-800:]  # credentials refused
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "error:" in x]
    assert "refused the client" in line and "signature" in line and "registered key" in line
    assert auth_server.refusals and "signature" in auth_server.refusals[0][1]
    assert_nothing_secret(_secrets(auth_server, rsa_key, other_rsa_key), [done.stdout, done.stderr], [tmp_path])


def test_an_expired_assertion_fails_saying_so(guarded, auth_server, rsa_key, caplog):
    caplog.set_level(logging.DEBUG)
    # A client clock ten minutes slow: its assertion's exp is already past for the server.
    auth = SmartBackendAuth(
        client_id=CLIENT_ID,
        private_key=_pem(rsa_key),
        key_id=KID,
        base_url=guarded.base_url,
        clock=lambda: time.time() - 600,
    )
    with FhirClient(guarded.base_url, auth) as client, pytest.raises(SmartAuthError) as err:
        client.capabilities()
    assert "expired" in str(err.value) and "invalid_client" in str(err.value)
    assert not any(p.endswith("/metadata") for _, p, _ in guarded.requests)  # nothing reached the FHIR server
    assert_nothing_secret(_secrets(auth_server, rsa_key), [str(err.value), caplog.text])


def test_the_authorization_server_really_verifies_assertions(auth_server, rsa_key):
    """The checks the client is tested against are real: a replayed jti and a wrong aud are refused."""

    def assertion(**changes):
        now = int(time.time())
        claims = {
            "iss": CLIENT_ID,
            "sub": CLIENT_ID,
            "aud": auth_server.token_url,
            "exp": now + 200,
            "jti": uuid.uuid4().hex,
            **changes,
        }
        return jwt.encode(claims, rsa_key, algorithm="RS384", headers={"kid": KID})

    def ask(signed):
        return requests.post(
            auth_server.token_url,
            timeout=10,
            data={
                "grant_type": "client_credentials",
                "scope": "system/Patient.rs",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": signed,
            },
        )

    once = assertion()
    assert ask(once).status_code == 200
    replay = ask(once)
    assert replay.status_code == 401 and "jti" in replay.json()["error_description"]
    assert "aud" in ask(assertion(aud="https://elsewhere.example/token")).json()["error_description"]
    assert "five minutes" in ask(assertion(exp=int(time.time()) + 3600)).json()["error_description"]
    unsigned = jwt.encode({"iss": CLIENT_ID}, "x" * 32, algorithm="HS256", headers={"kid": KID})
    assert "not allowed" in ask(unsigned).json()["error_description"]


def test_the_airflow_connection_takes_the_smart_settings(guarded, auth_server, key_file, rsa_key, monkeypatch):
    from leukofhir.airflow.hook import FhirHook

    extra = {
        "scheme": "http",
        "auth": "smart",
        "smart_client_id": CLIENT_ID,
        "smart_key_id": KID,
        "smart_private_key_path": str(key_file),
    }
    host, path = guarded.base_url.split("//", 1)[1].split("/", 1)
    hostname, port = host.split(":")
    monkeypatch.setenv(
        "AIRFLOW_CONN_FHIR_SMART",
        json.dumps({"conn_type": "fhir", "host": hostname, "port": int(port), "schema": path, "extra": extra}),
    )
    ok, message = FhirHook("fhir_smart").test_connection()
    assert ok, message
    # The key may also sit in the (masked, secrets-backend held) password field.
    del extra["smart_private_key_path"]
    monkeypatch.setenv(
        "AIRFLOW_CONN_FHIR_SMART_PW",
        json.dumps({"conn_type": "fhir", "host": guarded.base_url, "password": _pem(rsa_key), "extra": extra}),
    )
    with FhirHook("fhir_smart_pw").get_client() as client:
        assert client.count("Patient") >= 0
    assert auth_server.refusals == [] and auth_server.token_requests == 2
    assert_nothing_secret(_secrets(auth_server, rsa_key), [message])
