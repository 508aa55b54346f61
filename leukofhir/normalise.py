"""Turn FHIR JSON dicts into tidy, compact rows (counts, patients, exposures) without building FHIR models."""

from __future__ import annotations

import math
import re
import sys
from array import array
from itertools import compress
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

import numpy as np
import pandas as pd

from leukofhir.config import Rules
from leukofhir.reader import reference_target

__all__ = ["Normaliser", "Normalised", "PatientInfo", "parse_time_ns", "NAT", "OBSERVATION_COLUMNS"]

NAT = np.iinfo(np.int64).min  # NaT as int64 nanoseconds: the "no time yet" marker of a compact row
_NAN = math.nan
_FLOAT_MAX = sys.float_info.max
_MISS = object()
# Per-run caches of repeated strings (subject references, effective times) are cleared past this many entries.
_CACHE_LIMIT = 65536

OBSERVATION_COLUMNS = [
    "row_id", "resource_id", "version", "patient_id", "concept", "code", "value", "comparator",
    "unit", "status", "time", "lln", "panel",
]
# `agent`: the medication as the source names it (the matched ingredient, else its display), so a Flag can
# say "oxaliplatin", not only "antineoplastic chemotherapy" (clinical-rules §3: the text names the drug).
EXPOSURE_COLUMNS = ["row_id", "resource_id", "patient_id", "drug", "agent", "start", "end", "status"]

# Skip reasons (counted, never quarantined: clinical-rules §1.1 "ignored, not quarantined").
SKIP_OUT_OF_SCOPE = "code out of scope"
SKIP_DATA_ABSENT = "documented absence (dataAbsentReason)"
SKIP_PRELIMINARY = "status preliminary (not enabled)"
SKIP_NOT_USED = "resource type not used"
SKIP_NOT_ENABLED = "resource type not enabled"
SKIP_DRUG = "drug not in the rules' drug list"
SKIP_SUPERSEDED = "superseded by a later version"

# Quarantine reasons found here (structural); value plausibility is the GX step's (validate.py).
Q_SUBJECT = "subject is not a Patient reference"
Q_SUBJECT_UNRESOLVED = "subject does not resolve to a Patient in the input"
Q_NO_TIME = "no clinically relevant time"
Q_BAD_TIME = "effective time is not a valid dateTime"
Q_NOT_NUMERIC = "value is not a Quantity with a numeric value"
Q_RANGE = "reference range about 1000x off the value (wrong unit)"
Q_NO_EXPOSURE_TIME = "no exposure time (effective[x] or authoredOn)"
Q_BAD_BIRTHDATE = "Patient.birthDate is not a valid date"


def _status_skip(status: str) -> str:
    return f"status {status} ignored"


def _excluded_skip(status: str) -> str:
    return f"status {status} excluded"


def parse_time_ns(text) -> int | None:
    """FHIR dateTime/instant -> int64 ns UTC; a date or partial date is its first instant; no zone means UTC."""
    if not isinstance(text, str) or len(text) < 4:
        return None
    try:
        if len(text) <= 10:
            parts = text.split("-")
            moment = datetime(int(parts[0]), int(parts[1]) if len(parts) > 1 else 1,
                              int(parts[2]) if len(parts) > 2 else 1, tzinfo=timezone.utc)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
    except (ValueError, IndexError):
        return None
    if not _EARLIEST <= moment <= _LATEST:
        return None  # outside int64 nanoseconds (years 1678-2261): no real clinical time, and would overflow
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


_EARLIEST = datetime(1678, 1, 1, tzinfo=timezone.utc)
_LATEST = datetime(2261, 12, 31, tzinfo=timezone.utc)


@dataclass(frozen=True, slots=True)
class PatientInfo:
    """What the rules need of a Patient (§1.3): birth date, administrative gender, benign-ethnic-neutropenia mark."""

    birth_date: date | None = None
    gender: str | None = None
    ben: bool = False


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


