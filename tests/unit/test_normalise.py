"""Normalisation (clinical-rules §1): tidy rows, skips counted by reason, structural problems quarantined."""

from __future__ import annotations

import math
import time

import pytest

from leukofhir.normalise import (
    OBSERVATION_COLUMNS, Q_BAD_TIME, Q_NO_TIME, Q_NOT_NUMERIC, Q_RANGE, Q_SUBJECT, Q_SUBJECT_UNRESOLVED,
    SKIP_DATA_ABSENT, SKIP_OUT_OF_SCOPE, SKIP_PRELIMINARY, SKIP_SUPERSEDED, Normaliser,
)
from leukofhir.config import load_config
from support.fhir_builders import at, normalise_all, observation, patient, report, statement


def test_row_columns_and_types():
    done = normalise_all([patient(), observation("w", "wbc", 7849, unit="/uL", low=3500)])
    frame = done.observations
    assert list(frame.columns) == OBSERVATION_COLUMNS
    row = frame.iloc[0]
    assert row.resource_id == "Observation/w" and row.patient_id == "Patient/p1" and row.concept == "wbc"
    assert row.value == pytest.approx(7.849) and row.lln == pytest.approx(3.5) and row.unit == "/uL"
    assert str(frame["time"].dtype) == "datetime64[ns, UTC]" and row.row_id == "1"


@pytest.mark.parametrize("value, unit, expected", [(176, "g/L", 17.6), (7.2, "g/dL", 7.2), (8.0, "mmol/L", 12.891)])
def test_hemoglobin_units(value, unit, expected):
    frame = normalise_all([observation("h", "hemoglobin", value, unit=unit)]).observations
    assert frame.value[0] == pytest.approx(expected, abs=1e-3)


def test_unknown_unit_keeps_raw_unit_and_nan_for_the_gx_step():
    frame = normalise_all([observation("w", "wbc", 5, unit="mg")]).observations
    assert frame.unit[0] == "mg" and math.isnan(frame.value[0])


def test_ucum_code_preferred_over_unit_text():
    obs = observation("w", "wbc", 5)
    obs["valueQuantity"] = {"value": 5, "unit": "thousand per microlitre", "system": "http://unitsofmeasure.org",
                            "code": "10*3/uL"}
    assert normalise_all([obs]).observations.value[0] == 5


@pytest.mark.parametrize(
    "resource, reason",
    [
        (observation("x", "wbc", 5, code="30405-5"), SKIP_OUT_OF_SCOPE),   # urine leukocytes: a look-alike
        (observation("x", "wbc", 5, status="cancelled"), "status cancelled ignored"),
        (observation("x", "wbc", 5, status="registered"), "status registered ignored"),
        (observation("x", "wbc", 5, status="preliminary"), SKIP_PRELIMINARY),
        ({**observation("x", "wbc", 5), "valueQuantity": None, "dataAbsentReason": {"text": "haemolysed"}},
         SKIP_DATA_ABSENT),
    ],
)
def test_skipped_by_reason_never_quarantined(resource, reason):
    done = normalise_all([resource])
    assert done.skipped == {reason: 1} and done.quarantined == [] and done.observations.empty


@pytest.mark.parametrize(
    "resource, reason",
    [
        (observation("x", "wbc", 5, patient="Group/g1"), Q_SUBJECT),
        ({**observation("x", "wbc", 5), "subject": None}, Q_SUBJECT),
        (observation("x", "wbc", 5, time=False), Q_NO_TIME),
        (observation("x", "wbc", 5, time="yesterday"), Q_BAD_TIME),
        ({**{k: v for k, v in observation("x", "wbc", 5).items() if k != "valueQuantity"}, "valueString": "low"},
         Q_NOT_NUMERIC),
        (observation("x", "wbc", 7849, unit="10*9/L", low=3.5), Q_RANGE),
        ({**observation("x", "wbc", 7.8, unit="/uL"),  # the value mislabelled /uL, the range in 10^9/L
          "referenceRange": [{"low": {"value": 3.5, "unit": "10*9/L"}}]}, Q_RANGE),
        (observation("x", "wbc", 5, patient="urn:uuid:nobody"), Q_SUBJECT_UNRESOLVED),
    ],
)
def test_structural_problems_quarantined(resource, reason):
    done = normalise_all([resource])
    assert done.quarantined == [(0, "Observation/x", [reason])] and done.observations.empty


