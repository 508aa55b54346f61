"""The Normaliser: feed resources one at a time, each to the reader of its kind; `finish()` gives the tidy tables."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pandas as pd

from leukofhir.config import Rules
from leukofhir.normalise.context import SKIP_NOT_USED, Context
from leukofhir.normalise.exposures import MEDICATION_KINDS, Exposures
from leukofhir.normalise.observations import Observations
from leukofhir.normalise.patients import PatientInfo, Patients
from leukofhir.normalise.reports import Reports


@dataclass
class Normalised:
    """The tidy result of one input: rows, patients, and every resource's bucket so far."""

    observations: pd.DataFrame
    exposures: pd.DataFrame
    patients: dict[str, PatientInfo]
    existing_flags: list[dict]
    skipped: Counter
    quarantined: list[tuple[int, str | None, list[str]]]  # (resource index, "Type/id", reasons)
    evaluated_other: int  # resources used whole, outside the row tables (Patients, reports, Medications, Flags)
    # Observations in scope quarantined here: (row id, resource id, patient, concept, unit, reason), for the contract.
    refused_observations: list[tuple]


def _existing_flags_reader(flags: list[dict], context: Context):
    """Flags already on the server (the project's own, for the write step's comparison) are kept whole."""

    def add(resource: dict, index: int) -> None:
        flags.append(resource)
        context.evaluated_other += 1

    return add


class Normaliser:
    """Feed resources one at a time (`add`), then `finish()`; holds rows, never the raw resources.

    `base_url`: the base URL (or a list of them) of the server the input comes from. An absolute reference under it
    is local; any other absolute reference names another server (a subject there is quarantined). Offline, with no
    base, every absolute URL is another server's."""

    def __init__(self, rules: Rules, base_url: str | list[str] | tuple[str, ...] | None = None):
        self.rules = rules
        self.context = context = Context(rules, base_url)
        self.patients = Patients(context)
        self.reports = Reports(context)
        self.observations = Observations(context, self.reports, self.patients)
        self.exposures = Exposures(context, self.patients)
        self.existing_flags: list[dict] = []
        self._readers = {
            "Observation": self.observations.add,
            "Patient": self.patients.add,
            "DiagnosticReport": self.reports.add,
            "Medication": self.exposures.add_medication,
            "Condition": self.patients.add_condition,
            "Flag": _existing_flags_reader(self.existing_flags, context),
            **{kind: self.exposures.add for kind in MEDICATION_KINDS},
        }

    def add(self, resource: dict, index: int) -> None:
        """Normalise one resource; `index` is its unique sequence number in this run (the row id)."""
        reader = self._readers.get(resource.get("resourceType"))
        if reader is None:
            self.context.skipped[SKIP_NOT_USED] += 1
        else:
            reader(resource, index)

    def add_context(self, resource: dict) -> None:
        """A resource read elsewhere that this input's resources refer to (a Medication given to each partition of an
        input that references it): used to resolve references, never counted (it is counted where it was read)."""
        if resource.get("resourceType") == "Medication":
            self.exposures.note_medication(resource)

    def finish(self) -> Normalised:
        """Resolve what needed the whole input (report times, typeless subjects, Medications), then the tidy tables."""
        observations = self.observations.finish()
        exposures = self.exposures.finish()
        context = self.context
        return Normalised(
            observations=observations,
            exposures=exposures,
            patients=self.patients.finish(),
            existing_flags=self.existing_flags,
            skipped=context.skipped,
            quarantined=context.quarantined,
            evaluated_other=context.evaluated_other,
            refused_observations=self.observations.refused,
        )
