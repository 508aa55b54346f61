"""`leukofhir conformance` against the real HAPI server: the resources load, and a second run changes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from leukofhir.config import load_config
from leukofhir.conformance.publish import publish
from leukofhir.conformance.resources import conformance_resources
from support.site_rules import rules_with_base

pytestmark = pytest.mark.fhir

CLI = [sys.executable, "-m", "leukofhir.cli"]


def _history(client, resource: dict) -> int:
    bundle = client.request_json(
        "GET", f"{resource['resourceType']}/{resource['id']}/_history", headers={"Cache-Control": "no-cache"}
    )
    return len(bundle.get("entry") or [])


def test_the_command_loads_the_resources_once_and_a_second_run_writes_nothing(
    fhir_base_url, fhir_client, unique, tmp_path
):
    base = f"https://site-{unique}.example/leukofhir"  # the test's own resources on the session's server
    config = rules_with_base(tmp_path, base)
    resources = conformance_resources(load_config(config))
    runs = [
        subprocess.run(
            [*CLI, "conformance", "--fhir-url", fhir_base_url, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        for _ in range(2)
    ]
    for done in runs:
        assert done.returncode == 0, done.stderr[-2000:]
    first, second = ([line.split()[:2] for line in done.stdout.splitlines()] for done in runs)
    assert first == [[f"{r['resourceType']}/{r['id']}", "created"] for r in resources]
    assert second == [[f"{r['resourceType']}/{r['id']}", "unchanged"] for r in resources]
    for resource in resources:
        stored = fhir_client.read(resource["resourceType"], resource["id"])
        assert {k: v for k, v in stored.items() if k != "meta"} == resource
        assert stored["meta"]["versionId"] == "1" and _history(fhir_client, resource) == 1


def test_a_resource_changed_on_the_server_is_put_back_over_its_version(fhir_client, unique, tmp_path):
    rules = load_config(rules_with_base(tmp_path, f"https://site-{unique}.example/leukofhir"))
    publish(fhir_client, rules)
    profile = conformance_resources(rules)[2]
    fhir_client.update({**profile, "description": "edited by hand"})
    results = publish(fhir_client, rules)
    assert [r.action for r in results] == ["unchanged", "unchanged", "updated"]
    assert results[2].version == "3"
    assert fhir_client.read("StructureDefinition", profile["id"])["description"] == profile["description"]
    assert [r.action for r in publish(fhir_client, rules)] == ["unchanged"] * 3


def test_a_resource_loaded_by_hand_at_another_id_is_updated_where_it_is(fhir_client, unique, tmp_path):
    """HAPI keeps one ValueSet per URL and version (HAPI-0902): a second one at our id would be refused."""
    rules = load_config(rules_with_base(tmp_path, f"https://site-{unique}.example/leukofhir"))
    value_set = conformance_resources(rules)[0]
    by_hand = {**value_set, "id": f"by-hand-{unique}", "title": "loaded by hand"}
    fhir_client.update(by_hand)
    results = publish(fhir_client, rules)
    assert (results[0].id, results[0].action) == (f"by-hand-{unique}", "updated")
    assert fhir_client.read("ValueSet", value_set["id"]) is None
    assert fhir_client.read("ValueSet", by_hand["id"])["title"] == value_set["title"]
