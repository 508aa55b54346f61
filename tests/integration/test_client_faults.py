"""Faults made by a proxy in front of the real server: what the client retries, what it refuses, what it reports."""

from __future__ import annotations

import pytest

from leukofhir.fhir.auth import BearerAuth
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import AuthError, FatalFhirError, ForeignLinkError, TemporaryFhirError
from support.faultproxy import Fault

pytestmark = pytest.mark.fhir


@pytest.fixture
def client(proxy, sleeps):
    with FhirClient(proxy.base_url, timeout=30, max_retries=3, backoff=0.5, sleep=sleeps.append) as c:
        yield c


@pytest.mark.parametrize(
    "status, retried",
    [
        (408, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (400, False),
        (404, False),
        (409, False),
        (412, False),
        (422, False),
    ],
)
def test_status_classification(proxy, client, sleeps, status, retried):
    proxy.add(Fault("status", status=status, path_regex="/metadata"))
    if retried:
        assert client.capabilities()["fhirVersion"] == "4.0.1"  # the second try reached the real server
        assert sleeps == [0.5]
    else:
        with pytest.raises(FatalFhirError) as err:
            client.capabilities()
        assert err.value.status == status and sleeps == []


def test_retry_budget_is_bounded_and_backs_off(proxy, client, sleeps):
    proxy.add(*[Fault("status", status=503, path_regex="/metadata") for _ in range(4)])
    with pytest.raises(TemporaryFhirError, match="503"):
        client.capabilities()
    assert sleeps == [0.5, 1.0, 2.0]
    assert sum(1 for m, p, _ in proxy.requests if p.endswith("/metadata")) == 4


def test_retry_after_is_honoured_but_bounded(proxy, client, sleeps):
    proxy.add(
        Fault("status", status=429, headers={"Retry-After": "7"}, path_regex="/metadata"),
        Fault("status", status=503, headers={"Retry-After": "3600"}, path_regex="/metadata"),
    )
    client.capabilities()
    assert sleeps == [7.0, 60.0]


def test_connection_reset_is_retried(proxy, client, sleeps):
    proxy.add(Fault("reset", path_regex="/metadata"))
    assert client.capabilities()["resourceType"] == "CapabilityStatement"
    assert len(sleeps) == 1


def test_operation_outcome_reaches_the_error_its_text_only_the_exception(proxy, client):
    outcome = (
        '{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing",'
        '"diagnostics":"HAPI-0000: the server says no to Patient.birthDate \\"1970-01-01\\""}]}'
    )
    proxy.add(
        Fault(
            "status", status=422, body=outcome, headers={"Content-Type": "application/fhir+json"}, path_regex="/Patient"
        )
    )
    with pytest.raises(FatalFhirError, match=r"HTTP 422: error processing at Patient.birthDate \[HAPI-0000\]") as err:
        list(client.search("Patient", {"_count": 1}))
    # The message carries codes, paths and message ids; the text (which may quote patient data) stays in .outcome.
    assert "1970-01-01" not in str(err.value) and "says no" not in str(err.value)
    assert "the server says no" in err.value.outcome["issue"][0]["diagnostics"]


def test_next_link_to_another_origin_is_refused(proxy, client, fhir_client, unique):
    for i in range(3):
        fhir_client.update(
            {
                "resourceType": "Patient",
                "id": f"fl{i}-{unique}",
                "meta": {"tag": [{"system": "urn:test", "code": unique}]},
            }
        )
    host = proxy.base_url.split("//")[1].split("/")[0]
    proxy.add(
        Fault(
            "rewrite",
            pattern=f'"url" ?: ?"http://{host}',
            replacement='"url":"https://evil.example',
            path_regex="/Patient",
        )
    )
    pages = client.search_pages("Patient", {"_tag": f"urn:test|{unique}", "_count": 1})
    with pytest.raises(ForeignLinkError):
        list(pages)
    assert not any("evil" in p for _, p, _ in proxy.requests)


def test_401_reauthorises_once_without_counting_a_retry(proxy, sleeps):
    tokens = iter(["expired", "fresh", "fresh"])
    auth = BearerAuth(lambda: next(tokens))
    proxy.add(Fault("status", status=401, path_regex="/metadata"))
    with FhirClient(proxy.base_url, auth, sleep=sleeps.append) as c:
        c.capabilities()
    sent = [h.get("Authorization") for _, p, h in proxy.requests if p.endswith("/metadata")]
    assert sent == ["Bearer expired", "Bearer fresh"] and sleeps == []
    proxy.add(Fault("status", status=401, path_regex="/metadata"), Fault("status", status=401, path_regex="/metadata"))
    with FhirClient(proxy.base_url, auth, sleep=sleeps.append) as c, pytest.raises(AuthError):
        c.capabilities()


def test_incremental_searches_bypass_the_server_cache(proxy, client):
    list(client.search("Patient", {"_count": 1}))
    searches = [h for _, p, h in proxy.requests if "/Patient" in p]
    assert searches and all(h.get("Cache-Control") == "no-cache" for h in searches)
