"""On the external sample data nothing read is lost: read = evaluated + skipped + quarantined, as the report says."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest
from conftest import EXTERNAL

from leukofhir.evaluate.pipeline import evaluate_files
from leukofhir.report.html import render_report


def _open(path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def count_resources(root) -> tuple[Counter, int]:
    """Resources per type in the files, counted here without the project's reader; and files that hold none."""
    counts: Counter = Counter()
    not_fhir = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and (".json" in p.name or ".ndjson" in p.name)):
        with _open(path) as fh:
            if ".ndjson" in path.name:
                counts.update(json.loads(line)["resourceType"] for line in fh if line.strip())
                continue
            data = json.load(fh)
        if not isinstance(data, dict) or "resourceType" not in data:
            not_fhir += 1
        elif data["resourceType"] == "Bundle":
            counts.update(entry["resource"]["resourceType"] for entry in data.get("entry", []))
        else:
            counts[data["resourceType"]] += 1
    return counts, not_fhir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate-external")
    report = evaluate_files([str(EXTERNAL)], out, progress=False)
    return report, out


def test_every_resource_read_is_evaluated_skipped_or_quarantined(run):
    report, _ = run
    expected, not_fhir = count_resources(EXTERNAL)
    assert report["read"] == dict(expected)
    assert report["read_total"] == sum(expected.values())
    skipped, quarantined = sum(report["skipped"].values()), sum(report["quarantined"].values())
    assert report["read_total"] == report["evaluated"] + skipped + quarantined
    assert report["reconciled"] is True
    # Files that are not FHIR (package.json, generator metadata, a summary) are read errors, not silent drops.
    assert report["read_errors"] == not_fhir


def test_stages_and_quarantine_file_agree_with_the_counts(run):
    report, out = run
    stages = report["stages"]
    assert stages["read"] == report["read_total"] and stages["evaluated"] == report["evaluated"]
    assert stages["read"] >= stages["normalised"] >= stages["validated"] >= 0
    gx_failed = sum(e["unexpected_count"] for e in report["expectations"] if e["suite"] == "observations")
    assert gx_failed >= stages["normalised"] - stages["validated"]  # a row may fail several expectations
    lines = [json.loads(line) for line in (out / "quarantine.ndjson").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == sum(report["quarantined"].values()) + report["read_errors"]
    assert all(line["reasons"] for line in lines)


def test_the_data_contract_ran_and_a_resource_read_twice_goes_on_once(run):
    report, _ = run
    names = {(e["suite"], e["name"], e["column"]) for e in report["expectations"]}
    assert ("observations", "expect_column_values_to_be_in_set", "unit") in names
    assert ("exposures", "expect_column_values_to_not_be_null", "drug") in names
    assert all(e["element_count"] > 0 for e in report["expectations"] if e["suite"] == "observations")
    # The five Synthea Bundles repeat Observations that are also in the NDJSON export: the repeats are
    # quarantined by the duplicate check, the first copies are evaluated.
    duplicates = next(e for e in report["expectations"] if e["column"] == "earlier_copies")
    assert duplicates["unexpected_count"] > 0
    assert report["flags"]["total"] > 0


def test_the_html_report_of_the_run_reconciles(run):
    report, _ = run
    html = render_report(report)
    assert f"read {report['read_total']:,} = evaluated {report['evaluated']:,}" in html
    assert "reconciles" in html and "does NOT reconcile" not in html
    assert "http" not in html.lower()