def _text(value) -> str | None:
    """A JSON value that must be a string: anything else counts as absent (a list is not a status)."""
    return value if isinstance(value, str) else None


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _number(value) -> bool:
    """A finite JSON number (not a bool); an int too large for a float is not one (it cannot be converted)."""
    kind = type(value)
    if kind is float:
        return value - value == 0.0  # False for inf and nan
    if kind is int:
        return -_FLOAT_MAX <= value <= _FLOAT_MAX
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return -_FLOAT_MAX <= value <= _FLOAT_MAX if isinstance(value, int) else math.isfinite(value)


def _ref(resource: dict) -> str | None:
    rid = resource.get("id")
    return f"{resource.get('resourceType')}/{rid}" if isinstance(rid, str) and rid else None


def _observation_key(reference) -> str | None:
    """`Observation/<id>` for a reference to an Observation (or to an untyped id), else None."""
    if type(reference) is str and len(reference) > 12 and reference.startswith("Observation/") \
            and reference.find("/", 12) < 0:
        return reference  # already the key: no new string (a report lists every result of a run)
    kind, rid = reference_target(reference)
    return f"Observation/{rid}" if rid and kind in (None, "Observation") else None


def _range_value(q, factors: dict) -> float | None:
    """A referenceRange low/high in the concept's canonical unit, or None."""
    if not isinstance(q, dict):
        return None
    value = q.get("value")
    if not _number(value):
        return None
    code = q.get("code")
    factor = factors.get(code) if isinstance(code, str) else None
    if factor is None:
        unit = q.get("unit")
        factor = factors.get(unit) if isinstance(unit, str) else None
    return value * factor if factor is not None else None


@dataclass
class _Range:
    """A referenceRange that applies only to some patients; resolved once the Patient is known (§1.3)."""

    low: float
    sex: str | None
    age_low: float | None
    age_high: float | None


@dataclass
class _Rows:
    """Observation rows kept columnar and compact: 1,000,000 of them must fit well under 1.5 GB."""

    index: array = field(default_factory=lambda: array("q"))
    resource_id: list = field(default_factory=list)
    version: list = field(default_factory=list)
    patient: list = field(default_factory=list)
    concept: list = field(default_factory=list)
    code: list = field(default_factory=list)
    value: array = field(default_factory=lambda: array("d"))
    comparator: list = field(default_factory=list)
    unit: list = field(default_factory=list)
    status: list = field(default_factory=list)
    time: array = field(default_factory=lambda: array("q"))
    lln: array = field(default_factory=lambda: array("d"))


