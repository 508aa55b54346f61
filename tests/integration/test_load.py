"""`leukofhir load` against the real server: sample data twice changes nothing; refusals are reported, not fatal."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXTERNAL

from leukofhir.write.load import load_files

pytestmark = pytest.mark.fhir

SYNTHEA_BUNDLES = sorted((EXTERNAL / "smart-generated-sample-data-R4-synthea" / "bundles").glob("*.json.gz"))


def _bundle_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in SYNTHEA_BUNDLES:
        with gzip.open(path, "rt") as fh:
            for entry in json.load(fh)["entry"]:
                rtype = entry["resource"]["resourceType"]
                counts[rtype] = counts.get(rtype, 0) + 1
    return counts


def _server_counts(client, patient_ids) -> dict[str, int]:
    ids = ",".join(patient_ids)
    return {
        "Patient": client.count("Patient", {"_id": ids}),
        "Observation": client.count("Observation", {"subject": ",".join(f"Patient/{i}" for i in patient_ids)}),
        "Encounter": client.count("Encounter", {"subject": ",".join(f"Patient/{i}" for i in patient_ids)}),
    }


def test_synthea_bundles_load_twice_with_the_same_counts_and_versions(fhir_client):
    expected = _bundle_counts()
    first = load_files(fhir_client, SYNTHEA_BUNDLES, batch_size=250)
    assert first.ok, first.rejected[:3]
    assert dict(first.read) == expected and dict(first.written) == expected
    patient_ids = sorted(json.load(gzip.open(p, "rt"))["entry"][0]["resource"]["id"] for p in SYNTHEA_BUNDLES)
    counts = _server_counts(fhir_client, patient_ids)
    assert counts == {k: expected[k] for k in counts}
    sample = next(iter(fhir_client.search("Observation", {"subject": f"Patient/{patient_ids[0]}", "_count": 1})))

    second = load_files(fhir_client, SYNTHEA_BUNDLES, batch_size=250)
    assert second.ok and dict(second.written) == expected
    assert _server_counts(fhir_client, patient_ids) == counts
    again = fhir_client.read("Observation", sample["id"])
    # HAPI suppresses no-op updates: the same content keeps the same version, so nothing changed.
    assert again["meta"]["versionId"] == sample["meta"]["versionId"]


def _ndjson(path, resources):
    path.write_text("".join(json.dumps(r) + "\n" for r in resources))
    return path


def _obs(oid, subject):
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "6690-2"}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2024-05-01T08:00:00Z",
        "valueQuantity": {"value": 2.5, "unit": "10*3/uL"},
    }


def test_rejected_resource_is_reported_and_the_rest_is_loaded(fhir_client, unique, tmp_path):
    pid = f"ld-{unique}"
    path = _ndjson(
        tmp_path / "mixed.ndjson",
        [
            _obs(f"ok1-{unique}", f"urn:uuid:{pid}"),  # Synthea-style reference, rewritten to Patient/<id>
            _obs(f"bad-{unique}", f"Patient/nobody-{unique}"),  # referential integrity: no such patient
            {"resourceType": "Patient", "id": pid},
            _obs(f"ok2-{unique}", f"Patient/{pid}"),
        ],
    )
    (tmp_path / "broken.ndjson").write_text('{"resourceType": "Patient", "id": "x"\n')
    report = load_files(fhir_client, [path, tmp_path / "broken.ndjson"], batch_size=10, run_dir=tmp_path / "run")
    rejected = dict(report.rejected)
    assert set(rejected) == {f"Observation/bad-{unique}", f"{tmp_path / 'broken.ndjson'}:1"}
    # Shown: the status, issue code, element path and HAPI's message id; the server's own words in the rejects file.
    assert rejected[f"Observation/bad-{unique}"] == "HTTP 400: error processing at Observation.subject [HAPI-1094]"
    rejects = [json.loads(x) for x in (tmp_path / "run" / "rejects.ndjson").read_text().splitlines()]
    assert [r["resource"] for r in rejects] == [f"{tmp_path / 'broken.ndjson'}:1", f"Observation/bad-{unique}"]
    assert f"nobody-{unique}" in rejects[1]["outcome"]["issue"][0]["diagnostics"]
    assert report.written["Observation"] == 2 and report.written["Patient"] == 1
    ok1 = fhir_client.read("Observation", f"ok1-{unique}")
    assert ok1["subject"]["reference"] == f"Patient/{pid}"
    assert fhir_client.read("Observation", f"bad-{unique}") is None


def test_load_command_exit_code_and_summary(fhir_base_url, unique, tmp_path):
    path = _ndjson(tmp_path / "one.ndjson", [{"resourceType": "Patient", "id": f"cli-{unique}"}])
    ok = subprocess.run(
        [sys.executable, "-m", "leukofhir.cli", "load", "--fhir-url", fhir_base_url, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "read 1 resources, wrote 1, rejected 0" in ok.stdout
    bad = _ndjson(tmp_path / "bad.ndjson", [_obs(f"o-{unique}", f"Patient/none-{unique}")])
    refused = subprocess.run(
        [sys.executable, "-m", "leukofhir.cli", "load", "--fhir-url", fhir_base_url, str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 1
    assert f"REJECTED Observation/o-{unique}" in refused.stdout


def test_demo_loads_the_sample_runs_the_backfill_dag_and_prints_the_flags_read_back(fhir_base_url, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "leukofhir.cli", "demo", "--fhir-url", fhir_base_url, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    assert "read 2084 resources, wrote 2084, rejected 0" in done.stdout
    assert "(FHIR 4.0.1)" in done.stdout
    assert "sample patients' WBC results: 25, of which below 4.0 ×10^9/L: 17" in done.stdout
    assert "running the Airflow DAG leukopenia_backfill" in done.stdout
    assert "conformance resources (leukofhir conformance): ValueSet/leukofhir-conditions-" in done.stdout
    # The Flags are printed from the server's answer: each line names its Flag/<id> there.
    shown = done.stdout.split("read back from", 1)[1]
    assert shown.count("(Flag/") == 7
    assert "possibly drug-associated: antineoplastic chemotherapy (oxaliplatin)" in shown
    report = shown.rsplit("run report: ", 1)[1].strip()
    assert report.endswith("report.html") and Path(report).exists()


def test_workers_load_what_one_worker_loads_targets_first_and_the_refused_entry_alone(fhir_client, unique, tmp_path):
    # Transactions of 2 sent 3 at a time: every Patient is written before any Observation, a panel whose member was
    # sent in an earlier transaction still gets in when that one is still in flight (a refused transaction is written
    # entry by entry once the type's others are done), and only the bad entry is refused, as with one worker.
    def population(tag: str) -> list[dict]:
        patients = [{"resourceType": "Patient", "id": f"{tag}-p{n}-{unique}"} for n in range(5)]
        members = [_obs(f"{tag}-m{n}-{unique}", f"Patient/{tag}-p{n % 5}-{unique}") for n in range(8)]
        panel = {
            **_obs(f"{tag}-a-panel-{unique}", f"Patient/{tag}-p0-{unique}"),
            "hasMember": [{"reference": f"Observation/{tag}-m2-{unique}"}],
        }
        bad = _obs(f"{tag}-bad-{unique}", f"Patient/nobody-{unique}")
        return [*members[:3], bad, panel, *members[3:], *patients]  # Observations first in the file

    reports = {}
    for workers in (1, 3):
        path = _ndjson(tmp_path / f"w{workers}.ndjson", population(f"w{workers}"))
        reports[workers] = load_files(
            fhir_client, [path], batch_size=2, run_dir=tmp_path / f"run{workers}", workers=workers
        )
    for workers, report in reports.items():
        assert dict(report.read) == {"Observation": 10, "Patient": 5}
        assert dict(report.written) == {"Observation": 9, "Patient": 5}
        assert [ref for ref, _ in report.rejected] == [f"Observation/w{workers}-bad-{unique}"]
        panel = fhir_client.read("Observation", f"w{workers}-a-panel-{unique}")
        assert panel["hasMember"][0]["reference"] == f"Observation/w{workers}-m2-{unique}"
    assert reports[3].outcomes == reports[1].outcomes
    assert [reason for _, reason in reports[3].rejected] == [reason for _, reason in reports[1].rejected]
