"""report.html: rendered from a report dict, self-contained, escaped, binned per day / week / month."""

from __future__ import annotations

import re
from datetime import date, timedelta
from html.parser import HTMLParser

from leukofhir.report.html import bin_per_day, render_report, write_report_html
from support.report_sample import sample_report


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(html: str) -> _Text:
    parser = _Text()
    parser.feed(html)
    return parser


def test_the_report_shows_the_key_numbers_and_sections():
    html = render_report(sample_report())
    text = " ".join(_parse(html).text)
    for expected in (
        "18,853",
        "17,901",
        "917",
        "35",  # read, evaluated, skipped, quarantined
        "read 18,853 = evaluated 17,901 + skipped 917 + quarantined 35",
        "reconciles",
        "Observation.cbc.ndjson.gz",
        "2025-03-01T12:00:00+00:00",
        "Counts per stage",
        "normalised",
        "17,948",
        "validated",
        "17,913",
        "out of scope (LOINC code)",
        "Observation/u1",
        "Observation/d7",
        "expect_column_values_to_be_in_set",
        "failed",
        "passed",
        "an unknown unit is quarantined, never guessed",
        "Leukopenia",
        "Neutropenia",
        "Pancytopenia",
        "active",
        "inactive",
        "57",
    ):
        assert expected in text, expected
    assert "does NOT reconcile" not in text


def test_a_report_that_does_not_add_up_says_so():
    report = sample_report()
    report["evaluated"] -= 3
    text = " ".join(_parse(render_report(report)).text)
    assert "does NOT reconcile" in text and "difference 3" in text


def test_self_contained_no_urls_no_scripts():
    html = render_report(sample_report())
    assert "http" not in html.lower()
    assert "//" not in re.sub(r"<style>.*?</style>", "", html, flags=re.S)  # no protocol-relative links either
    tags = {tag for tag, _ in _parse(html).tags}
    assert not tags & {"script", "link", "img", "iframe", "object"}
    assert "@import" not in html and "url(" not in html
    assert "<svg" in html and "<rect" in html


def test_everything_from_the_report_is_escaped():
    report = sample_report()
    evil = '<script>alert("x")</script>'
    report["inputs"] = [evil]
    report["skipped"] = {evil: 1}
    report["quarantined"] = {evil: 2}
    report["quarantine_examples"] = {evil: [evil]}
    report["expectations"][0]["column"] = evil
    report["flags"]["by_code"] = {evil: 1}
    report["flags"]["by_code_status"] = {f"{evil}|active": 1}
    report["window"] = {"since": evil, "until": evil, "field": evil}
    html = render_report(report)
    assert "<script" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html


def test_the_window_replaces_the_file_list():
    report = sample_report()
    report["window"] = {"since": "2025-01-01T00:00:00Z", "until": "2025-01-02T00:00:00Z", "field": "effective"}
    text = " ".join(_parse(render_report(report)).text)
    assert "2025-01-01T00:00:00Z" in text and "effective" in text
    assert "Observation.cbc.ndjson.gz" not in text


def test_the_lapse_sweep_says_how_many_patients_it_added():
    report = sample_report()
    report["inputs"] = []
    report["sweep"] = {"candidates": 1204, "flags_read": 30512, "added": 1187}
    text = " ".join(" ".join(_parse(render_report(report)).text).split())
    assert (
        "Lapse sweep: 1,187 patients added (1,204 whose active Flags may have lapsed, of 30,512 active Flags "
        "read)" in text
    )
    assert "Input: none recorded" not in text  # the sweep alone is what the run read
    report["window"] = {"since": "2025-01-01T00:00:00Z", "until": "2025-01-01T01:00:00Z", "field": "lastUpdated"}
    text = " ".join(" ".join(_parse(render_report(report)).text).split())
    assert "2025-01-01T01:00:00Z" in text and "Lapse sweep: 1,187 patients added" in text
    del report["sweep"]
    assert "Lapse sweep" not in render_report(report)


def test_an_almost_empty_report_still_renders():
    html = render_report({"inputs": [], "read_total": 0, "evaluated": 0})
    text = " ".join(_parse(html).text)
    assert "read 0 = evaluated 0 + skipped 0 + quarantined 0" in text and "No Flags" in text


def test_per_day_is_binned_to_weeks_months_and_years_when_days_are_many():
    few = {"2025-01-01": 1, "2025-01-03": 2}
    assert bin_per_day(few) == ("day", [("2025-01-01", 1), ("2025-01-02", 0), ("2025-01-03", 2)])

    start = date(2024, 1, 1)  # a Monday
    year = {(start + timedelta(days=i)).isoformat(): 1 for i in range(366)}
    unit, bars = bin_per_day(year)
    assert unit == "week" and bars[0] == ("week of 2024-01-01", 7) and sum(n for _, n in bars) == 366

    decade = {"2015-03-04": 2, "2021-07-19": 5, "2021-07-30": 1}
    unit, bars = bin_per_day(decade)
    assert unit == "month" and len(bars) == 77 and ("2021-07", 6) in bars

    century = {"1938-05-01": 1, "2021-06-01": 2}
    unit, bars = bin_per_day(century)
    assert unit == "year" and len(bars) == 84 and bars[0] == ("1938", 1)


def test_write_report_html(tmp_path):
    path = write_report_html(sample_report(), tmp_path / "report.html")
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_the_data_contract_shows_its_failing_suites_and_feeds_and_the_verdict():
    report = sample_report()
    report["contract"] = [
        {
            "suite": "observations",
            "feed": None,
            "rows": 1000,
            "failed": 60,
            "patients": 12,
            "expectations": {},
            "examples": ["Observation/u1"],
        },
        {
            "suite": "observations",
            "feed": {"concept": "wbc", "unit": "<b>K/uL</b>"},
            "rows": 60,
            "failed": 60,
            "patients": 12,
            "expectations": {},
            "examples": ["Observation/u1"],
        },
        {
            "suite": "observations",
            "feed": {"concept": "wbc", "unit": "10*9/L"},
            "rows": 940,
            "failed": 0,
            "patients": 0,
            "expectations": {},
            "examples": [],
        },
    ]
    report["contract_verdict"] = {"passed": False, "message": "observations feed wbc in 'K/uL': 60 of 60 rows"}
    html = render_report(report)
    text = " ".join(_parse(html).text)
    assert "Data contract by suite and feed" in text and "failed , nothing written" in text
    assert "observations feed wbc in '<b>K/uL</b>'" in text and "<b>K/uL" not in html  # escaped
    assert "6.0%" in text and "100.0%" in text and "10*9/L" not in text  # feeds without failing rows are left out
    report["contract_verdict"] = {"passed": True, "message": None}
    report["contract"] = []
    text = " ".join(_parse(render_report(report)).text)
    assert "Judged on the whole run:  passed" in text and "No failing rows." in text