class Normaliser:
    """Feed resources one at a time (`add`), then `finish()`; holds rows, never the raw resources."""

    def __init__(self, rules: Rules):
        self.rules = rules
        obs = rules.observations
        self._loinc = obs.code_system
        self._code_to_concept = rules.code_to_concept
        self._units = rules.concept_units
        self._ucum = rules.units.ucum_system
        self._mismatch = rules.units.range_mismatch_factor
        self._mismatch_low = rules.units.range_mismatch_low_factor
        self._low_check = set(rules.units.range_mismatch_low_concepts)
        self._ignored = set(obs.statuses.ignored)
        self._preliminary_counts = obs.statuses.preliminary_counts
        meds = rules.medications
        self._med_types = {"MedicationStatement"}
        if meds.include_requests:
            self._med_types.add("MedicationRequest")
        if meds.include_administrations:
            self._med_types.add("MedicationAdministration")
        self._excluded = {k: set(v) for k, v in meds.excluded_statuses.items()}
        self._rxnorm = {code: key for key, d in meds.drugs.items() for code in d.rxnorm}
        self._atc = [(prefix.upper(), key) for key, d in meds.drugs.items() for prefix in d.atc]
        names = {name.lower(): key for key, d in meds.drugs.items() for name in d.names}
        self._drug_names = names
        self._drug_pattern = re.compile(
            r"\b(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")\b", re.IGNORECASE
        ) if names else None
        self._ben_codes = {(c.system, c.code) for c in rules.ben.codes}
        self._ben_patients = {p if p.startswith("Patient/") else f"Patient/{p}" for p in rules.ben.patients}

        self.rows = _Rows()
        self._strings: dict[str, str] = {}
        self._subjects: dict[str, str | None] = {}  # subject reference -> _patient_of's answer
        self._times: dict[str, int | None] = {}  # dateTime text -> ns (results of one panel share a time)
        self._ranges: dict[int, list[_Range]] = {}  # row position -> patient-specific ranges
        self._range_values: dict[int, tuple[float, float]] = {}  # row position -> (low, high) converted, if any
        self.report_of: dict[str, tuple[int | None, str]] = {}  # "Observation/x" -> (report time, report ref)
        self.parent_of: dict[str, tuple[int | None, str]] = {}  # member -> (panel Observation time, its ref)
        self.patients: dict[str, PatientInfo] = {}
        self.medications: dict[str, tuple[str, str | None] | None] = {}  # "Medication/x" -> (drug key, agent)
        self._ben_marked: set[str] = set()
        # (index, ref, patient, (drug key, agent) | "Medication/x" still to resolve, start, end, status)
        self._exposures: list[tuple] = []
        self.existing_flags: list[dict] = []
        self.skipped: Counter = Counter()
        self.quarantined: list[tuple[int, str | None, list[str]]] = []
        self.evaluated_other = 0
        self._skipped_index: list[tuple[int, str]] = []  # rows skipped at finish(), for the caller's bookkeeping

    # -- helpers -------------------------------------------------------------------------------------------------
    def _intern(self, text):
        if text is None:
            return None
        return self._strings.setdefault(text, text)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def _quarantine(self, index: int, resource: dict, *reasons: str) -> None:
        self.quarantined.append((index, _ref(resource), list(reasons)))

    def _patient_of(self, resource: dict) -> str | None:
        """'Patient/id', or '?id' when the reference has no type (urn:uuid), or None when not a Patient."""
        subject = resource.get("subject")
        reference = subject.get("reference") if isinstance(subject, dict) else None
        if type(reference) is str:
            patient = self._subjects.get(reference, _MISS)
            if patient is _MISS:
                patient = self._patient_of_reference(reference)
                if len(self._subjects) >= _CACHE_LIMIT:
                    self._subjects.clear()
                self._subjects[reference] = patient
            return patient
        return self._patient_of_reference(reference)

    def _patient_of_reference(self, reference) -> str | None:
        kind, rid = reference_target(reference)
        if not rid or rid.startswith("#"):
            return None
        if kind == "Patient":
            return self._intern(f"Patient/{rid}")
        if kind is None:
            return self._intern(f"?{rid}")
        return None

    def _time(self, text) -> int | None:
        """parse_time_ns, remembered: the results of one panel (and its report) carry the same text."""
        if type(text) is not str:
            return parse_time_ns(text)
        ns = self._times.get(text, _MISS)
        if ns is _MISS:
            ns = parse_time_ns(text)
            if len(self._times) >= _CACHE_LIMIT:
                self._times.clear()
            self._times[text] = ns
        return ns

    def _effective_ns(self, resource: dict) -> tuple[int | None, bool]:
        """(time, present): the clinically relevant time of §1.1 and whether one was given at all."""
        value = resource.get("effectiveDateTime")
        if value is None:
            value = resource.get("effectiveInstant")
            if value is None:
                period = resource.get("effectivePeriod")
                if isinstance(period, dict) and period.get("start") is not None:
                    return self._time(period["start"]), True
                return None, False
        return self._time(value), True

    # -- entry point ---------------------------------------------------------------------------------------------
    def add(self, resource: dict, index: int) -> None:
        """Normalise one resource; `index` is its unique sequence number in this run (the row id)."""
        kind = resource.get("resourceType")
        if kind == "Observation":
            self._observation(resource, index)
        elif kind == "Patient":
            self._patient(resource, index)
        elif kind == "DiagnosticReport":
            self._report(resource)
        elif kind in ("MedicationStatement", "MedicationRequest", "MedicationAdministration"):
            if kind in self._med_types:
                self._exposure(resource, index, kind)
            else:
                self._skip(SKIP_NOT_ENABLED)
        elif kind == "Medication":
            ref = _ref(resource)
            if ref:
                self.medications[ref] = self._drug_of_medication(resource)
            self.evaluated_other += 1
        elif kind == "Condition" and self._ben_codes and self._mark_ben(resource):
            self.evaluated_other += 1
        elif kind == "Flag":
            self.existing_flags.append(resource)
            self.evaluated_other += 1
        else:
            self._skip(SKIP_NOT_USED)

    # -- Observation (§1.1, §1.2, §1.3) --------------------------------------------------------------------------
    def _observation(self, r: dict, index: int) -> None:
        # The hot path (one call per Observation): helpers inlined, strings interned, nothing formatted but the id.
        concept = code = None
        code_block = r.get("code")
        codings = code_block.get("coding") if isinstance(code_block, dict) else None
        if isinstance(codings, list):
            loinc, to_concept = self._loinc, self._code_to_concept
            for coding in codings:
                if isinstance(coding, dict) and coding.get("system") == loinc:
                    code = coding.get("code")
                    concept = to_concept.get(code) if isinstance(code, str) else None
                    if concept is not None:
                        break
        if concept is None:
            # A panel Observation (e.g. CBC 58410-2) is out of scope, but its members take its time and panel.
            members = r.get("hasMember")
            if isinstance(members, list) and members:
                self._note_members(r, members)
            if self._ben_codes and self._mark_ben(r):
                self.evaluated_other += 1
                return
            self._skip(SKIP_OUT_OF_SCOPE)
            return
        status = r.get("status")
        if not isinstance(status, str):
            status = None
        if status in self._ignored:
            self._skip(_status_skip(status))
            return
        if status == "preliminary" and not self._preliminary_counts:
            self._skip(SKIP_PRELIMINARY)
            return
        quantity = r.get("valueQuantity")
        if quantity is None and r.get("dataAbsentReason") is not None:
            self._skip(SKIP_DATA_ABSENT)
            return
        patient = self._patient_of(r)
        if patient is None:
            self._quarantine(index, r, Q_SUBJECT)
            return
        if not isinstance(quantity, dict) or not _number(quantity.get("value")):
            self._quarantine(index, r, Q_NOT_NUMERIC)
            return
        time, present = self._effective_ns(r)
        if present and time is None:
            self._quarantine(index, r, Q_BAD_TIME)
            return
        factors = self._units[concept]
        unit = quantity.get("code") if quantity.get("system") == self._ucum else None
        if not unit or not isinstance(unit, str):
            unit = quantity.get("unit")
            if not unit or not isinstance(unit, str):
                unit = quantity.get("code")
                if not isinstance(unit, str):
                    unit = None
        factor = factors.get(unit)
        value = quantity["value"] * factor if factor is not None else _NAN
        lln = _NAN
        ranges = r.get("referenceRange")
        rows = self.rows
        if isinstance(ranges, list) and ranges:
            lln, problem = self._reference(ranges, factors, value, len(rows.index), concept in self._low_check)
            if problem:
                self._quarantine(index, r, problem)
                return
        comparator = quantity.get("comparator")
        meta = r.get("meta")
        version = meta.get("versionId") if isinstance(meta, dict) else None
        rid = r.get("id")
        intern = self._strings.setdefault
        rows.index.append(index)
        rows.resource_id.append("Observation/" + rid if isinstance(rid, str) and rid else None)
        rows.version.append(version if isinstance(version, str) else None)
        rows.patient.append(patient)
        rows.concept.append(concept)
        rows.code.append(intern(code, code))
        rows.value.append(value)
        rows.comparator.append(intern(comparator, comparator) if isinstance(comparator, str) else None)
        rows.unit.append(intern(unit, unit) if unit is not None else None)
        rows.status.append(intern(status, status) if status is not None else None)
        rows.time.append(NAT if time is None else time)
        rows.lln.append(lln)

    def _reference(self, ranges: list, factors: dict, value: float, position: int, low_check: bool) -> tuple[float, str | None]:
        """The LLN of §1.3 when it applies to everyone; patient-specific ranges are kept to resolve later."""
        lln = _NAN
        specific: list[_Range] = []
        for rr in ranges:
            if not isinstance(rr, dict):
                continue
            low = _range_value(rr.get("low"), factors)
            high = _range_value(rr.get("high"), factors)
            if value == value and value > 0:
                # §1.2: a value ~1000x above the range's high means a wrong unit. Below the low only for
                # concepts that cannot truly be ~0 (a true ANC of 0.01 must never be quarantined).
                # Without a high, 10× the low stands in for it (no normal range is wider than that).
                top = high if high is not None else (low * 10 if low is not None else None)
                if top is not None and top > 0 and value > top * self._mismatch:
                    return lln, Q_RANGE
                if low_check and low is not None and low > 0 and value * self._mismatch_low < low:
                    return lln, Q_RANGE
            if low is None:
                continue
            applies, age = rr.get("appliesTo"), rr.get("age")
            if not applies and not age:
                if lln != lln:
                    lln = low
                continue
            sex = None
            if isinstance(applies, list):
                for concept in applies:
                    for coding in _list(concept.get("coding")) if isinstance(concept, dict) else []:
                        if isinstance(coding, dict) and _text(coding.get("code")) in ("male", "female", "248153007", "248152002"):
                            sex = {"248153007": "male", "248152002": "female"}.get(coding["code"], coding["code"])
                    text = concept.get("text") if isinstance(concept, dict) else None
                    if sex is None and isinstance(text, str) and text.lower() in ("male", "female"):
                        sex = text.lower()
                if sex is None:
                    continue  # applies to a population we cannot recognise: not applicable (§1.3)
            age_low = age_high = None
            if isinstance(age, dict):
                age_low = self._years(age.get("low"))
                age_high = self._years(age.get("high"))
            specific.append(_Range(low, sex, age_low, age_high))
        if specific:
            self._ranges[position] = specific
        return lln, None

    @staticmethod
    def _years(q) -> float | None:
        if not isinstance(q, dict) or not _number(q.get("value")):
            return None
        per_year = {"a": 1, "yr": 1, "year": 1, "years": 1, "mo": 12, "month": 12, "months": 12,
                    "wk": 52.1775, "d": 365.25, "day": 365.25, "days": 365.25}
        divisor = per_year.get(_text(q.get("code")) or _text(q.get("unit")) or "a")
        return q["value"] / divisor if divisor else None

    def _note_members(self, panel: dict, members: list) -> None:
        ref = _ref(panel)
        if ref is None:
            return
        time, _ = self._effective_ns(panel)
        entry = (time, self._intern(ref))  # one tuple shared by every member
        for member in members:
            if isinstance(member, dict):
                key = _observation_key(member.get("reference"))
                if key is not None:
                    self.parent_of[key] = entry

    # -- DiagnosticReport: time fallback and panel grouping (§1.1, §2 ANC from the same panel) ------------------
    def _report(self, r: dict) -> None:
        self.evaluated_other += 1
        ref = _ref(r)
        results = r.get("result")
        if ref is None or not isinstance(results, list):
            return
        time, _ = self._effective_ns(r)
        entry = (time, self._intern(ref))  # one tuple shared by every result
        report_of = self.report_of
        for result in results:
            if isinstance(result, dict):
                key = _observation_key(result.get("reference"))
                if key is not None:
                    report_of[key] = entry

    # -- Patient (§1.3) ------------------------------------------------------------------------------------------
    def _patient(self, r: dict, index: int) -> None:
        ref = _ref(r)
        birth = r.get("birthDate")
        born = None
        if birth is not None:
            try:
                parts = str(birth).split("-")
                born = date(int(parts[0]), int(parts[1]) if len(parts) > 1 else 1, int(parts[2]) if len(parts) > 2 else 1)
            except (ValueError, IndexError):
                self._quarantine(index, r, Q_BAD_BIRTHDATE)
                return
        if ref is None:
            self._quarantine(index, r, "Patient has no id")
            return
        gender = r.get("gender") if isinstance(r.get("gender"), str) else None
        self.patients[self._intern(ref)] = PatientInfo(born, gender)
        self.evaluated_other += 1

    def _mark_ben(self, r: dict) -> bool:
        """Benign ethnic neutropenia by code on an Observation or Condition of the patient (§2)."""
        block = r.get("code")
        codings = block.get("coding") if isinstance(block, dict) else None
        if not isinstance(codings, list):
            return False
        if not any(isinstance(c, dict) and (_text(c.get("system")), _text(c.get("code"))) in self._ben_codes
                   for c in codings):
            return False
        patient = self._patient_of(r)
        if patient is None:
            return False
        self._ben_marked.add(patient)
        return True

    # -- medication exposure (§1.4) ------------------------------------------------------------------------------
    def _drug_of_concept(self, concept) -> tuple[str, str | None] | None:
        """(drug key, agent) by RxNorm ingredient, then ATC prefix, then ingredient name as a word (§1.4)."""
        if not isinstance(concept, dict):
            return None
        codings = [c for c in _list(concept.get("coding")) if isinstance(c, dict)]
        texts = [c["display"] for c in codings if isinstance(c.get("display"), str)]
        if isinstance(concept.get("text"), str):
            texts.append(concept["text"])
        named = None
        if self._drug_pattern is not None:
            for text in texts:
                match = self._drug_pattern.search(text)
                if match:
                    named = match.group(1).lower()
                    break
        # The agent shown in the Flag: the ingredient name when one is recognised, else the source's wording.
        agent = named or (texts[0] if texts else None)
        rx_system = self.rules.medications.rxnorm_system
        for coding in codings:
            system, code = coding.get("system"), coding.get("code")
            if isinstance(code, str):
                if system == rx_system and code in self._rxnorm:
                    return self._rxnorm[code], agent
                if isinstance(system, str) and "atc" in system.lower():
                    upper = code.upper()
                    for prefix, key in self._atc:
                        if upper.startswith(prefix):
                            return key, agent
        if named is not None:
            return self._drug_names[named], agent
        return None

    def _drug_of_medication(self, medication: dict) -> tuple[str, str | None] | None:
        key = self._drug_of_concept(medication.get("code"))
        if key is None:
            for ingredient in _list(medication.get("ingredient")):
                if isinstance(ingredient, dict):
                    key = self._drug_of_concept(ingredient.get("itemCodeableConcept"))
                    if key:
                        break
        return key

    def _exposure(self, r: dict, index: int, kind: str) -> None:
        status = _text(r.get("status"))
        if status in self._excluded.get(kind, ()):
            self._skip(_excluded_skip(status))
            return
        drug = None
        if "medicationCodeableConcept" in r:
            drug = self._drug_of_concept(r["medicationCodeableConcept"])
        else:
            med = r.get("medicationReference")
            reference = med.get("reference") if isinstance(med, dict) else None
            if isinstance(reference, str) and reference.startswith("#"):
                for contained in _list(r.get("contained")):
                    if isinstance(contained, dict) and contained.get("id") == reference[1:]:
                        drug = self._drug_of_medication(contained)
            elif isinstance(reference, str):
                kind_, rid = reference_target(reference)
                if rid:
                    drug = f"Medication/{rid}"  # resolved in finish(): the Medication may come later
        if drug is None:
            self._skip(SKIP_DRUG)
            return
        patient = self._patient_of(r)
        if patient is None:
            self._quarantine(index, r, Q_SUBJECT)
            return
        start = end = None
        period = r.get("effectivePeriod")
        if isinstance(period, dict) and (period.get("start") or period.get("end")):
            start = parse_time_ns(period.get("start"))
            end = parse_time_ns(period.get("end")) if period.get("end") else None
            if start is None:
                self._quarantine(index, r, Q_NO_EXPOSURE_TIME)
                return
        else:
            point = r.get("effectiveDateTime") or (r.get("authoredOn") if kind == "MedicationRequest" else None)
            start = end = parse_time_ns(point)
            if start is None:
                self._quarantine(index, r, Q_NO_EXPOSURE_TIME)
                return
        self._exposures.append((index, _ref(r), patient, drug, start, end, status))

    # -- end of input ------------------------------------------------------------------------------------------
    def finish(self) -> Normalised:
        """Resolve what needed the whole input (report times, typeless subjects, Medications), then tidy tables."""
        rows = self.rows
        n = len(rows.index)
        keep = np.ones(n, dtype=bool)
        times = np.frombuffer(rows.time, dtype=np.int64).copy() if n else np.empty(0, dtype=np.int64)
        llns = np.frombuffer(rows.lln, dtype=np.float64).copy() if n else np.empty(0, dtype=np.float64)
        rids = rows.resource_id
        patients = rows.patient
        found: list[tuple[int, str | None, list[str]]] = []  # quarantined here, put in row order below
        # The report (or the panel's report) and the panel Observation of each row: its panel, and its time when
        # it has none of its own. Comprehensions over the whole column; Python loops only over the exceptions.
        report_get = self.report_of.get
        reports = [report_get(rid) for rid in rids]
        if self.parent_of:
            parent_get = self.parent_of.get
            parents = [parent_get(rid) for rid in rids]
            for i, parent in enumerate(parents):
                if parent is not None and reports[i] is None:
                    reports[i] = report_get(parent[1])
            panels = [r[1] if r is not None else (p[1] if p is not None else None) for r, p in zip(reports, parents)]
        else:
            parents = None
            panels = [None if r is None else r[1] for r in reports]
        for i in np.flatnonzero(times == NAT).tolist():
            for source in (reports[i], parents[i] if parents is not None else None):
                if source is not None and source[0] is not None:
                    times[i] = source[0]
                    break
            else:
                found.append((int(rows.index[i]), rids[i], [Q_NO_TIME]))
                keep[i] = False
        del reports, parents
        typeless = {p for p in set(patients) if p.startswith("?")}
        if typeless:
            for i, patient in enumerate(patients):
                if patient in typeless and keep[i]:
                    resolved = f"Patient/{patient[1:]}"
                    if resolved in self.patients:
                        patients[i] = self._intern(resolved)
                    else:
                        found.append((int(rows.index[i]), rids[i], [Q_SUBJECT_UNRESOLVED]))
                        keep[i] = False
        self.quarantined.extend(sorted(found, key=lambda q: q[0]))
        for i, ranges in self._ranges.items():
            if keep[i]:
                llns[i] = self._specific_lln(ranges, patients[i], int(times[i]), llns[i])
        self._drop_superseded(keep)
        columns = {
            "row_id": [str(x) for x in rows.index],
            "resource_id": rids,
            "version": rows.version,
            "patient_id": patients,
            "concept": rows.concept,
            "code": rows.code,
            "value": np.frombuffer(rows.value, dtype=np.float64) if n else np.empty(0),
            "comparator": rows.comparator,
            "unit": rows.unit,
            "status": rows.status,
            "time": times,
            "lln": llns,
            "panel": panels,
        }
        self.rows = _Rows()  # release the compact copy
        del rows, rids, patients, panels
        if not keep.all():
            # Filter before the frame is built: one DataFrame, never a second filtered copy of it.
            for name, column in columns.items():
                columns[name] = column[keep] if isinstance(column, np.ndarray) else list(compress(column, keep))
        columns["row_id"] = pd.array(columns["row_id"], dtype="str")
        columns["time"] = _timestamps(columns["time"])
        frame = pd.DataFrame(columns, columns=OBSERVATION_COLUMNS)
        del columns
        patients_out = {
            ref: PatientInfo(info.birth_date, info.gender, ref in self._ben_marked or ref in self._ben_patients)
            for ref, info in self.patients.items()
        }
        return Normalised(
            observations=frame,
            exposures=self._exposure_frame(),
            patients=patients_out,
            existing_flags=self.existing_flags,
            skipped=self.skipped,
            quarantined=self.quarantined,
            evaluated_other=self.evaluated_other,
        )

    def _drop_superseded(self, keep: np.ndarray) -> None:
        """Two versions of one Observation in the input: only the latest counts (§4, a correction replaces)."""
        rows = self.rows
        if not rows.resource_id:
            return
        # Only resource ids that occur more than once need a look (a hash pass in C finds them).
        repeated = pd.Series(rows.resource_id, dtype=object).duplicated(keep=False).to_numpy() & keep
        latest: dict[str, int] = {}
        dropped = 0
        for i in np.flatnonzero(repeated).tolist():
            rid = rows.resource_id[i]
            if rid is None:
                continue
            previous = latest.get(rid)
            if previous is None:
                latest[rid] = i
                continue
            v_old, v_new = rows.version[previous], rows.version[i]
            if v_old == v_new:
                continue  # the same version twice: the GX step reports the duplicate
            newer = _version_key(v_new) >= _version_key(v_old)
            loser = previous if newer else i
            if newer:
                latest[rid] = i
            keep[loser] = False
            dropped += 1
        if dropped:
            self.skipped[SKIP_SUPERSEDED] += dropped

    def _specific_lln(self, ranges: list[_Range], patient: str, time_ns: int, default: float) -> float:
        info = self.patients.get(patient)
        for rr in ranges:
            if rr.sex is not None and (info is None or info.gender != rr.sex):
                continue
            if rr.age_low is not None or rr.age_high is not None:
                if info is None or info.birth_date is None:
                    continue
                born = datetime(info.birth_date.year, info.birth_date.month, info.birth_date.day, tzinfo=timezone.utc)
                years = (time_ns / 1e9 - born.timestamp()) / (365.25 * 86400)
                if (rr.age_low is not None and years < rr.age_low) or (rr.age_high is not None and years > rr.age_high):
                    continue
            return rr.low
        return default

    def _exposure_frame(self) -> pd.DataFrame:
        records = []
        for index, ref, patient, drug, start, end, status in self._exposures:
            if isinstance(drug, str):
                drug = self.medications.get(drug)
                if drug is None:
                    self._skip(SKIP_DRUG)
                    continue
            if patient.startswith("?"):
                resolved = f"Patient/{patient[1:]}"
                if resolved not in self.patients:
                    self.quarantined.append((index, ref, [Q_SUBJECT_UNRESOLVED]))
                    continue
                patient = resolved
            records.append((str(index), ref, patient, drug[0], drug[1], start, end, status))
        columns = list(zip(*records)) if records else [()] * len(EXPOSURE_COLUMNS)
        data = dict(zip(EXPOSURE_COLUMNS, map(list, columns)))
        for column in ("start", "end"):
            data[column] = _timestamps(np.array([NAT if v is None else v for v in data[column]], dtype=np.int64))
        data["row_id"] = pd.array(data["row_id"], dtype="str")
        return pd.DataFrame(data, columns=EXPOSURE_COLUMNS)


def _timestamps(ns: np.ndarray) -> pd.DatetimeIndex:
    """int64 ns (NAT marker for none) -> tz-aware UTC timestamps, NaT where there is none."""
    return pd.to_datetime(ns.view("datetime64[ns]"), utc=True)


def _version_key(version: str | None) -> tuple:
    if version is None:
        return (0, 0, "")
    return (1, int(version), "") if version.isdigit() else (1, -1, version)
