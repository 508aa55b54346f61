"""Critical results reach the care team: a run writes one CommunicationRequest per grade-4 Flag episode on the real
server, however many runs (at once or one after another), and revokes it when the Flag is withdrawn."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from leukofhir.config import load_config
from leukofhir.fhir.client import FhirClient
from leukofhir.run import run_pipeline
from leukofhir.write.alerts import request_id
from support.fhir_builders import days_ago, observation, patient
from support.server_data import project_flags, put

pytestmark = pytest.mark.fhir


def _requests(client, pid: str) -> list[dict]:
    return list(client.search("CommunicationRequest", {"subject": f"Patient/{pid}", "_count": 50}))


def _run(base_url, rules, folder, patients):
    with FhirClient(base_url, timeout=120, backoff=0.01) as client:
        return run_pipeline(client, rules, folder, patients=patients)


def test_a_grade_4_flag_has_exactly_one_request_after_any_number_of_runs(
    fhir_base_url, fhir_client, unique, own_tag, tmp_path
):
    config, patients = own_tag
    rules = load_config(config)
    pid, mild = f"crit-{unique}", f"mild-{unique}"
    patients += [pid, mild]
    ref = f"Patient/{pid}"
    gp = {"resourceType": "Practitioner", "id": f"gp-{unique}", "name": [{"family": "Example"}]}
    person = dict(patient(pid), generalPractitioner=[{"reference": f"Practitioner/gp-{unique}"}])
    put(
        fhir_client,
        gp,
        person,
        patient(mild),
        observation(f"{pid}-1", "anc", 2.2, time=days_ago(30), patient=ref),
        observation(f"{pid}-2", "anc", 0.45, time=days_ago(6), patient=ref),
        observation(f"{pid}-3", "anc", 0.2, time=days_ago(4), patient=ref),
        observation(f"{pid}-4", "anc", 0.4, time=days_ago(2), patient=ref),
        observation(f"{mild}-1", "wbc", 1.6, time=days_ago(3), patient=f"Patient/{mild}"),
    )

    # Two runs at once, then two more: one request, written by exactly one of them.
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda n: _run(fhir_base_url, rules, tmp_path / f"run-{n}", [pid, mild]), (1, 2)))
    reports += [_run(fhir_base_url, rules, tmp_path / f"run-{n}", [pid, mild]) for n in (3, 4)]
    assert [r["status"] for r in reports] == ["done"] * 4
    assert sum(r["writes"]["alert_create"] for r in reports) == 1
    assert reports[-1]["writes"]["alert_create"] == reports[-1]["writes"]["alert_revoke"] == 0

    (flag,) = [f for f in project_flags(fhir_client, [pid], rules)]
    (request,) = _requests(fhir_client, pid)
    assert _requests(fhir_client, mild) == []  # grade 3 is not a critical result
    identifier = flag["identifier"][0]["value"]
    assert request["id"] == request_id(identifier) and request["meta"]["versionId"] == "1"
    assert (request["status"], request["priority"]) == ("active", "stat")
    assert request["category"][0]["coding"][0]["code"] == "alert"
    assert request["subject"] == {"reference": ref}
    assert request["about"] == [{"reference": f"Flag/{flag['id']}"}, {"reference": f"Observation/{pid}-3"}]
    assert request["recipient"] == [{"reference": f"Practitioner/gp-{unique}"}]
    assert request["payload"] == [{"contentString": flag["code"]["text"]}]

    # The low results turn out to be a mistake: the Flag is withdrawn and its request revoked, once.
    put(
        fhir_client,
        *(observation(f"{pid}-{n}", "anc", 2.0, time=days_ago(d), patient=ref) for n, d in ((2, 6), (3, 4), (4, 2))),
    )
    withdrawn = _run(fhir_base_url, rules, tmp_path / "run-5", [pid])
    assert (withdrawn["writes"]["withdraw"], withdrawn["writes"]["alert_revoke"]) == (1, 1)
    (request,) = _requests(fhir_client, pid)
    assert request["status"] == "revoked"
    again = _run(fhir_base_url, rules, tmp_path / "run-6", [pid])
    assert again["writes"]["alert_revoke"] == again["writes"]["alert_create"] == 0
    assert _requests(fhir_client, pid)[0]["meta"]["versionId"] == request["meta"]["versionId"]


def test_a_site_can_turn_the_requests_off(fhir_base_url, fhir_client, unique, own_tag, tmp_path):
    config, patients = own_tag
    config.write_text(
        config.read_text(encoding="utf-8").replace("communication_requests: true", "communication_requests: false"),
        encoding="utf-8",
    )
    rules = load_config(config)
    pid = f"off-{unique}"
    patients.append(pid)
    put(fhir_client, patient(pid), observation(f"{pid}-1", "wbc", 0.6, time=days_ago(2), patient=f"Patient/{pid}"))
    report = _run(fhir_base_url, rules, tmp_path / "run", [pid])
    assert report["writes"]["create"] == 1 and report["writes"]["alert_create"] == 0
    assert _requests(fhir_client, pid) == []


def test_a_server_refusing_the_requests_does_not_fail_the_run(fhir_base_url, fhir_client, unique, own_tag, tmp_path):
    """The Flags are written and the run is done; the next run creates the missing request."""
    from support.faultproxy import Fault, FaultProxy

    config, patients = own_tag
    rules = load_config(config)
    pid = f"refused-{unique}"
    patients.append(pid)
    put(fhir_client, patient(pid), observation(f"{pid}-1", "anc", 0.3, time=days_ago(2), patient=f"Patient/{pid}"))
    with FaultProxy(fhir_base_url) as proxy:
        proxy.add(
            Fault(
                "status",
                status=403,
                method="GET",
                path_regex=r"/CommunicationRequest",
                body='{"resourceType": "OperationOutcome", "issue": [{"severity": "error", '
                '"code": "forbidden", "diagnostics": "no scope for CommunicationRequest"}]}',
                headers={"Content-Type": "application/fhir+json"},
            )
        )
        refused = _run(proxy.base_url, rules, tmp_path / "run-1", [pid])
    assert refused["status"] == "done"
    assert (refused["writes"]["create"], refused["writes"]["alert_refused"], refused["writes"]["alert_create"]) == (
        1,
        1,
        0,
    )
    assert _requests(fhir_client, pid) == []
    later = _run(fhir_base_url, rules, tmp_path / "run-2", [pid])
    assert (later["writes"]["alert_create"], later["writes"]["alert_refused"]) == (1, 0)
    (request,) = _requests(fhir_client, pid)
    fhir_client.request("DELETE", f"CommunicationRequest/{request['id']}")
