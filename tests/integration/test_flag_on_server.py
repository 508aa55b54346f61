"""Flags built by build_flag() go to the real HAPI server and come back as they were sent (clinical-rules §5)."""

from __future__ import annotations

import copy
import re

import pytest

from leukofhir.config import load_config
from leukofhir.evaluate.flag_resource import build_flag
from support.fhir_builders import at, flags_for, observation, patient, statement

pytestmark = pytest.mark.fhir

RULES = load_config()
# HAPI 8.8 also adds meta.source = "#" + a random request id of 16 characters (its default
# StoreMetaSourceInformation SOURCE_URI_AND_REQUEST_ID; "<source>#<id>" when the client sends a meta.source, "#<id>"
# from an X-Request-ID header). It is never what was sent, so a comparison of Flags must leave it out; an identical
# re-PUT keeps version and source (HAPI writes nothing), a changed one gets a new version and a new request id.
HAPI_SOURCE = re.compile(r"^#[A-Za-z0-9]{16}$")


def _author(client) -> None:
    """The Flags' author must exist before a Flag names it (referential integrity on write, as in production).
    The pipeline's write step ensures it (ensure_author); here a minimal Device, PUT so it is idempotent."""
    device_id = RULES.uris.author.split("/", 1)[1]
    client.request(
        "PUT",
        f"Device/{device_id}",
        json={
            "resourceType": "Device",
            "id": device_id,
            "deviceName": [{"name": "leukofhir rules engine", "type": "user-friendly-name"}],
        },
    )


def _without_server_fields(resource: dict) -> dict:
    """The resource without what the server adds: id, meta.versionId, meta.lastUpdated and HAPI's meta.source."""
    out = copy.deepcopy(resource)
    out.pop("id", None)
    meta = out.get("meta", {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    source = meta.pop("source", None)
    assert source is None or HAPI_SOURCE.match(source), source
    return out


def _put(client, resource: dict) -> None:
    client.request("PUT", f"{resource['resourceType']}/{resource['id']}", json=resource)


def test_flags_from_build_flag_are_stored_and_read_back_unchanged(fhir_client, unique):
    pid = f"Patient/fl-{unique}"
    resources = [
        patient(f"fl-{unique}", "1970-05-05", "female"),
        # leukopenia, transient: inactive with period.end, text with "—" and "×"
        observation(f"w1-{unique}", "wbc", 3.0, patient=pid, time=at(0)),
        observation(f"w2-{unique}", "wbc", 5.0, patient=pid, time=at(hours=24)),
        # agranulocytosis, active, drug-associated: the drug category and a flag-detail with display
        observation(f"a1-{unique}", "anc", 0.3, patient=pid, time=at(days=3)),
        statement(f"m1-{unique}", "Oxaliplatin 5 MG/ML Injectable Solution", start=at(days=-20), patient_ref=pid),
        # lymphopenia retracted: entered-in-error
        observation(f"l1-{unique}", "lymphocytes_abs", 0.4, patient=pid, time=at(days=4), status="entered-in-error"),
    ]
    specs = flags_for(resources)
    assert {(s.condition, s.status) for s in specs} == {
        ("leukopenia", "inactive"),
        ("agranulocytosis", "active"),
        ("lymphopenia", "entered-in-error"),
    }
    _author(fhir_client)
    for resource in resources:
        _put(fhir_client, resource)
    for spec in specs:
        sent = build_flag(spec, RULES)
        identifier = sent["identifier"][0]
        written = fhir_client.request(
            "PUT", f"Flag?identifier={identifier['system']}|{identifier['value']}", json=sent
        ).json()
        read = fhir_client.read("Flag", written["id"])
        assert _without_server_fields(read) == sent, spec.condition
        assert read["meta"]["versionId"] == "1" and read["meta"]["lastUpdated"]
        # The same Flag again (a re-run): the server stores nothing new.
        again = fhir_client.request(
            "PUT", f"Flag?identifier={identifier['system']}|{identifier['value']}", json=sent
        ).json()
        assert again["id"] == written["id"] and fhir_client.read("Flag", written["id"]) == read
