"""Observations (§1.1-§1.3): concept by LOINC, status, value in the canonical unit, reference range, versions."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from itertools import compress

import numpy as np
import pandas as pd

from leukofhir.age import age_span_of_quantity
from leukofhir.config import fold_unit
from leukofhir.normalise.context import (
    FOREIGN,
    NAT,
    Q_FOREIGN_SUBJECT,
    Q_SUBJECT,
    Q_SUBJECT_UNRESOLVED,
    Context,
    as_list,
    is_number,
    resource_ref,
    text,
    timestamps,
)
from leukofhir.normalise.patients import AgeSexRange, Patients
from leukofhir.normalise.reports import Reports

OBSERVATION_COLUMNS = [
    "row_id",
    "resource_id",
    "version",
    "patient_id",
    "concept",
    "code",
    "value",
    "comparator",
    "unit",
    "status",
    "time",
    "lln",
    "panel",
]

# Skip reasons (counted, never quarantined: clinical-rules §1.1 "ignored, not quarantined").
SKIP_OUT_OF_SCOPE = "code out of scope"
SKIP_DATA_ABSENT = "documented absence (dataAbsentReason)"
SKIP_PRELIMINARY = "status preliminary (not enabled)"
SKIP_SUPERSEDED = "superseded by a later version"

# Quarantine reasons found here (structural); value plausibility and units are the GX step's (validate.py).
Q_STATUS = "status missing or not a string"
Q_NO_TIME = "no clinically relevant time"
Q_BAD_TIME = "effective time is not a valid dateTime"
Q_NOT_NUMERIC = "value is not a Quantity with a numeric value"
Q_RANGE = "reference range about 1000x off the value (wrong unit)"

_NAN = math.nan
_MISS = object()
_CACHE_LIMIT = 4096
_NOT_READ = object()
# FHIR administrative-gender codes and their SNOMED CT equivalents in a range's `appliesTo`.
_SEX_CODES = {"male": "male", "female": "female", "248153007": "male", "248152002": "female"}


def sent_unit(quantity: dict, ucum: str) -> str | None:
    """The unit a Quantity was sent in: its UCUM code, else its unit text, else any code."""
    unit = quantity.get("code") if quantity.get("system") == ucum else None
    if not unit or not isinstance(unit, str):
        unit = quantity.get("unit")
        if not unit or not isinstance(unit, str):
            unit = quantity.get("code")
            if not isinstance(unit, str):
                unit = None
    return unit


def status_skip(status: str) -> str:
    return f"status {status} ignored"


def _bound(q, factors: dict, value_factor: float | None, units: _CountUnits | None) -> float | None:
    """A referenceRange low/high in the concept's canonical unit, or None.

    A bound without a unit is in the value's unit (v1.1 §1.2: labs often send the bare number); one with a unit the
    rules do not know is not used. A count's `unit` text is read as the value's is (v1.3 §1.2, `units`)."""
    if not isinstance(q, dict):
        return None
    value = q.get("value")
    if not is_number(value):
        return None
    code = q.get("code")
    coded = type(code) is str and code
    if coded:
        factor = factors.get(code)
        if factor is not None:
            return value * factor  # the usual case: a UCUM code the rules know
    unit = q.get("unit")
    if type(unit) is str and unit:
        factor = factors.get(unit)
        if factor is None and units is not None:
            known = units.read(unit)
            factor = known[1] if known is not None else None
    else:
        factor = None if coded else value_factor  # no unit at all: the value's
    return value * factor if factor is not None else None


class _CountUnits:
    """A count's unit read from anything but a UCUM code, matched ignoring case and spaces (v1.3 §1.2): the rules'
    spelling and factor, or None. Only a spelling the exact lookup missed comes here, and each distinct one is folded
    once: a laboratory sends the same few strings millions of times."""

    __slots__ = ("folded", "seen")

    def __init__(self, folded: dict[str, tuple[str, float]]):
        self.folded = folded
        self.seen: dict[str, tuple[str, float] | None] = {}

    def read(self, text: str) -> tuple[str, float] | None:
        known = self.seen.get(text, _MISS)
        if known is _MISS:
            known = self.folded.get(fold_unit(text))
            if len(self.seen) >= _CACHE_LIMIT:
                self.seen.clear()  # a feed of endless distinct garbage units must not grow this without bound
            self.seen[text] = known
        return known


def _sex_of(applies_to: list) -> str | None:
    """The sex a range's `appliesTo` names (code or text), or None when it names no sex we recognise."""
    sex = None
    for concept in applies_to:
        if not isinstance(concept, dict):
            continue
        for coding in as_list(concept.get("coding")):
            if isinstance(coding, dict) and text(coding.get("code")) in _SEX_CODES:
                sex = _SEX_CODES[coding["code"]]
        label = concept.get("text")
        if sex is None and isinstance(label, str) and label.lower() in ("male", "female"):
            sex = label.lower()
    return sex


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


