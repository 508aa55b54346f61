"""A report.json as `leukofhir evaluate` writes it, shared by the HTML and browser tests."""

from __future__ import annotations


def sample_report() -> dict:
    return {
        "inputs": [
            "tests/data/external/smart-generated-sample-data-R4-synthea/Observation.cbc.ndjson.gz",
            "tests/data/external/hl7-fhir-r4-examples/Bundle-ghp.json",
        ],
        "as_of": "2025-03-01T12:00:00+00:00",
        "read": {"Observation": 13526, "Patient": 615, "MedicationRequest": 4712},
        "read_total": 18853,
        "evaluated": 17901,
        "skipped": {"out of scope (LOINC code)": 905, "status registered": 12},
        "quarantined": {
            "expect_column_values_to_be_in_set(unit): value '10*12/L' not accepted": 31,
            "expect_column_pair_values_a_to_be_greater_than_b(panel_wbc, value): value 9.5 above panel_wbc 4.1": 4,
        },
        "quarantine_examples": {
            "expect_column_values_to_be_in_set(unit): value '10*12/L' not accepted": [
                "Observation/u1",
                "Observation/u2",
            ],
            "expect_column_pair_values_a_to_be_greater_than_b(panel_wbc, value): value 9.5 above panel_wbc 4.1": [
                "Observation/d7"
            ],
        },
        "read_errors": 1,
        "stages": {"read": 18853, "normalised": 17948, "validated": 17913, "evaluated": 17901},
        "expectations": [
            {
                "suite": "observations",
                "name": "expect_column_values_to_be_in_set",
                "column": "unit",
                "why": "clinical-rules 1.2: an unknown unit is quarantined, never guessed",
                "success": False,
                "unexpected_count": 31,
                "element_count": 13026,
                "examples": ["Observation/u1", "Observation/u2"],
            },
            {
                "suite": "observations",
                "name": "expect_column_values_to_not_be_null",
                "column": "patient_id",
                "success": True,
                "unexpected_count": 0,
                "element_count": 13026,
                "examples": [],
            },
        ],
        "flags": {
            "total": 57,
            "by_code": {"Leukopenia": 40, "Neutropenia": 12, "Pancytopenia": 5},
            "by_status": {"active": 9, "inactive": 48},
            "by_code_status": {
                "Leukopenia|active": 6,
                "Leukopenia|inactive": 34,
                "Neutropenia|active": 3,
                "Neutropenia|inactive": 9,
                "Pancytopenia|inactive": 5,
            },
            "per_day": {"2024-11-02": 3, "2024-12-24": 20, "2025-01-15": 30, "2025-02-27": 4},
        },
    }


def sample_trends() -> list[dict]:
    """Three Flags' pictures as leukofhir.evaluate.trends writes them in report.json: open, recovered,
    drug-associated."""
    return [
        {
            "flag": "a" * 40,
            "condition": "Agranulocytosis",
            "grade": 4,
            "status": "active",
            "start": "2025-02-10T08:00:00Z",
            "end": None,
            "measure": "ANC",
            "unit": "×10^9/L",
            "lines": [["threshold", 1.5], ["G3 <", 1.0], ["G4 <", 0.5]],
            "points": [
                ["2025-01-20T08:00:00Z", 2.4, False, None],
                ["2025-02-10T08:00:00Z", 0.4, True, None],
                ["2025-02-17T08:00:00Z", 0.1, True, "<"],
            ],
            "drugs": [["clozapine", "2024-11-01T00:00:00Z", None]],
        },
        {
            "flag": "b" * 40,
            "condition": "Leukopenia",
            "grade": 3,
            "status": "inactive",
            "start": "2024-12-01T08:00:00Z",
            "end": "2024-12-20T08:00:00Z",
            "measure": "WBC",
            "unit": "×10^9/L",
            "lines": [["LLN", 4.0], ["G2 <", 3.0], ["G3 <", 2.0], ["G4 <", 1.0]],
            "points": [
                ["2024-11-10T08:00:00Z", 5.1, False, None],
                ["2024-12-01T08:00:00Z", 3.2, True, None],
                ["2024-12-08T08:00:00Z", 1.9, True, None],
                ["2024-12-20T08:00:00Z", 4.4, False, None],
            ],
            "drugs": [],
        },
        {
            "flag": "c" * 40,
            "condition": "Lymphopenia",
            "grade": 1,
            "status": "inactive",
            "start": "2024-10-01T08:00:00Z",
            "end": "2024-10-02T08:00:00Z",
            "measure": "lymphocytes",
            "unit": "×10^9/L",
            "lines": [["LLN", 1.0], ["G2 <", 0.8], ["G3 <", 0.5], ["G4 <", 0.2]],
            "points": [["2024-10-01T08:00:00Z", 0.9, True, None], ["2024-10-02T08:00:00Z", 1.3, False, None]],
            "drugs": [],
        },
    ]
