"""Normalisation (clinical-rules §1): tidy rows, skips counted by reason, structural problems quarantined."""

from __future__ import annotations

import math

import pytest

from leukofhir.normalise import (
    OBSERVATION_COLUMNS,
    Q_BAD_TIME,
    Q_NO_TIME,
    Q_NOT_NUMERIC,
    Q_RANGE,
    Q_SUBJECT,
    Q_SUBJECT_UNRESOLVED,
    SKIP_DATA_ABSENT,
    SKIP_OUT_OF_SCOPE,
    SKIP_PRELIMINARY,
    SKIP_SUPERSEDED,
)
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
    obs["valueQuantity"] = {
        "value": 5,
        "unit": "thousand per microlitre",
        "system": "http://unitsofmeasure.org",
        "code": "10*3/uL",
    }
    assert normalise_all([obs]).observations.value[0] == 5


@pytest.mark.parametrize(
    "resource, reason",
    [
        (observation("x", "wbc", 5, code="30405-5"), SKIP_OUT_OF_SCOPE),  # urine leukocytes: a look-alike
        (observation("x", "wbc", 5, status="cancelled"), "status cancelled ignored"),
        (observation("x", "wbc", 5, status="registered"), "status registered ignored"),
        (observation("x", "wbc", 5, status="preliminary"), SKIP_PRELIMINARY),
        (
            {**observation("x", "wbc", 5), "valueQuantity": None, "dataAbsentReason": {"text": "haemolysed"}},
            SKIP_DATA_ABSENT,
        ),
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
        (
            {**{k: v for k, v in observation("x", "wbc", 5).items() if k != "valueQuantity"}, "valueString": "low"},
            Q_NOT_NUMERIC,
        ),
        (observation("x", "wbc", 7849, unit="10*9/L", low=3.5), Q_RANGE),
        (
            {
                **observation("x", "wbc", 7.8, unit="/uL"),  # the value mislabelled /uL, the range in 10^9/L
                "referenceRange": [{"low": {"value": 3.5, "unit": "10*9/L"}}],
            },
            Q_RANGE,
        ),
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
    panel = {
        "resourceType": "Observation",
        "id": "p2",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
        "hasMember": [{"reference": "Observation/w"}],
    }
    res = [
        observation("w", "wbc", 5, time=False),
        panel,
        report("ghp", ["p2"], time=at(hours=1)),
        observation("n", "neutrophils_pct", 40, time=False),
        report("r2", ["n"], time=at(hours=2)),
    ]
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
    contained = {
        "resourceType": "MedicationStatement",
        "id": "c",
        "status": "active",
        "contained": [
            {
                "resourceType": "Medication",
                "id": "m1",
                "code": {"coding": [{"system": "x", "code": "1", "display": "Clozapine 25 MG"}]},
            }
        ],
        "medicationReference": {"reference": "#m1"},
        "subject": {"reference": "Patient/p1"},
        "effectivePeriod": {"start": "2024-01-01"},
    }
    res = [
        contained,
        statement("r", "Valproic Acid 250 MG", point=at(), kind="MedicationRequest"),
        statement("s", "Amoxicillin", point=at()),
        statement("e", "clozapine", point=at(), status="not-taken"),
    ]
    done = normalise_all(res)
    rows = done.exposures.set_index("resource_id")
    assert rows.loc["MedicationStatement/c", "drug"] == "clozapine" and rows["end"].isna()["MedicationStatement/c"]
    assert rows.loc["MedicationRequest/r", "drug"] == "valproate"
    assert done.skipped == {"drug not in the rules' drug list": 1, "status not-taken excluded": 1}


@pytest.mark.parametrize(
    "reference, drugs",
    [
        ("Medication/m9", ["metronidazole"]),
        ("http://other.example/fhir/Medication/m9", []),
    ],  # issue 9.14: another server's Medication is not ours
)
def test_medication_reference_resolved_after_the_fact(reference, drugs):
    ms = statement("s", None, point=at())
    del ms["medicationCodeableConcept"]
    ms["medicationReference"] = {"reference": reference}
    med = {
        "resourceType": "Medication",
        "id": "m9",
        "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "6922"}]},
    }
    done = normalise_all([ms, med])
    assert list(done.exposures.drug) == drugs
    assert done.skipped == ({} if drugs else {"drug not in the rules' drug list": 1})


def test_an_integer_too_large_for_a_float_is_not_a_number():
    done = normalise_all([observation("x", "wbc", 10**400)])
    assert done.quarantined == [(0, "Observation/x", ["value is not a Quantity with a numeric value"])]


# -- issue 9.2: an Observation whose status is missing, null or not a string is quarantined, saying so --------------
@pytest.mark.parametrize("status", ["missing", None, 5, ["final"], {"code": "final"}])
def test_status_missing_null_or_not_a_string_is_quarantined(status):
    obs = observation("x", "wbc", 2.0)
    if status == "missing":
        del obs["status"]
    else:
        obs["status"] = status
    done = normalise_all([patient(), obs])
    assert done.quarantined == [(1, "Observation/x", ["status missing or not a string"])]
    assert done.observations.empty


def test_status_of_an_out_of_scope_observation_is_not_looked_at():
    obs = observation("x", "wbc", 2.0, code="30405-5")
    del obs["status"]
    assert normalise_all([obs]).skipped == {SKIP_OUT_OF_SCOPE: 1}


# -- issue 9.14: a subject on another server is not the local Patient of the same id ----------------------------------
FOREIGN = "http://other.example/fhir/Patient/p1"


def test_subject_on_another_server_is_quarantined_when_no_base_is_known():
    done = normalise_all([patient(), observation("x", "wbc", 2.0, patient=FOREIGN)])
    assert done.quarantined == [(1, "Observation/x", ["subject refers to another server"])]
    assert done.observations.empty


@pytest.mark.parametrize(
    "reference, base, local",
    [
        ("http://fhir.example/r4/Patient/p1", "http://fhir.example/r4", True),
        ("http://fhir.example/r4/Patient/p1", "http://fhir.example/r4/", True),  # a base with its trailing slash
        ("http://fhir.example/r4/Patient/p1/_history/3", "http://fhir.example/r4", True),
        ("HTTP://FHIR.EXAMPLE/r4/Patient/p1", "http://fhir.example/r4", True),  # scheme and host are case-blind
        ("https://fhir.example:443/r4/Patient/p1", "https://fhir.example/r4", True),  # the default port
        ("https://fhir.example:8443/r4/Patient/p1", "https://fhir.example/r4", False),
        ("http://fhir.example/r4/Patient/p1", "https://fhir.example/r4", False),  # another scheme: another server
        ("http://fhir.example/r4/Patient/p1", "http://fhir.example/r5", False),
        ("http://fhir.example/r4x/Patient/p1", "http://fhir.example/r4", False),  # a prefix of the path is not it
        ("http://other.example/fhir/Patient/p1", "http://fhir.example/fhir", False),
        ("Patient/p1", "http://fhir.example/fhir", True),  # relative: always local
    ],
)
def test_subject_is_local_only_under_a_base_the_caller_passes(reference, base, local):
    done = normalise_all([patient(), observation("x", "wbc", 2.0, patient=reference)], base_url=base)
    if local:
        assert done.quarantined == [] and list(done.observations.patient_id) == ["Patient/p1"]
    else:
        assert done.quarantined == [(1, "Observation/x", ["subject refers to another server"])]


def test_several_local_bases_may_be_passed():
    res = [
        patient(),
        observation("x", "wbc", 2.0, patient="https://a.example/fhir/Patient/p1"),
        observation("y", "wbc", 2.0, patient="https://b.example/fhir/Patient/p1"),
    ]
    done = normalise_all(res, base_url=["https://a.example/fhir", "https://b.example/fhir"])
    assert done.quarantined == [] and len(done.observations) == 2


def test_an_exposure_of_a_patient_on_another_server_is_quarantined():
    done = normalise_all([patient(), statement("m", "clozapine", point=at(), patient_ref=FOREIGN)])
    assert done.quarantined == [(1, "MedicationStatement/m", ["subject refers to another server"])]
    assert done.exposures.empty


# -- clinical-rules v1.1 §1.2: a reference-range bound without a unit is read in the value's unit -------------------
@pytest.mark.parametrize(
    "value, unit, bound, lln", [(4.2, "10*9/L", 4.5, 4.5), (4200, "/uL", 4500, 4.5), (8.0, "g/dL", 12.0, 12.0)]
)
def test_range_bound_without_a_unit_is_in_the_value_unit(value, unit, bound, lln):
    concept = "hemoglobin" if unit == "g/dL" else "wbc"
    obs = observation("w", concept, value, unit=unit)
    obs["referenceRange"] = [{"low": {"value": bound}}]
    assert normalise_all([obs]).observations.lln[0] == pytest.approx(lln)


def test_bare_range_bound_1000x_off_is_still_a_wrong_unit():
    obs = observation("w", "wbc", 7.8)  # 10*9/L, yet the bare range is in cells/uL
    obs["referenceRange"] = [{"low": {"value": 3500}, "high": {"value": 10500}}]
    assert normalise_all([obs]).quarantined == [(0, "Observation/w", [Q_RANGE])]


# -- clinical-rules §1.3: a range's `age` is a calendar age (completed years, months, days), like the age bands ------
def _aged_range(high: dict | None = None, low: dict | None = None) -> dict:
    obs = observation("w", "wbc", 4.8, time="PLACEHOLDER")
    age = {k: v for k, v in (("low", low), ("high", high)) if v}
    obs["referenceRange"] = [{"low": {"value": 5.0, "unit": "10*9/L"}, "age": age}]
    return obs


@pytest.mark.parametrize(
    "time, applies",
    [
        ("2017-09-01T00:00:00Z", True),  # 17 and a half: "17 years" still (completed years <= 17)
        ("2018-02-28T23:59:59Z", True),  # the last second before the 18th birthday
        ("2018-03-01T00:00:00Z", False),  # 18 from the birthday on
    ],
)
def test_range_age_high_is_inclusive_in_completed_years(time, applies):
    obs = _aged_range(high={"value": 17, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"})
    obs["effectiveDateTime"] = time
    frame = normalise_all([patient("p1", "2000-03-01"), obs]).observations
    assert bool(frame.lln[0] == 5.0) is applies and math.isnan(frame.lln[0]) is not applies


@pytest.mark.parametrize(
    "birth, time, applies",
    [
        ("2024-01-31", "2024-02-28T23:59:59Z", False),  # 1 month after 31 January is 29 February (leap year)
        ("2024-01-31", "2024-02-29T00:00:00Z", True),
        ("2020-02-29", "2021-02-27T23:59:59Z", False),  # born on 29 February: 1 year old on 28 February
        ("2020-02-29", "2021-02-28T00:00:00Z", True),
    ],
)
def test_range_age_low_in_months_and_years_on_calendar_edges(birth, time, applies):
    unit = "mo" if birth == "2024-01-31" else "a"
    obs = _aged_range(low={"value": 1, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit})
    obs["effectiveDateTime"] = time
    frame = normalise_all([patient("p1", birth), obs]).observations
    assert bool(frame.lln[0] == 5.0) is applies


def test_a_range_age_that_cannot_be_read_makes_the_range_not_applicable():
    obs = _aged_range(high={"value": 17, "unit": "lunar cycles"})
    obs["effectiveDateTime"] = "2010-01-01T00:00:00Z"
    frame = normalise_all([patient("p1", "2000-03-01"), obs]).observations
    assert math.isnan(frame.lln[0])  # the age default applies, never a range whose population we cannot tell
