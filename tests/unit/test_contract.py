"""The data contract that judges feeds, not single patients: the rule on a run's totals, and the counts it reads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from leukofhir.config import load_config
from leukofhir.evaluate.pipeline import evaluate_files
from leukofhir.evaluate.stages import held_flags
from leukofhir.evaluate.validate import (
    ValidationThresholdError,
    check_contract,
    contract_breaches,
    contract_counts,
    merge_contract,
    suite_parameters,
    validate_batch,
)
from support.fhir_builders import at, observation, patient

RULES = load_config()
DEFAULT = RULES.validation


def _scope(failed: int, rows: int, patients: int, feed: dict | None = None, suite: str = "observations") -> dict:
    return {
        "suite": suite,
        "feed": feed,
        "rows": rows,
        "failed": failed,
        "patients": patients,
        "expectations": {"expect_column_values_to_be_in_set(unit)": failed},
        "examples": ["Observation/x"],
    }


WBC_FURLONG = {"concept": "wbc", "unit": "furlong"}
# (what, the run's scopes, which of them fail with the default contract: 20 %, 50 rows, 5 patients)
CASES = [
    ("few rows, all failing, one patient (2 of 4)", [_scope(2, 4, 1)], []),
    ("few rows, all failing, several patients", [_scope(4, 4, 4)], []),
    ("many rows below the rate", [_scope(60, 1000, 30)], []),
    ("many rows just at the rate (not above it)", [_scope(200, 1000, 40)], []),
    ("many rows above the rate", [_scope(300, 1000, 30)], [0]),
    ("one patient with many bad rows", [_scope(200, 220, 1)], []),
    ("four patients with many bad rows", [_scope(200, 220, 4)], []),
    ("many patients, at the minimum of rows and patients", [_scope(50, 100, 5)], [0]),
    ("many patients, one row under the minimum", [_scope(49, 60, 10)], []),
    ("a feed in an unknown unit, 10 % of all rows", [_scope(100, 1000, 40), _scope(100, 100, 40, WBC_FURLONG)], [1]),
    ("a feed in an unknown unit, one patient", [_scope(100, 1000, 1), _scope(100, 100, 1, WBC_FURLONG)], []),
    (
        "a broken medication feed",
        [_scope(0, 500, 0, suite="exposures"), _scope(80, 100, 20, {"type": "MedicationAdministration"}, "exposures")],
        [1],
    ),
    ("many Flags refused", [_scope(60, 100, 60, suite="flags")], [0]),
]


@pytest.mark.parametrize("what, scopes, failing", CASES, ids=[c[0] for c in CASES])
def test_the_rule(what, scopes, failing):
    assert contract_breaches(scopes, DEFAULT) == [scopes[n] for n in failing]


def test_the_rule_is_off_without_a_rate_and_follows_the_site_settings():
    systemic = [_scope(1000, 1000, 500)]
    assert (
        contract_breaches(systemic, SimpleNamespace(max_failure_rate=None, min_failing_rows=1, min_failing_patients=1))
        == []
    )
    strict = SimpleNamespace(max_failure_rate=0.0, min_failing_rows=1, min_failing_patients=1)
    assert contract_breaches([_scope(1, 1000, 1)], strict) == [_scope(1, 1000, 1)]


def test_the_defaults_are_in_the_rules_file():
    assert (DEFAULT.max_failure_rate, DEFAULT.min_failing_rows, DEFAULT.min_failing_patients) == (0.2, 50, 5)


def _rows(n: int, unit: str, patients: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "row_id": [str(start + i) for i in range(n)],
            "resource_id": [f"Observation/o{start + i}" for i in range(n)],
            "patient_id": [f"Patient/p{i % patients}" for i in range(n)],
            "concept": ["wbc"] * n,
            "unit": [unit] * n,
        }
    )


def test_counts_by_suite_and_feed_add_up_over_batches():
    good, bad = _rows(300, "10*9/L", 40), _rows(40, "furlong", 8, start=300)
    frame = pd.concat([good, bad], ignore_index=True)
    reasons = {r: ["expect_column_values_to_be_in_set(unit): value 'furlong' not accepted"] for r in bad["row_id"]}
    reasons["0"] = ["expect_column_values_to_be_between(value): value -1.0 below 0.0"]
    one = contract_counts("observations", (frame, reasons))
    suite, *feeds = one
    assert (suite["feed"], suite["rows"], suite["failed"], suite["patients"]) == (None, 340, 41, 8)  # p0 twice
    by_feed = {(f["feed"]["concept"], f["feed"]["unit"]): f for f in feeds}
    assert set(by_feed) == {("wbc", "10*9/L"), ("wbc", "furlong")}
    furlong = by_feed["wbc", "furlong"]
    assert (furlong["rows"], furlong["failed"], furlong["patients"]) == (40, 40, 8)
    assert furlong["expectations"] == {"expect_column_values_to_be_in_set(unit)": 40}
    assert furlong["examples"] == [f"Observation/o{300 + i}" for i in range(5)]
    # 40 failing rows from 8 patients: under 50 rows, one batch says nothing about the feed...
    assert contract_breaches(merge_contract([one]), DEFAULT) == []
    # ...a second batch of other patients with the same fault, and the run's totals do.
    more = _rows(20, "furlong", 4, start=1000).assign(patient_id=lambda f: f["patient_id"] + "-b")
    two = contract_counts(
        "observations", (more, {r: ["expect_column_values_to_be_in_set(unit): x"] for r in more["row_id"]})
    )
    run = merge_contract([one, two])
    (breach,) = contract_breaches(run, DEFAULT)
    assert breach["feed"] == WBC_FURLONG and (breach["rows"], breach["failed"], breach["patients"]) == (60, 60, 12)
    assert run[0]["feed"] is None and run[0]["rows"] == 360  # the suite's total first
    with pytest.raises(ValidationThresholdError) as caught:
        check_contract(run, DEFAULT)
    assert str(caught.value).startswith(
        "observations feed wbc in 'furlong': 60 of 60 rows (100.0%) from 12 patients fail validation: "
        "expect_column_values_to_be_in_set(unit) 60 rows, e.g. Observation/o300, Observation/o301, Observation/o302"
    )


def test_counts_from_gx_name_rows_without_a_unit_and_medication_feeds():
    parameters = suite_parameters(RULES)
    rows = _rows(3, "10*9/L", 3).assign(
        version="1",
        code="6690-2",
        value=[5.0, 5.0, 5.0],
        comparator=None,
        status="final",
        time=pd.Timestamp(at(days=-1)),
        lln=float("nan"),
        panel=None,
    )
    rows.loc[2, "unit"] = None
    rows.loc[2, "value"] = float("nan")
    result = validate_batch("observations", rows, parameters)
    feeds = {json.dumps(s["feed"]): s for s in contract_counts("observations", (rows, result.reasons)) if s["feed"]}
    assert feeds['{"concept": "wbc", "unit": null}']["failed"] == 1
    assert feeds['{"concept": "wbc", "unit": "10*9/L"}']["failed"] == 0

    exposures = pd.DataFrame(
        {
            "row_id": ["0", "1"],
            "resource_id": ["MedicationRequest/m0", "MedicationStatement/m1"],
            "patient_id": ["Patient/p0", "Patient/p1"],
            "drug": [None, "clozapine"],
            "agent": [None, None],
            "start": pd.to_datetime(["2025-01-01"] * 2, utc=True),
            "end": pd.to_datetime([None, None], utc=True),
            "status": ["active", "active"],
        }
    )
    result = validate_batch("exposures", exposures, parameters)
    feeds = {
        s["feed"]["type"]: s["failed"] for s in contract_counts("exposures", (exposures, result.reasons)) if s["feed"]
    }
    assert feeds == {"MedicationRequest": 1, "MedicationStatement": 0}


def _write(folder, resources):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data.ndjson", "w", encoding="utf-8") as fh:
        for resource in resources:
            fh.write(json.dumps(resource) + "\n")
    return folder


def _string_wbc(rid: str, pid: str) -> dict:
    bad = observation(rid, "wbc", 2.0, time=at(days=-1), patient=f"Patient/{pid}")
    bad.pop("valueQuantity")
    bad["valueString"] = "2.0"
    return bad


def test_a_feed_sending_strings_counts_as_failing_rows_of_its_feed(tmp_path):
    """The normaliser quarantines a result that is not a number before GX sees it: the contract counts it too."""
    pids = [f"s{n}" for n in range(12)]
    resources = [patient(p) for p in pids]
    resources += [_string_wbc(f"{p}-{k}", p) for p in pids for k in range(5)]
    resources += [observation(f"{p}-ok", "wbc", 5.0, time=at(days=-2), patient=f"Patient/{p}") for p in pids]
    report = evaluate_files([_write(tmp_path / "in", resources)], tmp_path / "out", progress=False)
    scopes = {json.dumps(s["feed"]): s for s in report["contract"] if s["suite"] == "observations"}
    strings = scopes['{"concept": "wbc", "unit": null}']
    assert (strings["rows"], strings["failed"], strings["patients"]) == (60, 60, 12)
    assert strings["expectations"] == {"value is not a Quantity with a numeric value": 60}
    assert scopes["null"]["rows"] == 72 and scopes["null"]["failed"] == 60
    with pytest.raises(ValidationThresholdError, match="observations feed wbc in no unit: 60 of 60 rows"):
        evaluate_files([tmp_path / "in"], tmp_path / "judged", progress=False, fail_on_threshold=True)
    assert not (tmp_path / "judged" / "report.json").exists()


def test_held_flags_are_those_whose_evidence_was_quarantined():
    def flag(value, *refs):
        return {
            "resourceType": "Flag",
            "identifier": [{"system": "s", "value": value}],
            "extension": [
                {"url": "http://hl7.org/fhir/StructureDefinition/flag-detail", "valueReference": {"reference": r}}
                for r in refs
            ],
        }

    existing = [
        flag("a", "Observation/ok", "Observation/bad"),
        flag("b", "Observation/ok"),
        flag("c", "MedicationRequest/m"),
        {"resourceType": "Flag", "extension": "junk"},
    ]
    quarantined = [(1, "Observation/bad", ["unit"]), (2, "MedicationRequest/m", ["drug"]), (3, None, ["read error"])]
    assert held_flags(existing, quarantined) == ["a", "c"]
    assert held_flags(existing, []) == []


def test_the_message_names_the_first_failing_scopes_and_counts_the_rest():
    feeds = [_scope(100, 100, 10, {"concept": c, "unit": "x"}) for c in ("wbc", "anc", "platelets", "hemoglobin")]
    with pytest.raises(ValidationThresholdError) as caught:
        check_contract(feeds, DEFAULT)
    message = str(caught.value)
    assert (
        message.count(": 100 of 100 rows (100.0%) from 10 patients") == 3
        and "; and 1 more (the contract: "
        "at most 20.0% of a suite's or a feed's rows failing, unless fewer than 50 rows or 5 patients)"
        in message
    )


def test_held_flags_are_reported_the_same_in_memory_and_partitioned(tmp_path):
    """A Flag read with the input (online: from the server) whose evidence is now quarantined is listed to be left
    as it is, whichever way the input is evaluated."""
    resources = []
    for n in range(6):
        pid = f"h{n}"
        unit = "furlong" if n % 2 else "10*9/L"  # every other patient's low WBC is now in a unit nobody knows
        resources += [
            patient(pid),
            observation(f"{pid}-w", "wbc", 2.0, time=at(), patient=f"Patient/{pid}", unit=unit),
            {
                "resourceType": "Flag",
                "id": f"f{n}",
                "status": "active",
                "code": {"text": "Leukopenia"},
                "subject": {"reference": f"Patient/{pid}"},
                "identifier": [{"system": "s", "value": f"id{n}"}],
                "extension": [
                    {
                        "url": "http://hl7.org/fhir/StructureDefinition/flag-detail",
                        "valueReference": {"reference": f"Observation/{pid}-w"},
                    }
                ],
            },
        ]
    folder = _write(tmp_path / "in", resources)
    memory = evaluate_files([folder], tmp_path / "memory", progress=False)
    partitioned = evaluate_files([folder], tmp_path / "partitioned", progress=False, memory_budget="1KB")
    assert partitioned["partitions"]["evaluated"] >= 2
    for report in (memory, partitioned):
        assert report["flags_held_identifiers"] == ["id1", "id3", "id5"] and report["flags_held"] == 3
