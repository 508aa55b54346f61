"""The real HAPI FHIR server through our client: capabilities, create, paging, conditional update, transactions."""

from __future__ import annotations

import json

import pytest

from leukofhir.fhir.errors import FatalFhirError

pytestmark = pytest.mark.fhir

SYSTEM = "https://leukofhir.org/fhir/test"


def _patient(pid: str, tag: str) -> dict:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"tag": [{"system": SYSTEM, "code": tag}]},
        "gender": "female",
        "birthDate": "1970-01-01",
    }


def test_capability_statement_is_fhir_401(fhir_client):
    cap = fhir_client.capabilities()
    assert cap["resourceType"] == "CapabilityStatement"
    assert cap["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in cap["rest"][0]["resource"]}
    assert {"Observation", "MedicationStatement", "Flag", "Patient"} <= types


def test_create_with_client_id_and_read_back(fhir_client, unique):
    written = fhir_client.update(_patient(f"p-{unique}", unique))
    assert written["id"] == f"p-{unique}"
    read = fhir_client.read("Patient", f"p-{unique}")
    assert read["birthDate"] == "1970-01-01"
    assert fhir_client.read("Patient", f"absent-{unique}") is None


def test_search_follows_next_links_across_pages(fhir_client, unique):
    ids = {f"pg{i}-{unique}" for i in range(7)}
    fhir_client.transaction(
        [{"resource": _patient(i, unique), "request": {"method": "PUT", "url": f"Patient/{i}"}} for i in sorted(ids)]
    )
    pages = list(fhir_client.search_pages("Patient", {"_tag": f"{SYSTEM}|{unique}", "_count": 3}))
    assert len(pages) == 3  # 3 + 3 + 1: every page was reached through link[next]
    found = [e["resource"]["id"] for p in pages for e in p.get("entry", [])]
    assert sorted(found) == sorted(ids)
    assert fhir_client.count("Patient", {"_tag": f"{SYSTEM}|{unique}"}) == 7


def test_conditional_update_by_identifier_never_duplicates(fhir_client, unique):
    fhir_client.update(_patient(f"f-{unique}", unique))
    identifier = {"system": "https://leukofhir.org/fhir/flag-episode", "value": unique}
    flag = {
        "resourceType": "Flag",
        "identifier": [identifier],
        "status": "active",
        "code": {"text": "test"},
        "subject": {"reference": f"Patient/f-{unique}"},
    }
    url = f"Flag?identifier={identifier['system']}|{unique}"
    first = fhir_client.request("PUT", url, json=flag).json()
    second = fhir_client.request("PUT", url, json=dict(flag, status="inactive")).json()
    assert first["id"] == second["id"]
    assert second["meta"]["versionId"] == "2"
    found = list(fhir_client.search("Flag", {"identifier": f"{identifier['system']}|{unique}"}))
    assert [f["status"] for f in found] == ["inactive"]


def test_flag_for_missing_patient_is_refused_with_the_servers_reason(fhir_client, unique):
    flag = {
        "resourceType": "Flag",
        "status": "active",
        "code": {"text": "test"},
        "subject": {"reference": f"Patient/missing-{unique}"},
    }
    with pytest.raises(FatalFhirError) as err:
        fhir_client.request("POST", "Flag", json=flag)
    assert err.value.status in (400, 404, 409, 422)
    assert f"missing-{unique}" in json.dumps(err.value.outcome)  # the server's reason, kept with the error
    assert "Flag.subject" in str(err.value)  # the message says where, not the text


def test_transaction_round_trip_resolves_internal_references(fhir_client, unique):
    bundle_entries = [
        {"resource": _patient(f"t-{unique}", unique), "request": {"method": "PUT", "url": f"Patient/t-{unique}"}},
        {
            "fullUrl": "urn:uuid:6c1b3e0a-0000-4000-8000-000000000001",
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "6690-2"}]},
                "subject": {"reference": f"Patient/t-{unique}"},
                "effectiveDateTime": "2024-01-02T03:04:05Z",
                "valueQuantity": {
                    "value": 3.1,
                    "unit": "10*3/uL",
                    "system": "http://unitsofmeasure.org",
                    "code": "10*3/uL",
                },
            },
            "request": {"method": "POST", "url": "Observation"},
        },
    ]
    response = fhir_client.transaction(bundle_entries)
    assert response["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in response["entry"]]
    assert statuses[0].startswith("201") and statuses[1].startswith("201")
    obs = list(fhir_client.search("Observation", {"subject": f"Patient/t-{unique}"}))
    assert len(obs) == 1 and obs[0]["valueQuantity"]["value"] == 3.1


def test_unknown_search_parameter_is_a_fatal_400(fhir_client):
    with pytest.raises(FatalFhirError) as err:
        list(fhir_client.search("Observation", {"no-such-param": "x"}))
    assert err.value.status == 400
