"""`leukofhir evaluate --data-docs`: GX's own Data Docs site for the run's validations, an optional extra."""

from __future__ import annotations

import html
import json
import re

from conftest import EXTERNAL

from leukofhir.cli import main
from support.fhir_builders import at, observation, patient

HL7 = EXTERNAL / "hl7-fhir-r4-examples"


def _text(path) -> str:
    """A page's visible text, one space between words."""
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", path.read_text(encoding="utf-8"), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def test_data_docs_site_for_the_runs_validations(tmp_path):
    out = tmp_path / "out"
    assert main(["evaluate", str(HL7), "--out", str(out), "--data-docs"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data_docs"] == "gx-data-docs/index.html"
    site = out / "gx-data-docs"
    index = site / "index.html"
    assert index.is_file()
    # One validation page per suite this run validated (no exposures in these examples).
    pages = {p.parent.parent.parent.name: p for p in (site / "validations").rglob("*.html")}
    assert set(pages) == {"observations", "flags"}
    assert pages["observations"].relative_to(site).as_posix() in html.unescape(index.read_text(encoding="utf-8"))
    text = _text(pages["observations"])
    assert "Expectation Suite: observations" in text
    assert "Evaluated Expectations 12" in text and "Unsuccessful Expectations 0" in text
    # GX renders each expectation in words, under its column: every kind of the suite is named.
    for words in (
        "values must never be null",
        "values must belong to this set",
        "greater than or equal to",
        "Values in plausible_max must always be greater than or equal to those in value",
    ):
        assert words in text
    for column in ("patient_id", "resource_id", "status", "time", "unit", "value"):
        assert f" {column} " in text
    assert "Expectation Suite: flags" in _text(pages["flags"])
    # The suites' own pages are built too.
    assert (site / "expectations" / "observations.html").is_file()


def test_data_docs_show_failing_values(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    resources = [
        patient(),
        observation("w1", "wbc", 2.5, time=at(0)),
        observation("neg", "wbc", -1, time=at(1)),
        observation("u", "wbc", 5, unit="mg", time=at(2)),
    ]
    (src / "r.ndjson").write_text("".join(json.dumps(r) + "\n" for r in resources))
    out = tmp_path / "out"
    assert main(["evaluate", str(src), "--out", str(out), "--data-docs"]) == 0
    [page] = (out / "gx-data-docs" / "validations" / "observations").rglob("*.html")
    text = _text(page)
    # The same verdicts as the run's report: the pages validate the same rows the same way.
    report = json.loads((out / "report.json").read_text())
    failed = [e for e in report["expectations"] if e["suite"] == "observations" and not e["success"]]
    assert failed and "Status: Failed" in text and f"Unsuccessful Expectations {len(failed)} " in text
    assert "Unexpected Value Count mg 1" in text and "Unexpected Value Count -1.0 1" in text


def test_no_data_docs_without_the_flag(tmp_path):
    out = tmp_path / "out"
    assert main(["evaluate", str(HL7), "--out", str(out)]) == 0
    assert not (out / "gx-data-docs").exists()
    assert "data_docs" not in json.loads((out / "report.json").read_text())
