"""`leukofhir evaluate` end to end: outputs, report reconciliation, bad input, exit codes (issue 3, item 5)."""

from __future__ import annotations

import gzip
import json

import pytest

from leukofhir.cli import main
from support.fhir_builders import at, observation, patient, report, statement


def _ndjson(path, resources, extra_lines=()):
    with open(path, "w") as fh:
        for r in resources:
            fh.write(json.dumps(r) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")


@pytest.fixture
def inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _ndjson(src / "Observation.ndjson", [
        observation("w1", "wbc", 2.5, time=at(0)),
        observation("w2", "wbc", 5.0, time=at(days=1)),             # transient: inactive
        observation("a1", "anc", 0.3, time=at(days=2)),              # agranulocytosis, drug-associated
        observation("u", "wbc", 5, unit="mg", time=at(days=2)),      # unknown unit -> GX quarantine
        observation("neg", "wbc", -1, time=at(days=2)),              # negative -> GX quarantine
        observation("nt", "wbc", 5, time=False),                     # no time -> quarantine
        observation("o", "wbc", 5, code="30405-5"),                  # out of scope -> skipped
    ], extra_lines=["{not json"])
    with gzip.open(src / "Patient.ndjson.gz", "wt") as fh:
        fh.write(json.dumps(patient()) + "\n")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:ms1", "resource": statement("ms1", "clozapine", start=at(days=-30),
                                                          patient_ref="urn:uuid:p1")},
    ]}
    (src / "meds.json").write_text(json.dumps(bundle))
    return src


def test_evaluate_writes_outputs_that_add_up(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", str(inputs), "--out", str(out)]) == 0
    report_ = json.loads((out / "report.json").read_text())
    assert report_["read"] == {"MedicationStatement": 1, "Observation": 7, "Patient": 1}
    assert report_["read_total"] == 9 and report_["read_errors"] == 1
    total = report_["evaluated"] + sum(report_["skipped"].values()) + sum(report_["quarantined"].values())
    assert total == report_["read_total"] and report_["reconciled"]
    assert report_["skipped"]["code out of scope"] == 1
    assert sum(report_["quarantined"].values()) == 3
    flags = [json.loads(line) for line in (out / "Flag.ndjson").read_text().splitlines()]
    by_code = {f["code"]["coding"][0]["display"]: f for f in flags}
    assert by_code["Leukopenia"]["status"] == "inactive" and "pseudoleukopenia" in by_code["Leukopenia"]["code"]["text"]
    agran = by_code["Agranulocytosis"]
    assert agran["status"] == "active" and "clozapine" in agran["code"]["text"]
    assert any(e.get("valueReference", {}).get("reference") == "MedicationStatement/ms1" for e in agran["extension"])
    assert report_["flags"]["by_code_status"] == {"Agranulocytosis|active": 1, "Leukopenia|inactive": 1}
    assert report_["flags"]["per_day"] == {"2024-03-01": 1, "2024-03-03": 1}
    lines = [json.loads(line) for line in (out / "quarantine.ndjson").read_text().splitlines()]
    ids = sorted(q["resource"]["id"] for q in lines if "resource" in q)
    assert ids == ["neg", "nt", "u"]
    assert any(q.get("source", "").endswith("Observation.ndjson:8") for q in lines)
    assert all(q["reasons"] for q in lines)
    assert "Flags written" in capsys.readouterr().err


def test_identifiers_stable_across_runs(inputs, tmp_path):
    main(["evaluate", str(inputs), "--out", str(tmp_path / "a")])
    main(["evaluate", str(inputs / "meds.json"), str(inputs / "Patient.ndjson.gz"), str(inputs / "Observation.ndjson"),
          "--out", str(tmp_path / "b")])
    read = lambda d: sorted(json.loads(x)["identifier"][0]["value"] for x in (tmp_path / d / "Flag.ndjson").open())
    assert read("a") == read("b") and len(read("a")) == 2


def test_missing_file_is_reported_and_run_goes_on(tmp_path):
    out = tmp_path / "out"
    assert main(["evaluate", str(tmp_path / "nope.ndjson"), "--out", str(out)]) == 0
    report_ = json.loads((out / "report.json").read_text())
    assert report_["read_errors"] == 1 and report_["read_total"] == 0


def test_unusable_arguments_exit_non_zero(tmp_path, inputs, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["evaluate", str(inputs), "--out", str(blocker / "sub")]) == 2
    assert main(["evaluate", str(inputs), "--out", str(tmp_path / "o"), "--as-of", "soon"]) == 2
    bad = tmp_path / "rules.yaml"
    bad.write_text("version: 2\n")
    assert main(["evaluate", str(inputs), "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("leukofhir evaluate: error:") for line in err)


def test_as_of_skips_later_values(inputs, tmp_path):
    out = tmp_path / "out"
    assert main(["evaluate", str(inputs), "--out", str(out), "--as-of", "2024-03-01T12:00:00Z"]) == 0
    report_ = json.loads((out / "report.json").read_text())
    assert report_["skipped"]["after the as-of time"] == 2 and report_["reconciled"]
    (flag,) = [json.loads(x) for x in (out / "Flag.ndjson").open()]
    assert flag["status"] == "active"
