"""Retry policy, table-driven; the behaviour on the wire is tested through the fault proxy."""

from __future__ import annotations

import pytest

from leukofhir.fhir.errors import outcome_text
from leukofhir.fhir.http import (
    MAX_RETRY_AFTER,
    has_precondition,
    is_conditional_write,
    is_temporary,
    is_version_conflict,
    replay_safe,
    retry_after_seconds,
    retry_delay,
)


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


def test_outcome_text():
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "diagnostics": "bad ref"}, {"severity": "warning", "details": {"text": "odd"}}],
    }
    assert outcome_text(body) == "error: bad ref; warning: odd"
    assert outcome_text({"resourceType": "Patient"}) == "" and outcome_text(None) == ""


def _transaction(*methods_urls):
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": m, "url": u}} for m, u in methods_urls],
    }


@pytest.mark.parametrize(
    "method, url, body, safe",
    [
        ("GET", "https://h/fhir/Observation", None, True),
        ("PUT", "https://h/fhir/Flag?identifier=s%7Cv", {}, True),
        ("DELETE", "https://h/fhir/Flag/1", None, True),
        ("POST", "https://h/fhir/Observation/_search", None, True),
        ("POST", "https://h/fhir/", _transaction(("PUT", "Flag?identifier=s|v"), ("PUT", "Patient/1")), True),
        ("POST", "https://h/fhir/", _transaction(("PUT", "Patient/1"), ("POST", "Patient")), False),
        ("POST", "https://h/fhir/", _transaction(), False),
        ("POST", "https://h/fhir/Patient", {"resourceType": "Patient"}, False),
        ("POST", "https://h/fhir/$export", None, False),
        ("PATCH", "https://h/fhir/Patient/1", None, False),
    ],
)
def test_replay_safe(method, url, body, safe):
    assert replay_safe(method, url, body) is safe


@pytest.mark.parametrize(
    "method, url, body, headers, conditional",
    [
        ("PUT", "https://h/fhir/Flag?identifier=s%7Cv", None, None, True),
        ("PUT", "https://h/fhir/Flag/1", None, None, False),
        ("POST", "https://h/fhir/Flag", None, {"If-None-Exist": "identifier=s|v"}, True),
        ("POST", "https://h/fhir/", _transaction(("PUT", "Flag?identifier=s|v")), None, True),
        ("POST", "https://h/fhir/", _transaction(("PUT", "Flag/1")), None, False),
        ("POST", "https://h/fhir/Flag/_search?identifier=x", None, None, False),
    ],
)
def test_conditional_writes(method, url, body, headers, conditional):
    assert is_conditional_write(method, url, body, headers) is conditional
    assert is_temporary(409, conditional_write=conditional) is conditional


def _outcome(diagnostics):
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": diagnostics}],
    }


STALE = _outcome("HAPI-0550: HAPI-0989: Trying to update Flag/x/_history/1 but this is not the current version")
SAME_ID = _outcome(
    "HAPI-0550: HAPI-0825: Error flushing transaction with resource types: [Flag] - The operation has "
    "failed with a client-assigned ID constraint failure."
)
SAME_VERSION = _outcome(
    "HAPI-0550: HAPI-0823: Error flushing transaction with resource types: [Flag] - The operation "
    "has failed with a version constraint failure."
)
IN_USE = _outcome("HAPI-0550: HAPI-0515: Unable to delete Patient/p1 because at least one resource has a reference")


@pytest.mark.parametrize(
    "status, outcome, preconditioned, conflict, temporary",
    [
        (409, STALE, True, True, False),  # HAPI's answer to a stale If-Match
        (409, STALE, False, True, False),
        (412, None, True, True, False),  # the specification's answer to a stale If-Match
        (412, None, False, False, False),  # a conditional write matching several resources
        (409, SAME_ID, True, False, True),  # simultaneous creates at one id: the retry meets the winner's version
        (409, SAME_VERSION, True, False, True),
        (409, IN_USE, False, False, False),  # referential integrity: retrying cannot help
        (409, None, False, False, False),
    ],
)
def test_version_conflicts_are_told_apart_from_simultaneous_writers(
    status, outcome, preconditioned, conflict, temporary
):
    assert is_version_conflict(status, outcome, preconditioned=preconditioned) is conflict
    assert is_temporary(status, outcome=outcome) is temporary


def test_a_stale_version_is_never_temporary_even_for_a_conditional_write():
    assert not is_temporary(409, conditional_write=True, outcome=STALE)
    assert is_temporary(409, conditional_write=True, outcome=IN_USE)  # as before: any other 409 to one is retried


def test_a_precondition_is_a_header_or_an_entry_if_match():
    entry = {"request": {"method": "PUT", "url": "Flag/1", "ifMatch": 'W/"2"'}}
    assert has_precondition({"If-Match": 'W/"2"'}) and has_precondition({"if-match": 'W/"2"'})
    assert has_precondition(None, {"resourceType": "Bundle", "type": "transaction", "entry": [entry]})
    assert not has_precondition({"If-None-Match": "*"}, _transaction(("PUT", "Flag/1")))
