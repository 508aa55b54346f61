"""Patients (§1.3): birth date and sex, benign ethnic neutropenia (§2), the lab ranges that fit a patient's age, sex."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from leukofhir.age import AgeSpan, age_reached_ns
from leukofhir.normalise.context import FOREIGN, SKIP_NOT_USED, Context, text

Q_BAD_BIRTHDATE = "Patient.birthDate is not a valid date"
Q_NO_PATIENT_ID = "Patient has no id"

_NEVER = 2**63  # later than any row time: an age the patient never reaches in the data


@dataclass(frozen=True, slots=True)
class PatientInfo:
    """What the rules need of a Patient (§1.3): birth date, administrative gender, benign-ethnic-neutropenia mark."""

    birth_date: date | None = None
    gender: str | None = None
    ben: bool = False


@dataclass(frozen=True, slots=True)
class AgeSexRange:
    """A referenceRange.low that applies only to some patients (`appliesTo` sex, `age`), resolved when the Patient is
    known. `age_from` is the age it starts at; `age_until` the age it no longer applies from (exclusive)."""

    low: float
    sex: str | None
    age_from: AgeSpan | None
    age_until: AgeSpan | None


def _birth_date(value) -> date:
    """A FHIR date (YYYY, YYYY-MM or YYYY-MM-DD) as its first day; ValueError when it is none."""
    parts = str(value).split("-")
    try:
        return date(int(parts[0]), int(parts[1]) if len(parts) > 1 else 1, int(parts[2]) if len(parts) > 2 else 1)
    except IndexError:
        raise ValueError(value) from None


def _reached(birth: date, age: AgeSpan) -> int:
    try:
        return age_reached_ns(birth, age)
    except (ValueError, OverflowError):
        return _NEVER  # an age beyond the calendar (e.g. 9000 years): never reached


class Patients:
    """Reads Patients and BEN-marking Conditions/Observations; answers the other readers' age and sex questions."""

    def __init__(self, context: Context):
        self.context = context
        rules = context.rules
        self.known: dict[str, PatientInfo] = {}
        self._ben_codes = {(c.system, c.code) for c in rules.ben.codes}
        self._ben_listed = {p if p.startswith("Patient/") else f"Patient/{p}" for p in rules.ben.patients}
        self._ben_marked: set[str] = set()

    def add(self, r: dict, index: int) -> None:
        ctx = self.context
        birth = r.get("birthDate")
        born = None
        if birth is not None:
            try:
                born = _birth_date(birth)
            except ValueError:
                ctx.quarantine(index, r, Q_BAD_BIRTHDATE)
                return
        rid = r.get("id")
        if not isinstance(rid, str) or not rid:
            ctx.quarantine(index, r, Q_NO_PATIENT_ID)
            return
        self.known[ctx.intern(f"Patient/{rid}")] = PatientInfo(born, text(r.get("gender")))
        ctx.evaluated_other += 1

    def add_condition(self, r: dict, index: int) -> None:
        """A Condition is read only to mark benign ethnic neutropenia (§2); any other is not used."""
        if self._ben_codes and self.mark_ben(r):
            self.context.evaluated_other += 1
        else:
            self.context.skip(SKIP_NOT_USED)

    def mark_ben(self, r: dict) -> bool:
        """Benign ethnic neutropenia by code on an Observation or Condition of the patient (§2); whether it marked."""
        if not self._ben_codes:
            return False
        block = r.get("code")
        codings = block.get("coding") if isinstance(block, dict) else None
        if not isinstance(codings, list):
            return False
        if not any(
            isinstance(c, dict) and (text(c.get("system")), text(c.get("code"))) in self._ben_codes for c in codings
        ):
            return False
        patient = self.context.patient_of(r)
        if patient is None or patient is FOREIGN:
            return False
        self._ben_marked.add(patient)
        return True

    def resolve(self, patient: str) -> str | None:
        """A typeless subject ('?id', from urn:uuid) as the 'Patient/id' of the input, or None when there is none."""
        resolved = f"Patient/{patient[1:]}"
        return self.context.intern(resolved) if resolved in self.known else None

    def range_low(self, ranges: list[AgeSexRange], patient: str, time_ns: int, default: float) -> float:
        """The low of the first range that applies to the patient at that time (§1.3), else `default`.

        Ages are calendar ages, as in the age bands: "age 0-17 a" holds until the 18th birthday."""
        info = self.known.get(patient)
        for rr in ranges:
            if rr.sex is not None and (info is None or info.gender != rr.sex):
                continue
            if rr.age_from is not None or rr.age_until is not None:
                if info is None or info.birth_date is None:
                    continue  # no age, no age-specific range
                if rr.age_from is not None and time_ns < _reached(info.birth_date, rr.age_from):
                    continue
                if rr.age_until is not None and time_ns >= _reached(info.birth_date, rr.age_until):
                    continue
            return rr.low
        return default

    def finish(self) -> dict[str, PatientInfo]:
        marked = self._ben_marked | self._ben_listed
        return {ref: PatientInfo(info.birth_date, info.gender, ref in marked) for ref, info in self.known.items()}
