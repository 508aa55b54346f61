"""Unit spellings of clinical-rules v1.3 §1.2, one by one: a count's unit read from `unit` is matched ignoring case
and spaces; a UCUM `code` stays case-sensitive; hemoglobin stays exact; what is still unknown is quarantined by name."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from leukofhir.config import DEFAULT_PATH, load_config
from leukofhir.evaluate.pipeline import evaluate_files
from support.fhir_builders import UCUM, normalise_all, observation, patient

RULES = load_config()

# clinical-rules v1.3 §1.2, as listed: ×1 and ÷1000 to 10^9/L.
TIMES_ONE = [
    "GI/L",
    "10E9/L",
    "x10E9/L",
    "x10^9/L",
    "x 10^9/L",
    "10*9/l",
    "THOU/uL",
    "Thousand/uL",
    "THOU/CU MM",
    "K/mm3",
    "K/cumm",
    "K/mcL",
    "10*3/mcL",
    "x10(3)/uL",
    "x10^3/uL",
    "Tsd/µL",
    "Tsd/ul",
]
PER_THOUSAND = ["cells/mm3", "cells/µL", "/cmm", "/mcL", "cells/mcL"]
LISTED = [(u, 1.0) for u in TIMES_ONE] + [(u, 0.001) for u in PER_THOUSAND]


def _quantity(value, *, unit=None, code=None, system=None) -> dict:
    return {k: v for k, v in (("value", value), ("unit", unit), ("code", code), ("system", system)) if v is not None}


def _row(concept: str, quantity: dict):
    obs = observation("x", concept, 1, code=RULES.observations.concepts[concept].codes[0])
    obs["valueQuantity"] = quantity
    frame = normalise_all([obs]).observations
    (row,) = frame.itertuples()
    return row


@pytest.mark.parametrize("unit, factor", LISTED, ids=[u for u, _ in LISTED])
def test_every_listed_spelling_is_read_from_unit(unit, factor):
    row = _row("wbc", _quantity(4500 if factor < 1 else 4.5, unit=unit))
    assert row.value == pytest.approx(4.5)
    assert row.unit in RULES.units.counts  # the rules' spelling: the GX unit check knows it


# Case and spaces ignored (v1.3): upper, lower, spaces inside and around; µ (U+00B5) and μ (U+03BC) are one letter.
VARIANTS = [
    ("THOU/UL", 1.0),
    ("thou/ul", 1.0),
    ("Thou / uL", 1.0),
    ("x 10^9 / l", 1.0),
    ("X10E9/L", 1.0),
    ("gi/l", 1.0),
    ("thou/cu mm", 1.0),
    ("THOU/CUMM", 1.0),
    ("k/MCL", 1.0),
    (" K/uL ", 1.0),
    ("TSD/μL", 1.0),
    ("Tsd/µl", 1.0),
    ("CELLS/MM3", 0.001),
    ("Cells/μL", 0.001),
    ("/CMM", 0.001),
    ("/μl", 0.001),
    ("10*9/L", 1.0),
    ("10^9/l", 1.0),
    ("G/l", 1.0),
]


@pytest.mark.parametrize("unit, factor", VARIANTS, ids=[u for u, _ in VARIANTS])
def test_a_count_unit_text_ignores_case_and_spaces(unit, factor):
    row = _row("platelets", _quantity(120000 if factor < 1 else 120, unit=unit))
    assert row.value == pytest.approx(120)


@pytest.mark.parametrize("concept", [n for n, c in RULES.observations.concepts.items() if c.kind == "count"])
def test_every_count_concept_reads_the_spellings(concept):
    assert _row(concept, _quantity(2.5, unit="THOU/CU MM")).value == pytest.approx(2.5)


def test_a_ucum_code_stays_case_sensitive():
    # With system UCUM the code is preferred (§1.2) and matched exactly, as UCUM is case-sensitive.
    assert _row("wbc", _quantity(4.5, code="10*3/uL", system=UCUM, unit="THOU/UL")).value == 4.5
    row = _row("wbc", _quantity(4.5, code="10*3/UL", system=UCUM, unit="10*3/uL"))
    assert math.isnan(row.value) and row.unit == "10*3/UL"  # the code is what was read: unknown, never guessed
    assert _row("wbc", _quantity(4.5, code="THOU/uL", system=UCUM)).value == 4.5  # listed as it is spelled
    assert math.isnan(_row("wbc", _quantity(4.5, code="thou/UL", system=UCUM)).value)


def test_a_code_of_another_system_is_read_like_a_unit_text():
    assert _row("wbc", _quantity(4.5, code="THOU/UL")).value == pytest.approx(4.5)
    assert _row("wbc", _quantity(4.5, code="thou/ul", system="http://example.org/units")).value == pytest.approx(4.5)


@pytest.mark.parametrize(
    "unit, expected",
    [
        ("g/dL", 9.0),
        ("g/L", 0.9),
        ("mmol/L", 9 * 1.6113438608),
        ("G/L", None),
        ("g/l", None),
        ("G/DL", None),
        ("g / dL", None),
        ("GI/L", None),
    ],
)
def test_hemoglobin_units_stay_exact(unit, expected):
    # g/L (grams) and G/L (giga) differ by 10^9: for hemoglobin no case or space is ignored.
    row = _row("hemoglobin", _quantity(9.0, unit=unit))
    if expected is None:
        assert math.isnan(row.value) and row.unit == unit
    else:
        assert row.value == pytest.approx(expected)


def test_percent_units_stay_exact():
    assert _row("neutrophils_pct", _quantity(40, unit="%")).value == 40
    assert math.isnan(_row("neutrophils_pct", _quantity(40, unit="pct")).value)


def test_a_reference_range_is_read_with_the_same_spellings():
    obs = observation("w", "wbc", 4.2)
    obs["valueQuantity"] = _quantity(4.2, unit="THOU/CU MM")
    obs["referenceRange"] = [{"low": {"value": 4500, "unit": "CELLS/MM3"}, "high": {"value": 11, "unit": "k/mcl"}}]
    frame = normalise_all([patient(), obs]).observations
    assert frame.value[0] == pytest.approx(4.2) and frame.lln[0] == pytest.approx(4.5)


def _ndjson(path, resources):
    path.write_text("".join(json.dumps(r) + "\n" for r in resources))


def _quarantine(folder):
    return [json.loads(line) for line in (folder / "quarantine.ndjson").read_text().splitlines()]


def test_an_unknown_unit_is_quarantined_naming_the_unit_and_the_rest_evaluated(tmp_path):
    known = observation("k", "wbc", 1.5)
    known["valueQuantity"] = _quantity(1.5, unit="THOU/UL")
    coded = observation("c", "wbc", 1.5)
    coded["valueQuantity"] = _quantity(1.5, code="THOU/UL", system=UCUM)  # not UCUM: its code is matched exactly
    hemoglobin = observation("h", "hemoglobin", 9.0, unit="G/L")
    _ndjson(tmp_path / "in.ndjson", [patient(), known, coded, hemoglobin])
    report = evaluate_files([tmp_path / "in.ndjson"], tmp_path / "out", progress=False)
    reasons = {q["resource"]["id"]: q["reasons"][0] for q in _quarantine(tmp_path / "out")}
    assert reasons == {
        "c": "expect_column_values_to_be_in_set(unit): unknown unit 'THOU/UL' for wbc",
        # G/L is a count unit: known, but not one of hemoglobin's, so its value cannot be converted.
        "h": "expect_column_values_to_not_be_null(value): value missing: unit 'G/L' cannot be converted to the unit "
        "of hemoglobin (§1.2)",
    }
    assert report["quarantined"] == {
        "expect_column_values_to_be_in_set(unit)": 1,
        "expect_column_values_to_not_be_null(value)": 1,
    }
    assert report["flags"]["total"] == 1 and report["reconciled"]  # the THOU/UL WBC of 1.5: leukopenia


def _site_rules(tmp_path, spellings: dict):
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["units"]["site_count"] = spellings
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def test_a_site_adds_its_own_spellings(tmp_path):
    site = _site_rules(tmp_path, {"Gpt/L": 1, "Zellen/µl": 0.001})
    rules = load_config(site)
    assert _row_with(rules, "wbc", _quantity(3.0, unit="GPT/L")).value == pytest.approx(3.0)
    assert _row_with(rules, "wbc", _quantity(3000, unit="zellen / μL")).value == pytest.approx(3.0)
    assert math.isnan(_row("wbc", _quantity(3.0, unit="Gpt/L")).value)  # not known without the site's file
    resources = [patient(), observation("g", "wbc", 3.0)]
    resources[1]["valueQuantity"] = _quantity(3.0, unit="Gpt/L")
    _ndjson(tmp_path / "in.ndjson", resources)
    report = evaluate_files([tmp_path / "in.ndjson"], tmp_path / "out", config=site, progress=False)
    assert report["quarantined"] == {} and report["flags"]["total"] == 1


def _row_with(rules, concept, quantity):
    obs = observation("x", concept, 1)
    obs["valueQuantity"] = quantity
    (row,) = normalise_all([obs], rules).observations.itertuples()
    return row
