"""`leukofhir run` through the fault proxy in front of the real server ends with exactly the Flags of a clean run."""

from __future__ import annotations

import json

import pytest

from leukofhir.config import load_config
from leukofhir.evaluate.pipeline import evaluate_files
from leukofhir.fhir.client import FhirClient
from leukofhir.run import run_pipeline
from support.faultproxy import Fault, FaultProxy
from support.fhir_builders import at, observation, patient, report, statement
from support.server_data import flags_by_identifier, project_flags, put

pytestmark = pytest.mark.fhir

RULES = load_config()


def _patients(unique: str) -> tuple[list[str], list[dict]]:
    """Eight patients: leukopenia that recovers, neutropenia on clozapine, pancytopenia in one report, normal."""
    pids = [f"flt{n}-{unique}" for n in range(8)]
    resources: list[dict] = []
    for n, pid in enumerate(pids):
        ref = f"Patient/{pid}"
        resources.append(patient(pid, birth=f"19{50 + n}-04-0{1 + n % 8}", gender="male" if n % 2 else "female"))
        obs = [
            observation(f"{pid}-w{d}", "wbc", value, time=at(days=d), patient=ref)
            for d, value in ((0, 3.0 - n * 0.2), (4, 5.0 + n), (30, 2.5))
        ]
        obs += [
            observation(f"{pid}-a{d}", "anc", value, time=at(days=d), patient=ref) for d, value in ((0, 0.9), (6, 1.8))
        ]
        obs += [
            observation(f"{pid}-h", "hemoglobin", 8.5, time=at(days=30), patient=ref),
            observation(f"{pid}-p", "platelets", 60, time=at(days=30), patient=ref),
        ]
        resources += obs
        resources.append(report(f"{pid}-r", [f"{pid}-w30", f"{pid}-h", f"{pid}-p"], time=at(days=30), patient_ref=ref))
        if n % 3 == 0:
            resources.append(statement(f"{pid}-m", "Clozapine 100 MG Oral Tablet", start=at(days=-60), patient_ref=ref))
    return pids, resources


@pytest.fixture
def small_pages(monkeypatch):
    """Pages of 10 resources: the faults land on `next` links as well as on first pages."""
    monkeypatch.setattr("leukofhir.extract.search.PAGE_SIZE", 10)


def test_retries_and_lost_answers_end_with_the_flags_of_a_clean_run(
    fhir_base_url, fhir_client, unique, tmp_path, small_pages
):
    pids, resources = _patients(unique)
    put(fhir_client, *resources)

    with FaultProxy(fhir_base_url) as proxy:
        proxy.add(
            Fault("status", status=429, headers={"Retry-After": "1"}, path_regex=r"/Observation\?"),
            Fault("status", status=503, path_regex=r"/Patient\?"),
            Fault("reset", path_regex=r"/MedicationStatement\?"),
            Fault("truncate", path_regex=r"_getpages="),  # a next page cut off mid-transfer
            Fault("truncate", path_regex=r"/Flag\?"),
            Fault("drop", method="POST", path_regex=r"/fhir/?$"),  # the first transaction applied, its answer lost
            Fault("status", status=502, method="POST", path_regex=r"/fhir/?$"),
        )
        with FhirClient(proxy.base_url, backoff=0.01) as client:
            done = run_pipeline(client, RULES, tmp_path / "faulty", patients=pids, batch_size=3)
        assert not proxy.faults, f"faults never triggered: {list(proxy.faults)}"
    assert done["writes"]["refused"] == 0 and done["reconciled"]
    # The Flags the rules want, from the same resources evaluated offline as of the run's time (v1.3 §4).
    source = tmp_path / "patients.ndjson"
    source.write_text("".join(json.dumps(r) + "\n" for r in resources))
    evaluate_files([source], tmp_path / "offline", as_of=done["as_of"], progress=False)
    expected = flags_by_identifier([json.loads(line) for line in (tmp_path / "offline" / "Flag.ndjson").open()])
    assert len(expected) >= 16
    assert flags_by_identifier(project_flags(fhir_client, pids)) == expected

    with FhirClient(fhir_base_url) as client:
        again = run_pipeline(client, RULES, tmp_path / "clean", patients=pids, batch_size=3)
    assert again["writes"]["create"] == again["writes"]["update"] == again["writes"]["withdraw"] == 0
    assert again["writes"]["unchanged"] == len(expected)
