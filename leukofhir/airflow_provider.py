"""Airflow provider metadata: registers the `fhir` connection type and its hook (entry point apache_airflow_provider)."""

from __future__ import annotations


def get_provider_info() -> dict:
    return {
        "package-name": "leukofhir",
        "name": "leukofhir",
        "description": "FHIR R4 leukopenia surveillance: a `fhir` connection type for the hospital's FHIR server.",
        "versions": ["0.1.0"],
        "connection-types": [
            {"connection-type": "fhir", "hook-class-name": "leukofhir.airflow_hook.FhirHook"},
        ],
    }
