"""One patient's history evaluated in memory by the pipeline's own stages (normalise → validate → rules), nothing
written: the state a CDS Hooks card reports is the one a run would write as Flags."""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone

import pandas as pd

from leukofhir.config import Rules
from leukofhir.evaluate.rules import FlagSpec
from leukofhir.evaluate.stages import build_flags, evaluate_rows, validate_rows
from leukofhir.evaluate.validate import ValidationResult, suite_parameters, validate_batch
from leukofhir.normalise import Normaliser
from leukofhir.normalise.patients import PatientInfo

COUNTS_SHOWN = ("wbc", "anc", "lymphocytes_abs", "platelets", "hemoglobin")
UNITS = {"hemoglobin": "g/dL"}  # every other concept shown is a count in 10^9/L (§1.2)


@dataclass(frozen=True)
class Count:
    """One validated value, converted (§1.2)."""

    concept: str
    value: float
    comparator: str | None
    time: datetime
    resource_id: str

    @property
    def shown(self) -> str:
        unit = UNITS.get(self.concept, "×10^9/L")
        return f"{self.comparator or ''}{self.value:g} {unit}"


@dataclass
class PatientState:
    """What the rules say of one patient now: the Flags a run would hold (open episodes are the active ones), the
    latest value of each concept shown, and the Patient's facts the rules use."""

    patient_id: str  # "Patient/<id>"
    flags: list[FlagSpec]
    latest: dict[str, Count]
    info: PatientInfo | None

    @property
    def open_episodes(self) -> list[FlagSpec]:
        return [f for f in self.flags if f.status == "active"]


class PassedBatches:
    """validate.validate_batch, remembering the batches in which every row passed (by a digest of their rows), so
    the same history is not validated again each time its chart is opened: GX costs about 0.25 s per suite and
    batch whatever its size (benchmarks/cds_bench.py). Sound because a verdict of "every row passes" cannot change
    while the rules stay the same: the one parameter that moves, the latest plausible time (the clock), only grows.
    A batch with a failing row is validated every time."""

    def __init__(self, size: int = 1024, validate=validate_batch):
        self.size, self.validate = size, validate
        self._passed: OrderedDict[tuple[str, bytes], list[dict]] = OrderedDict()
        self._lock = threading.Lock()
        # The rows' hashes are keyed with a secret of this process: a client cannot craft a failing row whose hash
        # is that of a passing row it sent before (with pandas' public default key, 2^32 tries would find one).
        self._hash_key = secrets.token_hex(8)

    def __call__(self, suite: str, rows: pd.DataFrame, parameters: dict) -> ValidationResult:
        key = (suite, _digest(rows, self._hash_key))
        with self._lock:
            expectations = self._passed.get(key)
            if expectations is not None:
                self._passed.move_to_end(key)
                return ValidationResult(valid=rows, reasons={}, expectations=expectations)
        result = self.validate(suite, rows, parameters)
        if not result.reasons:
            with self._lock:
                self._passed[key] = result.expectations
                while len(self._passed) > self.size:
                    self._passed.popitem(last=False)
        return result


def _digest(rows: pd.DataFrame, hash_key: str) -> bytes:
    """The rows' columns, their types and one keyed hash per row, in order, as one digest."""
    values = pd.util.hash_pandas_object(rows, index=False, hash_key=hash_key).to_numpy().tobytes()
    header = "|".join(f"{column}:{dtype}" for column, dtype in rows.dtypes.items())
    return hashlib.sha256(header.encode() + values).digest()


def evaluate_patient(
    resources,
    patient_id: str,
    rules: Rules,
    *,
    base_url: str | None,
    now: datetime | None = None,
    validate=validate_batch,
) -> PatientState:
    """The patient's state from their resources (their whole history, as a run reads it), as of `now` (default: the
    clock) or their latest result when later, as a run evaluates as of its start (stages.evaluate_rows): an episode
    without a count for too long lapses. A result dated in the future is quarantined against the clock, as a run
    does. `validate`: validate.validate_batch, or a PassedBatches memo of it."""
    now = now or datetime.now(timezone.utc)
    normaliser = Normaliser(rules, base_url=base_url)
    for index, resource in enumerate(resources):
        if isinstance(resource, dict):
            normaliser.add(resource, index)
    normalised = normaliser.finish()
    parameters = suite_parameters(rules)
    validated = validate_rows(normalised, parameters, validate=validate)
    evaluation = evaluate_rows(validated.observations, validated.exposures, normalised.patients, rules, run_time=now)
    checked = build_flags(evaluation.specs, rules, parameters, validate)
    specs = [evaluation.specs[i] for i in checked.kept] if checked.kept or not evaluation.specs else []
    mine = [s for s in specs if s.patient_id == patient_id]
    return PatientState(
        patient_id, mine, _latest(validated.observations, patient_id, rules), normalised.patients.get(patient_id)
    )


def _latest(rows: pd.DataFrame, patient_id: str, rules: Rules) -> dict[str, Count]:
    if rows.empty:
        return {}
    retracted = rules.observations.statuses.retracted
    mine = rows[
        (rows["patient_id"] == patient_id)
        & (rows["status"] != retracted)
        & rows["time"].notna()
        & rows["concept"].isin(COUNTS_SHOWN)
    ]
    latest: dict[str, Count] = {}
    for row in mine.sort_values("time", kind="stable").groupby("concept", sort=False).tail(1).itertuples(index=False):
        comparator = row.comparator if isinstance(row.comparator, str) and row.comparator else None
        latest[row.concept] = Count(
            row.concept, float(row.value), comparator, row.time.to_pydatetime(), str(row.resource_id)
        )
    return latest