class Observations:
    """Reads Observations in scope into compact rows; `finish()` resolves what needs the whole input and builds the
    frame."""

    def __init__(self, context: Context, reports: Reports, patients: Patients):
        self.context = context
        self.reports = reports
        self.patients = patients
        rules = context.rules
        obs = rules.observations
        # Looked up once per Observation: kept as plain attributes.
        self._loinc = obs.code_system
        self._code_to_concept = rules.code_to_concept
        self._units = rules.concept_units
        # v1.3 §1.2: count concepts read a unit text ignoring case and spaces; hemoglobin and percent stay exact.
        count_units = _CountUnits(rules.units.counts_folded)
        self._count_units = {name: count_units for name, c in obs.concepts.items() if c.kind == "count"}
        self._ucum = rules.units.ucum_system
        self._mismatch = rules.units.range_mismatch_factor
        self._mismatch_low = rules.units.range_mismatch_low_factor
        self._low_check = set(rules.units.range_mismatch_low_concepts)
        self._ignored = set(obs.statuses.ignored)
        self._preliminary_counts = obs.statuses.preliminary_counts
        self._strings = context.strings
        self._patient_of = context.patient_of
        self._effective_ns = context.effective_ns
        self._quarantine = context.quarantine
        self._skipped = context.skipped
        self.rows = _Rows()
        # Observations in scope quarantined here, as (row id, resource id, patient, concept, unit, reason): the contract
        # counts them with the rows the GX suite fails (a feed sending strings is as broken as one in a wrong unit).
        self.refused: list[tuple] = []
        self._ranges: dict[int, list[AgeSexRange]] = {}  # row position -> patient-specific ranges

    def add(self, r: dict, index: int) -> None:
        """One Observation. The hot path (one call per result): helpers inlined, strings interned, nothing formatted
        but the id."""
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
            self._out_of_scope(r)
            return
        status = r.get("status")
        if type(status) is not str:
            self._refuse(index, r, Q_STATUS, concept)  # issue 9.2: never evaluated as nothing without a word
            return
        if status in self._ignored:
            self._skipped[status_skip(status)] += 1
            return
        if status == "preliminary" and not self._preliminary_counts:
            self._skipped[SKIP_PRELIMINARY] += 1
            return
        quantity = r.get("valueQuantity")
        if quantity is None and r.get("dataAbsentReason") is not None:
            self._skipped[SKIP_DATA_ABSENT] += 1
            return
        patient = self._patient_of(r)
        if patient is None or patient is FOREIGN:
            self._refuse(index, r, Q_SUBJECT if patient is None else Q_FOREIGN_SUBJECT, concept, None)
            return
        if not isinstance(quantity, dict) or not is_number(quantity.get("value")):
            self._refuse(index, r, Q_NOT_NUMERIC, concept, patient)
            return
        time, present = self._effective_ns(r)
        if present and time is None:
            self._refuse(index, r, Q_BAD_TIME, concept, patient)
            return
        factors = self._units[concept]
        unit = sent_unit(quantity, self._ucum)
        # A UCUM code stays case-sensitive (v1.3 §1.2); only a unit sent otherwise is matched loosely below.
        ucum = unit is not None and unit == quantity.get("code") and quantity.get("system") == self._ucum
        factor = factors.get(unit)
        count_units = self._count_units.get(concept)
        if factor is None and unit is not None and not ucum and count_units is not None:
            # v1.3 §1.2: "THOU/uL" is the rules' "thou/uL"; the row keeps the rules' spelling, which the GX step knows.
            known = count_units.read(unit)
            if known is not None:
                unit, factor = known
        # An unknown unit keeps its text and no value: the GX step quarantines it by its unit (§1.2, never guessed).
        value = quantity["value"] * factor if factor is not None else _NAN
        lln = _NAN
        ranges = r.get("referenceRange")
        rows = self.rows
        if isinstance(ranges, list) and ranges:
            lln, problem = self._reference(
                ranges, factors, factor, value, len(rows.index), concept in self._low_check, count_units
            )
            if problem:
                self._refuse(index, r, problem, concept, patient)
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
        rows.status.append(intern(status, status))
        rows.time.append(NAT if time is None else time)
        rows.lln.append(lln)

    def _refuse(self, index: int, r: dict, reason: str, concept: str, patient=_NOT_READ) -> None:
        """Quarantine an Observation in scope, noting it for the data contract with its patient (read here when the
        caller has not)."""
        self._quarantine(index, r, reason)
        if patient is _NOT_READ:
            patient = self._patient_of(r)
        quantity = r.get("valueQuantity")
        unit = sent_unit(quantity, self._ucum) if isinstance(quantity, dict) else None
        self.refused.append(
            (str(index), resource_ref(r), patient if isinstance(patient, str) else None, concept, unit, reason)
        )

    def _out_of_scope(self, r: dict) -> None:
        """Not a concept of §1.1: a panel's members take its time and panel; a BEN code marks its patient (§2)."""
        members = r.get("hasMember")
        if isinstance(members, list) and members:
            self.reports.note_members(r, members)
        if self.patients.mark_ben(r):
            self.context.evaluated_other += 1
            return
        self._skipped[SKIP_OUT_OF_SCOPE] += 1

    def _reference(
        self,
        ranges: list,
        factors: dict,
        value_factor: float | None,
        value: float,
        position: int,
        low_check: bool,
        count_units: _CountUnits | None,
    ) -> tuple[float, str | None]:
        """The LLN of §1.3 when a range applies to everyone; ranges for some patients are kept to resolve later."""
        lln = _NAN
        specific: list[AgeSexRange] = []
        for rr in ranges:
            if not isinstance(rr, dict):
                continue
            low = _bound(rr.get("low"), factors, value_factor, count_units)
            high = _bound(rr.get("high"), factors, value_factor, count_units)
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
            if applies:
                sex = _sex_of(applies) if isinstance(applies, list) else None
                if sex is None:
                    continue  # applies to a population we cannot recognise: not applicable (§1.3)
            age_from = age_until = None
            if age:
                # A calendar age, like the bands; a limit we cannot read leaves the range not applicable.
                if not isinstance(age, dict):
                    continue
                if age.get("low") is not None:
                    age_from = age_span_of_quantity(age["low"])
                    if age_from is None:
                        continue
                if age.get("high") is not None:
                    age_until = age_span_of_quantity(age["high"], extra_units=1)  # "up to 17 a" ends at 18
                    if age_until is None:
                        continue
            specific.append(AgeSexRange(low, sex, age_from, age_until))
        if specific:
            self._ranges[position] = specific
        return lln, None

    def finish(self) -> pd.DataFrame:
        """Report times and panels, typeless subjects, patient-specific ranges and superseded versions resolved: the
        tidy frame (quarantined rows appended to the context, in row order)."""
        ctx = self.context
        rows = self.rows
        n = len(rows.index)
        keep = np.ones(n, dtype=bool)
        times = np.frombuffer(rows.time, dtype=np.int64).copy() if n else np.empty(0, dtype=np.int64)
        llns = np.frombuffer(rows.lln, dtype=np.float64).copy() if n else np.empty(0, dtype=np.float64)
        rids = rows.resource_id
        patients = rows.patient
        found: list[tuple[int, str | None, list[str]]] = []  # quarantined here, put in row order below
        panels, fallback = self.reports.link(rids, np.flatnonzero(times == NAT).tolist())
        for i, time in fallback.items():
            if time is not None:
                times[i] = time
            else:
                found.append((int(rows.index[i]), rids[i], [Q_NO_TIME]))
                self.refused.append(
                    (str(rows.index[i]), rids[i], patients[i], rows.concept[i], rows.unit[i], Q_NO_TIME)
                )
                keep[i] = False
        typeless = {p for p in set(patients) if p.startswith("?")}
        if typeless:
            resolve = self.patients.resolve
            for i, patient in enumerate(patients):
                if patient in typeless and keep[i]:
                    resolved = resolve(patient)
                    if resolved is not None:
                        patients[i] = resolved
                    else:
                        found.append((int(rows.index[i]), rids[i], [Q_SUBJECT_UNRESOLVED]))
                        self.refused.append(
                            (str(rows.index[i]), rids[i], None, rows.concept[i], rows.unit[i], Q_SUBJECT_UNRESOLVED)
                        )
                        keep[i] = False
        ctx.quarantined.extend(sorted(found, key=lambda q: q[0]))
        range_low = self.patients.range_low
        for i, ranges in self._ranges.items():
            if keep[i]:
                llns[i] = range_low(ranges, patients[i], int(times[i]), llns[i])
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
        columns["time"] = timestamps(columns["time"])
        return pd.DataFrame(columns, columns=OBSERVATION_COLUMNS)

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
                continue  # the same version twice: the GX step quarantines the repeats (and says if they differ)
            newer = _version_key(v_new) >= _version_key(v_old)
            loser = previous if newer else i
            if newer:
                latest[rid] = i
            keep[loser] = False
            dropped += 1
        if dropped:
            self.context.skipped[SKIP_SUPERSEDED] += dropped


def _version_key(version: str | None) -> tuple:
    if version is None:
        return (0, 0, "")
    return (1, int(version), "") if version.isdigit() else (1, -1, version)
