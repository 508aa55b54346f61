"""A report.json as `leukofhir evaluate` writes it, shared by the HTML and browser tests."""

from __future__ import annotations


def sample_report() -> dict:
    return {
        "inputs": ["tests/data/external/smart-generated-sample-data-R4-synthea/Observation.cbc.ndjson.gz",
                   "tests/data/external/hl7-fhir-r4-examples/Bundle-ghp.json"],
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
            "expect_column_values_to_be_in_set(unit): value '10*12/L' not accepted": ["Observation/u1",
                                                                                       "Observation/u2"],
            "expect_column_pair_values_a_to_be_greater_than_b(panel_wbc, value): value 9.5 above panel_wbc 4.1":
                ["Observation/d7"],
        },
        "read_errors": 1,
        "stages": {"read": 18853, "normalised": 17948, "validated": 17913, "evaluated": 17901},
        "expectations": [
            {"suite": "observations", "name": "expect_column_values_to_be_in_set", "column": "unit",
             "why": "clinical-rules 1.2: an unknown unit is quarantined, never guessed", "success": False,
             "unexpected_count": 31, "element_count": 13026, "examples": ["Observation/u1", "Observation/u2"]},
            {"suite": "observations", "name": "expect_column_values_to_not_be_null", "column": "patient_id",
             "success": True, "unexpected_count": 0, "element_count": 13026, "examples": []},
        ],
        "flags": {
            "total": 57,
            "by_code": {"Leukopenia": 40, "Neutropenia": 12, "Pancytopenia": 5},
            "by_status": {"active": 9, "inactive": 48},
            "by_code_status": {"Leukopenia|active": 6, "Leukopenia|inactive": 34, "Neutropenia|active": 3,
                               "Neutropenia|inactive": 9, "Pancytopenia|inactive": 5},
            "per_day": {"2024-11-02": 3, "2024-12-24": 20, "2025-01-15": 30, "2025-02-27": 4},
        },
    }
