"""Small builders of FHIR R4 JSON for tests (Observations, Patients, reports, medication resources)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
T0 = datetime(2024, 3, 1, 8, 0, tzinfo=timezone.utc)

CODES = {
    "wbc": "6690-2",
    "anc": "751-8",
    "neutrophils_pct": "770-8",
    "bands_pct": "764-1",
    "lymphocytes_abs": "731-0",
    "hemoglobin": "718-7",
    "platelets": "777-3",
}
UNITS = {"hemoglobin": "g/dL", "neutrophils_pct": "%", "bands_pct": "%", "lymphocytes_pct": "%"}


def at(hours: float = 0, days: float = 0) -> str:
    """An instant relative to T0, as FHIR dateTime text."""
    return (T0 + timedelta(hours=hours, days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def days_ago(days: float = 0, hours: float = 0, now: datetime | None = None) -> str:
    """An instant before `now` (default: the wall clock), as FHIR dateTime text: for results an online run, which
    evaluates as of its own time, must find recent (an episode without a count for more than 90 days has lapsed,
    clinical-rules v1.3 §4). Pass one `now` to give several patients the same history."""
    now = now or datetime.now(timezone.utc)
    return (now - timedelta(days=days, hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


def observation(
    oid: str,
    concept: str,
    value,
    *,
    time: str | None = None,
    patient: str = "Patient/p1",
    unit: str | None = None,
    status: str = "final",
    low=None,
    comparator: str | None = None,
    code: str | None = None,
    **extra,
) -> dict:
    unit = unit or UNITS.get(concept, "10*9/L")
    res = {
        "resourceType": "Observation",
        "id": oid,
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": code or CODES[concept]}]},
        "subject": {"reference": patient},
        "effectiveDateTime": time or at(),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }
    if comparator:
        res["valueQuantity"]["comparator"] = comparator
    if low is not None:
        res["referenceRange"] = [{"low": {"value": low, "unit": unit, "system": UCUM, "code": unit}}]
    if time is False:
        del res["effectiveDateTime"]
    res.update(extra)
    return res


def patient(pid: str = "p1", birth: str | None = "1970-05-05", gender: str | None = "female") -> dict:
    res = {"resourceType": "Patient", "id": pid}
    if birth:
        res["birthDate"] = birth
    if gender:
        res["gender"] = gender
    return res


def report(rid: str, results: list[str], time: str | None = None, patient_ref: str = "Patient/p1") -> dict:
    res = {
        "resourceType": "DiagnosticReport",
        "id": rid,
        "status": "final",
        "code": {"text": "CBC"},
        "subject": {"reference": patient_ref},
        "result": [{"reference": f"Observation/{r}"} for r in results],
    }
    if time:
        res["effectiveDateTime"] = time
    return res


def statement(
    mid: str,
    drug_text: str | None,
    *,
    start: str | None = None,
    end: str | None = None,
    point: str | None = None,
    status: str = "active",
    patient_ref: str = "Patient/p1",
    kind: str = "MedicationStatement",
    coding: list | None = None,
) -> dict:
    concept = {**({"text": drug_text} if drug_text else {}), **({"coding": coding} if coding else {})}
    res = {
        "resourceType": kind,
        "id": mid,
        "status": status,
        "subject": {"reference": patient_ref},
        "medicationCodeableConcept": concept,
    }
    if kind == "MedicationRequest":
        res["intent"] = "order"
        res["authoredOn"] = point or start
    elif start or end:
        res["effectivePeriod"] = {k: v for k, v in (("start", start), ("end", end)) if v}
    elif point:
        res["effectiveDateTime"] = point
    return res


def normalise_all(resources: list[dict], rules=None, **options):
    """Run the Normaliser over resources (index = position) and return its Normalised result; `options` go to the
    Normaliser (e.g. base_url)."""
    from leukofhir.config import load_config
    from leukofhir.normalise import Normaliser

    normaliser = Normaliser(rules or load_config(), **options)
    for index, resource in enumerate(resources):
        normaliser.add(resource, index)
    return normaliser.finish()


def flags_for(resources: list[dict], rules=None, as_of=None, **options):
    """FlagSpecs for resources through normalise + evaluate (no GX: the rules alone)."""
    from leukofhir.config import load_config
    from leukofhir.evaluate.rules import evaluate

    rules = rules or load_config()
    done = normalise_all(resources, rules, **options)
    return evaluate(done.observations, done.patients, done.exposures, rules, as_of=as_of)
