"""Safe retries through the fault proxy and the real server: what may already have changed the server is never
repeated blindly; idempotent writes and searches are; 409 on a conditional write is temporary; each retry is logged."""

from __future__ import annotations

import logging

import pytest

from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import FatalFhirError, OutcomeUnknownError, TemporaryFhirError
from support.faultproxy import Fault
from support.ports import is_listening, port_range

pytestmark = pytest.mark.fhir


@pytest.fixture
def client(proxy, sleeps):
    with FhirClient(proxy.base_url, timeout=1.5, max_retries=3, backoff=0.5, sleep=sleeps.append) as c:
        yield c


def _tagged_patient(unique, n=0):
    return {
        "resourceType": "Patient",
        "meta": {"tag": [{"system": "urn:test", "code": unique}]},
        "name": [{"family": f"Retry{n}"}],
    }


def _posts(proxy, path_end=""):
    return [p for m, p, _ in proxy.requests if m == "POST" and p.split("?")[0].endswith(path_end)]


def test_a_create_whose_answer_is_lost_is_not_repeated(proxy, client, sleeps, fhir_client, unique):
    proxy.add(Fault("late", seconds=3, method="POST"))  # the server creates it; the answer comes too late
    with pytest.raises(OutcomeUnknownError, match="may or may not have been applied"):
        client.request("POST", "Patient", json=_tagged_patient(unique))
    assert len(_posts(proxy)) == 1 and sleeps == []
    # Why: it was applied. Repeating it would have made a second Patient.
    assert fhir_client.count("Patient", {"_tag": f"urn:test|{unique}"}) == 1


@pytest.mark.parametrize(
    "status, retried", [(503, True), (429, True), (408, True), (500, False), (502, False), (504, False)]
)
def test_a_create_is_retried_only_when_the_server_says_it_did_nothing(proxy, client, sleeps, status, retried):
    proxy.add(Fault("status", status=status, method="POST"))
    if retried:
        assert client.request_json("POST", "Patient", json={"resourceType": "Patient"})["id"]
        assert len(_posts(proxy)) == 2 and sleeps == [0.5]
    else:
        with pytest.raises(OutcomeUnknownError, match=f"HTTP {status}"):
            client.request("POST", "Patient", json={"resourceType": "Patient"})
        assert len(_posts(proxy)) == 1 and sleeps == []


def test_a_transaction_of_puts_is_repeated_after_a_lost_answer(proxy, client, sleeps, fhir_client, unique):
    entries = [
        {
            "resource": {"resourceType": "Patient", "id": f"tx{i}-{unique}"},
            "request": {"method": "PUT", "url": f"Patient/tx{i}-{unique}"},
        }
        for i in range(2)
    ]
    entries.append(
        {
            "resource": dict(_tagged_patient(unique), resourceType="Patient"),
            "request": {"method": "PUT", "url": f"Patient?_tag=urn:test|{unique}"},
        }
    )
    proxy.add(Fault("late", seconds=3, method="POST"))
    answer = client.transaction(entries)
    assert [e["response"]["status"][:3] for e in answer["entry"]] == ["200"] * 3  # the first try had created them
    assert len(_posts(proxy)) == 2 and sleeps == [0.5]
    assert fhir_client.count("Patient", {"_tag": f"urn:test|{unique}"}) == 1


def test_a_transaction_with_a_create_is_not_repeated(proxy, client, sleeps, unique):
    entries = [{"resource": _tagged_patient(unique), "request": {"method": "POST", "url": "Patient"}}]
    proxy.add(Fault("reset", method="POST"))
    with pytest.raises(OutcomeUnknownError):
        client.transaction(entries)
    assert len(_posts(proxy)) == 1 and sleeps == []


def test_a_search_by_post_is_repeated(proxy, client, sleeps):
    proxy.add(Fault("reset", method="POST"))
    bundle = client.request_json("POST", "Patient/_search", data={"_count": "1"})
    assert bundle["resourceType"] == "Bundle" and len(_posts(proxy, "/_search")) == 2 and sleeps == [0.5]


def test_a_create_that_never_reached_the_server_is_retried(sleeps):
    closed = next(p for p in port_range() if not is_listening(p))
    with (
        FhirClient(f"http://127.0.0.1:{closed}/fhir", max_retries=2, backoff=0.5, sleep=sleeps.append) as c,
        pytest.raises(TemporaryFhirError, match="cannot connect"),
    ):
        c.request("POST", "Patient", json={"resourceType": "Patient"})
    assert sleeps == [0.5, 1.0]  # refused connections: nothing was sent, so trying again is safe


def test_409_is_temporary_for_a_conditional_write_only(proxy, client, sleeps, fhir_client, unique):
    pid = f"c409-{unique}"
    fhir_client.update({"resourceType": "Patient", "id": pid})
    flag = {
        "resourceType": "Flag",
        "status": "active",
        "code": {"text": "t"},
        "subject": {"reference": f"Patient/{pid}"},
        "identifier": [{"system": "urn:test", "value": unique}],
    }
    proxy.add(Fault("status", status=409, method="PUT"))
    answer = client.request_json("PUT", f"Flag?identifier=urn:test%7C{unique}", json=flag)
    assert answer["resourceType"] == "Flag" and sleeps == [0.5]

    entry = {"resource": flag, "request": {"method": "PUT", "url": f"Flag?identifier=urn:test%7C{unique}"}}
    proxy.add(Fault("status", status=409, method="POST"))
    client.transaction([entry])
    assert sleeps == [0.5, 0.5]

    proxy.add(Fault("status", status=409, method="PUT"))
    with pytest.raises(FatalFhirError) as err:
        client.update({"resourceType": "Patient", "id": pid})
    assert err.value.status == 409 and sleeps == [0.5, 0.5]


def test_each_retry_is_logged_with_method_url_attempt_and_wait_and_no_secret(proxy, client, caplog):
    caplog.set_level(logging.INFO)
    proxy.add(Fault("status", status=503, path_regex="/metadata"), Fault("reset", path_regex="/metadata"))
    client.request_json("GET", "metadata", params={"_format": "json", "access_token": "sekrit-in-query"})
    lines = [r.getMessage() for r in caplog.records if "retry" in r.getMessage() or "after" in r.getMessage()]
    assert lines[0] == (f"GET {proxy.base_url}/metadata?_format=json&access_token=***: HTTP 503; retry 1 of 3 in 0.5s")
    assert lines[1].endswith("the connection dropped before the answer; retry 2 of 3 in 1.0s")
    assert lines[2].endswith("answered after 2 retries (HTTP 503; the connection dropped before the answer)")
    assert "sekrit" not in caplog.text
