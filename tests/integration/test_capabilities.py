"""The capability check against the real server's CapabilityStatement, and against edited copies of it served by
the fault proxy: everything missing is named in one error, before anything is read or written."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from leukofhir.fhir.capabilities import REQUIRED_SEARCH, check_capabilities, missing_capabilities
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import CapabilityError
from support.faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.fhir


@pytest.fixture(scope="module")
def statement(fhir_base_url):
    with FhirClient(fhir_base_url) as client:
        return client.capabilities()


def _resource(statement, rtype):
    return next(r for r in statement["rest"][0]["resource"] if r["type"] == rtype)


def _without_param(statement, rtype, name):
    resource = _resource(statement, rtype)
    resource["searchParam"] = [p for p in resource["searchParam"] if p["name"] != name]


def test_the_local_hapi_server_declares_everything(fhir_client):
    statement = check_capabilities(fhir_client, need_export=True)
    assert statement["fhirVersion"] == "4.0.1"
    for level in ("patient", "group"):
        check_capabilities(fhir_client, need_export=level, resource_types=[])


def test_each_missing_thing_is_named(statement):
    edited = copy.deepcopy(statement)
    edited["fhirVersion"] = "3.0.2"
    _without_param(edited, "Observation", "date")
    _without_param(edited, "Flag", "_tag")
    _without_param(edited, "Flag", "date")  # the lapse sweep's search for open Flags
    for name in ("subject", "patient"):
        _without_param(edited, "MedicationRequest", name)
    _resource(edited, "Flag")["interaction"] = [
        i for i in _resource(edited, "Flag")["interaction"] if i["code"] != "update"
    ]
    _resource(edited, "Flag")["versioning"] = "versioned"  # versions kept, If-Match not honoured
    _resource(edited, "Observation")["interaction"] = [
        i for i in _resource(edited, "Observation")["interaction"] if i["code"] != "history-type"
    ]
    edited["rest"][0]["operation"] = [o for o in edited["rest"][0]["operation"] if o["name"] != "export"]
    edited["rest"][0]["resource"] = [r for r in edited["rest"][0]["resource"] if r["type"] != "MedicationStatement"]
    missing = missing_capabilities(edited, need_export=True, history_types=["Observation"])
    assert missing == [
        "FHIR R4 (4.0.x); the server declares fhirVersion 3.0.2",
        "search Observation by date",
        "search MedicationRequest by subject or patient",
        "MedicationStatement (not among the server's resources)",
        "search Flag by _tag",
        "search Flag by date",
        "history of Observation (Observation/_history, which lists deletions)",
        "update of Flag (PUT Flag/[id])",
        "versioned update of Flag (If-Match; CapabilityStatement versioning versioned-update)",
        "Bulk Data $export at system level",
    ]


def test_parameters_declared_for_all_resources_count(statement):
    edited = copy.deepcopy(statement)
    for rtype in REQUIRED_SEARCH:
        _without_param(edited, rtype, "_lastUpdated")
    assert "search Observation by _lastUpdated" in missing_capabilities(edited)
    edited["rest"][0]["searchParam"] = [{"name": "_lastUpdated", "type": "date"}]
    assert missing_capabilities(edited) == []


def test_resource_types_and_write_flags_narrow_the_check(statement):
    edited = copy.deepcopy(statement)
    _resource(edited, "Flag")["interaction"] = [
        i for i in _resource(edited, "Flag")["interaction"] if i["code"] != "update"
    ]
    _without_param(edited, "Flag", "_tag")
    assert missing_capabilities(edited, resource_types=["Observation"]) == []
    assert missing_capabilities(edited, resource_types=["Flag"], write_flags=False) == ["search Flag by _tag"]
    assert missing_capabilities(edited, resource_types=[], need_export="group") == []


def test_a_lacking_server_is_refused_before_anything_else(fhir_base_url, statement, tmp_path):
    edited = copy.deepcopy(statement)
    _resource(edited, "Group")["operation"] = [
        o for o in _resource(edited, "Group")["operation"] if o["name"] != "export"
    ]
    with FaultProxy(fhir_base_url) as proxy:
        proxy.add(
            Fault(
                "status",
                status=200,
                body=json.dumps(edited),
                path_regex="/metadata",
                headers={"Content-Type": "application/fhir+json"},
            )
        )
        with FhirClient(proxy.base_url) as client, pytest.raises(CapabilityError) as err:
            check_capabilities(client, need_export="group", resource_types=[])
        assert err.value.missing == ["Bulk Data $export at group level (Group/…/$export)"]
        assert "lacks what leukofhir needs" in str(err.value)

        proxy.add(
            Fault(
                "status",
                status=200,
                body=json.dumps(edited),
                path_regex="/metadata",
                headers={"Content-Type": "application/fhir+json"},
            )
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "leukofhir.cli",
                "export",
                "--fhir-url",
                proxy.base_url,
                "--group",
                "g1",
                "--out",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ),
        )
        assert done.returncode == 4 and "Bulk Data $export at group level" in done.stderr  # server lacking
        assert [p for _, p, _ in proxy.requests if "metadata" not in p] == []  # no kick-off, no read
