"""Medication exposure (§1.4): MedicationStatement, MedicationRequest, MedicationAdministration, the drug they name."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from leukofhir.normalise.context import (
    FOREIGN,
    NAT,
    Q_FOREIGN_SUBJECT,
    Q_SUBJECT,
    Q_SUBJECT_UNRESOLVED,
    Context,
    LocalBases,
    as_list,
    parse_time_ns,
    resource_ref,
    timestamps,
)
from leukofhir.normalise.patients import Patients

# `agent`: the medication as the source names it (the matched ingredient, else its display), so a Flag can
# say "oxaliplatin", not only "antineoplastic chemotherapy" (clinical-rules §3: the text names the drug).
EXPOSURE_COLUMNS = ["row_id", "resource_id", "patient_id", "drug", "agent", "start", "end", "status"]
MEDICATION_KINDS = ("MedicationStatement", "MedicationRequest", "MedicationAdministration")

SKIP_NOT_ENABLED = "resource type not enabled"
SKIP_DRUG = "drug not in the rules' drug list"
Q_NO_EXPOSURE_TIME = "no exposure time (effective[x] or authoredOn)"


def medication_key(bases: LocalBases, reference) -> str | None:
    """`Medication/<id>` of a local `medicationReference` (resolved once the whole input is read), None for one on
    another server (its drug is unknown here) or none at all."""
    target = bases.target(reference)
    if target is FOREIGN:
        return None
    _, rid = target
    return f"Medication/{rid}" if rid else None


def excluded_skip(status: str) -> str:
    return f"status {status} excluded"


class Exposures:
    """Reads medication resources into exposure rows (patient, drug, period) and Medications into drugs."""

    def __init__(self, context: Context, patients: Patients):
        self.context = context
        self.patients = patients
        meds = context.rules.medications
        self.kinds = {"MedicationStatement"}
        if meds.include_requests:
            self.kinds.add("MedicationRequest")
        if meds.include_administrations:
            self.kinds.add("MedicationAdministration")
        self._excluded = {k: set(v) for k, v in meds.excluded_statuses.items()}
        # v1.1: a code is RxNorm only under the RxNorm system and ATC only under the ATC system (a batch-number
        # system's "L01-7781" is no chemotherapy, whatever its system's name contains).
        self._rxnorm_system = meds.rxnorm_system
        self._atc_system = meds.atc_system
        self._rxnorm = {code: key for key, d in meds.drugs.items() for code in d.rxnorm}
        self._atc = [(prefix.upper(), key) for key, d in meds.drugs.items() for prefix in d.atc]
        names = {name.lower(): key for key, d in meds.drugs.items() for name in d.names}
        self._drug_names = names
        self._drug_pattern = (
            re.compile(
                r"\b(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")\b", re.IGNORECASE
            )
            if names
            else None
        )
        self.medications: dict[str, tuple[str, str | None] | None] = {}  # "Medication/x" -> (drug key, agent)
        # (index, ref, patient, (drug key, agent) | "Medication/x" still to resolve, start, end, status)
        self._rows: list[tuple] = []

    # -- the drug -------------------------------------------------------------------------------------------------
    def drug_of_concept(self, concept) -> tuple[str, str | None] | None:
        """(drug key, agent) by RxNorm ingredient, then ATC prefix, then ingredient name as a word (§1.4)."""
        if not isinstance(concept, dict):
            return None
        codings = [c for c in as_list(concept.get("coding")) if isinstance(c, dict)]
        texts = [c["display"] for c in codings if isinstance(c.get("display"), str)]
        if isinstance(concept.get("text"), str):
            texts.append(concept["text"])
        named = None
        if self._drug_pattern is not None:
            for value in texts:
                match = self._drug_pattern.search(value)
                if match:
                    named = match.group(1).lower()
                    break
        # The agent shown in the Flag: the ingredient name when one is recognised, else the source's wording.
        agent = named or (texts[0] if texts else None)
        for coding in codings:
            system, code = coding.get("system"), coding.get("code")
            if not isinstance(code, str):
                continue
            if system == self._rxnorm_system and code in self._rxnorm:
                return self._rxnorm[code], agent
            if system == self._atc_system:
                upper = code.upper()
                for prefix, key in self._atc:
                    if upper.startswith(prefix):
                        return key, agent
        if named is not None:
            return self._drug_names[named], agent
        return None

    def drug_of_medication(self, medication: dict) -> tuple[str, str | None] | None:
        key = self.drug_of_concept(medication.get("code"))
        if key is None:
            for ingredient in as_list(medication.get("ingredient")):
                if isinstance(ingredient, dict):
                    key = self.drug_of_concept(ingredient.get("itemCodeableConcept"))
                    if key:
                        break
        return key

    def add_medication(self, r: dict, index: int) -> None:
        self.note_medication(r)
        self.context.evaluated_other += 1

    def note_medication(self, r: dict) -> None:
        """Remember a Medication's drug for the resources that reference it (the last copy read wins)."""
        ref = resource_ref(r)
        if ref:
            self.medications[ref] = self.drug_of_medication(r)

    def _referenced_drug(self, r: dict):
        """The drug of `medicationReference`: a contained Medication now, a local one by its key (resolved in finish(),
        as the Medication may come later), None for one on another server or none at all."""
        med = r.get("medicationReference")
        reference = med.get("reference") if isinstance(med, dict) else None
        if isinstance(reference, str) and reference.startswith("#"):
            for contained in as_list(r.get("contained")):
                if isinstance(contained, dict) and contained.get("id") == reference[1:]:
                    return self.drug_of_medication(contained)
            return None
        return medication_key(self.context.bases, reference)

    # -- the exposure ---------------------------------------------------------------------------------------------
    def add(self, r: dict, index: int) -> None:
        ctx = self.context
        kind = r.get("resourceType")
        if kind not in self.kinds:
            ctx.skip(SKIP_NOT_ENABLED)
            return
        status = r.get("status") if isinstance(r.get("status"), str) else None
        if status in self._excluded.get(kind, ()):
            ctx.skip(excluded_skip(status))
            return
        if "medicationCodeableConcept" in r:
            drug = self.drug_of_concept(r["medicationCodeableConcept"])
        else:
            drug = self._referenced_drug(r)
        if drug is None:
            ctx.skip(SKIP_DRUG)
            return
        patient = ctx.patient_of(r)
        if patient is None or patient is FOREIGN:
            ctx.quarantine(index, r, Q_SUBJECT if patient is None else Q_FOREIGN_SUBJECT)
            return
        period = r.get("effectivePeriod")
        if isinstance(period, dict) and (period.get("start") or period.get("end")):
            start = parse_time_ns(period.get("start"))
            end = parse_time_ns(period.get("end")) if period.get("end") else None
        else:
            point = r.get("effectiveDateTime") or (r.get("authoredOn") if kind == "MedicationRequest" else None)
            start = end = parse_time_ns(point)
        if start is None:
            ctx.quarantine(index, r, Q_NO_EXPOSURE_TIME)
            return
        self._rows.append((index, resource_ref(r), patient, drug, start, end, status))

    def finish(self) -> pd.DataFrame:
        """Exposure rows, with Medications and typeless subjects resolved now that the whole input was read."""
        ctx = self.context
        records = []
        for index, ref, patient, drug, start, end, status in self._rows:
            if isinstance(drug, str):
                drug = self.medications.get(drug)
                if drug is None:
                    ctx.skip(SKIP_DRUG)
                    continue
            if patient.startswith("?"):
                patient = self.patients.resolve(patient)
                if patient is None:
                    ctx.quarantined.append((index, ref, [Q_SUBJECT_UNRESOLVED]))
                    continue
            records.append((str(index), ref, patient, drug[0], drug[1], start, end, status))
        columns = list(zip(*records)) if records else [()] * len(EXPOSURE_COLUMNS)
        data = dict(zip(EXPOSURE_COLUMNS, map(list, columns)))
        for column in ("start", "end"):
            data[column] = timestamps(np.array([NAT if v is None else v for v in data[column]], dtype=np.int64))
        data["row_id"] = pd.array(data["row_id"], dtype="str")
        return pd.DataFrame(data, columns=EXPOSURE_COLUMNS)
