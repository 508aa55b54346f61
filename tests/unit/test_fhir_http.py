"""Retry policy and auth choice, table-driven; the behaviour on the wire is tested through the fault proxy."""

from __future__ import annotations

import pytest
from requests.auth import HTTPBasicAuth

from leukofhir.errors import UsageError
from leukofhir.fhir.auth import BearerAuth, make_auth
from leukofhir.fhir.errors import outcome_text
from leukofhir.fhir.http import MAX_RETRY_AFTER, is_temporary, retry_after_seconds, retry_delay


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_temporary(status):
    assert is_temporary(status)


@pytest.mark.parametrize("status", [200, 400, 401, 403, 404, 409, 410, 412, 422, 501])
def test_not_temporary(status):
    assert not is_temporary(status)


def test_retry_after_forms():
    assert retry_after_seconds("5") == 5.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_delay_backs_off_and_is_bounded():
    assert [retry_delay(a, None, 1.0) for a in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert retry_delay(20, None, 1.0) == MAX_RETRY_AFTER
    assert retry_delay(1, "3", 1.0) == 3.0
    assert retry_delay(1, "100000", 1.0) == MAX_RETRY_AFTER


def test_auth_from_environment_and_files(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    auth = make_auth(None, environ={"LEUKOFHIR_FHIR_TOKEN_FILE": str(token_file)})
    assert isinstance(auth, BearerAuth) and auth._token == "s3cret"
    token_file.write_text("rotated")
    auth.refresh()
    assert auth._token == "rotated"
    basic = make_auth(None, environ={"LEUKOFHIR_FHIR_USER": "u", "LEUKOFHIR_FHIR_PASSWORD": "p"})
    assert isinstance(basic, HTTPBasicAuth)
    assert make_auth(None, environ={}) is None


@pytest.mark.parametrize("kind, environ", [("bearer", {}), ("basic", {"LEUKOFHIR_FHIR_USER": "u"}), ("kerberos", {})])
def test_auth_refuses_incomplete_settings(kind, environ):
    with pytest.raises(UsageError):
        make_auth(kind, environ=environ)


def test_outcome_text():
    body = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "diagnostics": "bad ref"}, {"severity": "warning", "details": {"text": "odd"}}]}
    assert outcome_text(body) == "error: bad ref; warning: odd"
    assert outcome_text({"resourceType": "Patient"}) == "" and outcome_text(None) == ""