def test_true_near_zero_anc_is_not_a_unit_error():
    done = normalise_all([observation("a", "anc", 0.01, low=1.5)])
    assert done.quarantined == [] and len(done.observations) == 1


def test_time_and_panel_from_report_and_panel_observation():
    # The HL7 GHP shape: report -> panel Observation p2 (hasMember) -> results without their own time.
    panel = {"resourceType": "Observation", "id": "p2", "status": "final",
             "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
             "hasMember": [{"reference": "Observation/w"}]}
    res = [observation("w", "wbc", 5, time=False), panel, report("ghp", ["p2"], time=at(hours=1)),
           observation("n", "neutrophils_pct", 40, time=False), report("r2", ["n"], time=at(hours=2))]
    done = normalise_all(res)
    frame = done.observations.set_index("resource_id")
    assert frame.loc["Observation/w", "panel"] == "DiagnosticReport/ghp"
    assert frame.loc["Observation/w", "time"].isoformat() == "2024-03-01T09:00:00+00:00"
    assert frame.loc["Observation/n", "panel"] == "DiagnosticReport/r2"
    assert done.skipped == {SKIP_OUT_OF_SCOPE: 1}


def test_urn_uuid_subject_resolves_to_a_patient_in_the_input():
    done = normalise_all([observation("w", "wbc", 5, patient="urn:uuid:p9"), patient("p9")])
    assert done.observations.patient_id[0] == "Patient/p9"


def test_later_version_supersedes():
    v1 = {**observation("w", "wbc", 2.0), "meta": {"versionId": "1"}}
    v2 = {**observation("w", "wbc", 5.0), "meta": {"versionId": "2"}}
    done = normalise_all([v2, v1])
    assert done.skipped == {SKIP_SUPERSEDED: 1} and list(done.observations.value) == [5.0]


def test_exposures_from_statement_request_and_contained_medication():
    contained = {"resourceType": "MedicationStatement", "id": "c", "status": "active",
                 "contained": [{"resourceType": "Medication", "id": "m1",
                                "code": {"coding": [{"system": "x", "code": "1", "display": "Clozapine 25 MG"}]}}],
                 "medicationReference": {"reference": "#m1"}, "subject": {"reference": "Patient/p1"},
                 "effectivePeriod": {"start": "2024-01-01"}}
    res = [contained, statement("r", "Valproic Acid 250 MG", point=at(), kind="MedicationRequest"),
           statement("s", "Amoxicillin", point=at()), statement("e", "clozapine", point=at(), status="not-taken")]
    done = normalise_all(res)
    rows = done.exposures.set_index("resource_id")
    assert rows.loc["MedicationStatement/c", "drug"] == "clozapine" and rows["end"].isna()["MedicationStatement/c"]
    assert rows.loc["MedicationRequest/r", "drug"] == "valproate"
    assert done.skipped == {"drug not in the rules' drug list": 1, "status not-taken excluded": 1}


def test_medication_reference_resolved_after_the_fact():
    ms = statement("s", "", point=at())
    del ms["medicationCodeableConcept"]
    ms["medicationReference"] = {"reference": "Medication/m9"}
    med = {"resourceType": "Medication", "id": "m9", "code": {"coding": [
        {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "6922"}]}}
    done = normalise_all([ms, med])
    assert list(done.exposures.drug) == ["metronidazole"]


def test_hot_path_speed_per_observation():
    rules = load_config()
    normaliser = Normaliser(rules)
    obs = observation("w", "wbc", 5.1, low=4.0)
    start = time.perf_counter()
    for i in range(20000):
        normaliser.add(obs, i)
    per = (time.perf_counter() - start) / 20000
    assert per < 20e-6  # well under 10 µs on a normal machine; generous here so CI noise never fails it


def test_an_integer_too_large_for_a_float_is_not_a_number():
    done = normalise_all([observation("x", "wbc", 10**400)])
    assert done.quarantined == [(0, "Observation/x", ["value is not a Quantity with a numeric value"])]
