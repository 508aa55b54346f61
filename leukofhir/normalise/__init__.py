"""FHIR JSON → tidy, compact rows without building FHIR models: one reader per kind of resource over a shared context.

- `context`: what every reader shares (rules, caches, skipped/quarantined buckets, local base URLs, JSON helpers);
- `observations`: Observations with their units and reference ranges (§1.1-§1.3);
- `patients`: Patients, age and sex, benign ethnic neutropenia (§1.3, §2);
- `reports`: DiagnosticReports and panel Observations (a result's blood count and time);
- `exposures`: medication resources and Medications (§1.4);
- `normaliser`: the `Normaliser` that hands each resource to its reader, and the `Normalised` result.
"""

from leukofhir.normalise.context import (
    FOREIGN,
    NAT,
    Q_FOREIGN_SUBJECT,
    Q_SUBJECT,
    Q_SUBJECT_UNRESOLVED,
    SKIP_NOT_USED,
    parse_time_ns,
)
from leukofhir.normalise.exposures import EXPOSURE_COLUMNS, Q_NO_EXPOSURE_TIME, SKIP_DRUG, SKIP_NOT_ENABLED
from leukofhir.normalise.normaliser import Normalised, Normaliser
from leukofhir.normalise.observations import (
    OBSERVATION_COLUMNS,
    Q_BAD_TIME,
    Q_NO_TIME,
    Q_NOT_NUMERIC,
    Q_RANGE,
    Q_STATUS,
    SKIP_DATA_ABSENT,
    SKIP_OUT_OF_SCOPE,
    SKIP_PRELIMINARY,
    SKIP_SUPERSEDED,
)
from leukofhir.normalise.patients import Q_BAD_BIRTHDATE, PatientInfo

__all__ = [
    "Normaliser",
    "Normalised",
    "PatientInfo",
    "parse_time_ns",
    "NAT",
    "FOREIGN",
    "OBSERVATION_COLUMNS",
    "EXPOSURE_COLUMNS",
    "SKIP_OUT_OF_SCOPE",
    "SKIP_DATA_ABSENT",
    "SKIP_PRELIMINARY",
    "SKIP_NOT_USED",
    "SKIP_NOT_ENABLED",
    "SKIP_DRUG",
    "SKIP_SUPERSEDED",
    "Q_STATUS",
    "Q_SUBJECT",
    "Q_SUBJECT_UNRESOLVED",
    "Q_FOREIGN_SUBJECT",
    "Q_NO_TIME",
    "Q_BAD_TIME",
    "Q_NOT_NUMERIC",
    "Q_RANGE",
    "Q_NO_EXPOSURE_TIME",
    "Q_BAD_BIRTHDATE",
]
