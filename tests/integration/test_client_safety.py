"""Hostile or broken answers and settings (issue 9: 5, 10, 11, 12): typed one-line errors, no data or secret leaks.

Faults come from the fault proxy in front of the real server; a second proxy plays "another origin" and records
whatever reaches it."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys

import pytest

from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import FhirError, RedirectError, TemporaryFhirError
from support.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.fhir

HTML = "<html><body>Please log in</body></html>"


@pytest.fixture
def elsewhere(fhir_base_url):
    """Another origin (another port): anything the client sends here has leaked."""
    with FaultProxy(fhir_base_url) as p:
        yield p


@pytest.fixture
def client(proxy):
    with FhirClient(proxy.base_url, timeout=30, max_retries=2, backoff=0.01, sleep=lambda s: None) as c:
        yield c


def _cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "leukofhir.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


def _ndjson(path, resources):
    path.write_text("".join(json.dumps(r) + "\n" for r in resources))
    return path


# --- 9.5: a 200 answer that is not JSON -----------------------------------------------------------------------


def test_a_200_that_is_not_json_is_a_typed_error(proxy, client):
    proxy.add(Fault("status", status=200, body=HTML, headers={"Content-Type": "text/html"}, path_regex="/metadata"))
    with pytest.raises(FhirError) as err:
        client.capabilities()
    message = str(err.value)
    assert "not JSON" in message and "text/html" in message and "\n" not in message
    assert "Please log in" not in message  # the body may hold anything; the message says what it is, not what it holds


def test_a_200_that_is_json_but_not_an_object_is_a_typed_error(proxy, client):
    proxy.add(
        Fault(
            "status",
            status=200,
            body='["a", "list"]',
            headers={"Content-Type": "application/json"},
            path_regex="/Patient",
        )
    )
    with pytest.raises(FhirError, match="not a JSON object"):
        list(client.search("Patient", {"_count": 1}))


def test_load_ends_with_one_line_when_the_server_answers_html(proxy, unique, tmp_path):
    path = _ndjson(tmp_path / "p.ndjson", [{"resourceType": "Patient", "id": f"html-{unique}"}])
    proxy.add(Fault("status", status=200, body=HTML, headers={"Content-Type": "text/html"}, method="POST"))
    done = _cli("load", "--fhir-url", proxy.base_url, str(path))
    assert done.returncode == 4, done.stderr  # the server answered something unusable
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "not JSON" in errors[0]


# --- 9.10: redirects --------------------------------------------------------------------------------------------


def test_a_write_redirected_to_another_origin_sends_nothing_there(proxy, elsewhere, client, unique):
    proxy.add(Fault("status", status=307, headers={"Location": f"{elsewhere.base_url}/"}, method="POST"))
    entry = {
        "resource": {"resourceType": "Patient", "id": f"rd-{unique}"},
        "request": {"method": "PUT", "url": f"Patient/rd-{unique}"},
    }
    with pytest.raises(RedirectError) as err:
        client.transaction([entry])
    assert "another origin" in str(err.value)
    assert elsewhere.requests == []  # before the fix: the POST body with the resources arrived here


def test_a_read_redirected_to_another_origin_is_not_followed(proxy, elsewhere, client):
    proxy.add(Fault("status", status=302, headers={"Location": f"{elsewhere.base_url}/metadata"}, method="GET"))
    with pytest.raises(RedirectError, match="another origin"):
        client.capabilities()
    assert elsewhere.requests == []


def test_a_write_is_never_redirected_even_to_the_same_origin(proxy, client, unique):
    proxy.add(
        Fault("status", status=307, headers={"Location": f"{proxy.base_url}/Patient/moved-{unique}"}, method="PUT")
    )
    with pytest.raises(RedirectError, match="not followed"):
        client.update({"resourceType": "Patient", "id": f"rw-{unique}"})
    assert [m for m, p, _ in proxy.requests] == ["PUT"]


def test_a_read_redirected_on_the_same_origin_is_followed(proxy, client):
    proxy.add(
        Fault("status", status=302, headers={"Location": f"{proxy.base_url}/metadata?moved=1"}, path_regex="/metadata$")
    )
    assert client.capabilities()["resourceType"] == "CapabilityStatement"
    assert [p.rsplit("/", 1)[1] for _, p, _ in proxy.requests] == ["metadata", "metadata?moved=1"]


# --- 9.11: a secret with a trailing newline -----------------------------------------------------------------

TOKEN = "tok-9f2c1d7e5b3a"


def test_a_token_with_a_trailing_newline_works_and_is_never_printed(proxy, unique, tmp_path):
    path = _ndjson(tmp_path / "p.ndjson", [{"resourceType": "Patient", "id": f"nl-{unique}"}])
    done = _cli(
        "load", "--fhir-url", proxy.base_url, "--auth", "bearer", str(path), env={"LEUKOFHIR_FHIR_TOKEN": TOKEN + "\n"}
    )
    assert done.returncode == 0, done.stderr[-500:].replace(TOKEN, "<TOKEN>")
    assert TOKEN not in done.stdout + done.stderr
    assert {h.get("Authorization") for m, _, h in proxy.requests} == {f"Bearer {TOKEN}"}


@pytest.mark.parametrize("bad", [f"{TOKEN}\nsecond-line", f"{TOKEN} with spaces", f"{TOKEN}\x00"])
def test_a_malformed_token_is_refused_by_name_not_by_value(proxy, tmp_path, bad):
    path = _ndjson(tmp_path / "p.ndjson", [{"resourceType": "Patient", "id": "never-sent"}])
    token_file = tmp_path / "token"
    token_file.write_text(bad)
    done = _cli(
        "load",
        "--fhir-url",
        proxy.base_url,
        "--auth",
        "bearer",
        str(path),
        env={"LEUKOFHIR_FHIR_TOKEN_FILE": str(token_file)},
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "LEUKOFHIR_FHIR_TOKEN_FILE" in done.stderr
    assert TOKEN not in done.stdout + done.stderr
    assert proxy.requests == []


# --- 9.12: user:password@ in a base URL ----------------------------------------------------------------------

PASSWORD = "pw-71c3e0a9"


def test_userinfo_never_shows_in_warnings_or_errors(proxy, caplog):
    host = proxy.base_url.split("//", 1)[1]
    proxy.add(*[Fault("status", status=503, path_regex="/metadata") for _ in range(3)])
    caplog.set_level(logging.DEBUG)
    with FhirClient(f"http://nurse:{PASSWORD}@{host}", max_retries=2, sleep=lambda s: None) as c:
        with pytest.raises(TemporaryFhirError) as err:
            c.capabilities()
        shown = str(err.value) + caplog.text + c.base_url + repr(c.base_url)
    assert PASSWORD not in shown and "503" in str(err.value)
    assert "retry 1" in caplog.text
    # The credentials still work: they became basic auth, sent to the server only.
    sent = {h.get("Authorization") for _, _, h in proxy.requests}
    assert sent == {"Basic " + base64.b64encode(f"nurse:{PASSWORD}".encode()).decode()}


def test_the_cli_refuses_credentials_in_the_url_without_printing_them(proxy, tmp_path):
    host = proxy.base_url.split("//", 1)[1]
    path = _ndjson(tmp_path / "p.ndjson", [{"resourceType": "Patient", "id": "never-sent"}])
    proxy.add(*[Fault("status", status=503, method="POST") for _ in range(6)])
    done = _cli("load", "--fhir-url", f"http://nurse:{PASSWORD}@{host}", str(path))
    assert done.returncode == 2
    assert PASSWORD not in done.stdout + done.stderr
    assert "LEUKOFHIR_FHIR_PASSWORD" in done.stderr  # says where credentials go instead
    assert proxy.requests == []
