"""The daily lapse sweep: the patients whose active project Flags may have lapsed (v1.3 §4), found from the Flags."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterable, Mapping

from leukofhir.config import Rules
from leukofhir.errors import UsageError
from leukofhir.extract.search import (
    PAGE_SIZE,
    fhir_instant,
    local_patient_id,
    patient_batches,
    project_flag_tag,
    subject_of,
)
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.ids import is_valid_id
from leukofhir.fhir.references import DETAIL_URL, reference_target
from leukofhir.normalise.context import parse_time_ns

__all__ = ["Sweep", "lapse_candidates", "candidates", "evidence_ids", "evidence_time", "sweep_due", "sweep_hour"]

log = logging.getLogger(__name__)

# Evidence Observations looked up per search (`_id=a,b,…`; a long query goes as POST _search).
ID_BATCH = 200
_RETRACTED = "entered-in-error"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class Sweep:
    """What the sweep found: the candidate patients (ids, sorted) and how many active project Flags it read."""

    patients: list[str] = field(default_factory=list)
    flags_read: int = 0


def evidence_ids(flag: dict) -> list[str]:
    """The ids of the Observations a Flag names as evidence (its flag-detail extensions), each once, in order."""
    ids: list[str] = []
    for ext in flag.get("extension") or []:
        if not isinstance(ext, dict) or ext.get("url") != DETAIL_URL:
            continue
        kind, rid = reference_target((ext.get("valueReference") or {}).get("reference"))
        if kind == "Observation" and is_valid_id(rid) and rid not in ids:
            ids.append(rid)
    return ids


def evidence_time(observation: dict) -> int | None:
    """An evidence Observation's time as the rules read it (§1.1 effective[x]; ns UTC), or None when it is no value
    (entered-in-error) or carries no time of its own (its report's or panel's time: not looked up, see candidates)."""
    if observation.get("status") == _RETRACTED:
        return None
    period = observation.get("effectivePeriod")
    value = (
        observation.get("effectiveDateTime")
        or observation.get("effectiveInstant")
        or (period.get("start") if isinstance(period, dict) else None)
    )
    return parse_time_ns(value)


def candidates(
    flags: Iterable[dict], times: Mapping[str, int | None], as_of: datetime, lapse: timedelta, base_url: str
) -> set[str]:
    """The patients (ids) of the active `flags` whose newest evidence time (`times`: Observation id → evidence_time,
    absent when the Observation is gone) is more than `lapse` before `as_of`, or who have no evidence time at all.

    A superset of the Flags that lapse: the evidence of an open episode is its low values, all of the family's
    values since it opened, so the family's last value is never older than the newest evidence. Evidence without a
    time of its own, deleted or entered-in-error leaves the Flag nothing recent to rest on: a candidate, decided by
    the rules (which withdraw or close it, or keep it on the time its report gives)."""
    horizon = (as_of - lapse - _EPOCH) // timedelta(microseconds=1) * 1000  # ns, exactly (no float rounding)
    out: set[str] = set()
    for flag in flags:
        if flag.get("status") != "active":
            continue
        patient = local_patient_id(subject_of(flag), base_url)
        if patient is None or patient in out:
            continue
        known = [t for rid in evidence_ids(flag) if (t := times.get(rid)) is not None]
        if not known or max(known) < horizon:
            out.add(patient)
    return out


def lapse_candidates(client: FhirClient, rules: Rules, as_of: datetime) -> Sweep:
    """The patients whose active project Flags may have lapsed as of `as_of` (candidates), read page by page: each
    page of Flags, then its evidence Observations' times in batches of ids (never one request per Flag).

    R4 gives Flag no `status` search parameter (HAPI 8.8 answers HAPI-0524): an active Flag's period has no end, and
    `date=ge<as_of>` selects the Flags whose period reaches the as-of, so the server sends the open ones (active, and
    withdrawn ones left open), not every Flag the project ever closed; the status is then read here."""
    params = {
        "_tag": project_flag_tag(rules),
        "date": f"ge{fhir_instant(as_of)}",
        "_elements": "status,subject,extension",
        "_count": PAGE_SIZE,
    }
    found: set[str] = set()
    read = 0
    for bundle in client.search_pages("Flag", params):
        flags = [
            e["resource"]
            for e in bundle.get("entry") or []
            if isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == "Flag"
            and e["resource"].get("status") == "active"
        ]
        read += len(flags)
        # Patients already found need no look-up; an Observation named by several Flags is looked up once.
        pending = [f for f in flags if local_patient_id(subject_of(f), client.base_url) not in found]
        ids = sorted({rid for f in pending for rid in evidence_ids(f)})
        found |= candidates(pending, _evidence_times(client, ids), as_of, rules.windows.episode_gap, client.base_url)
    log.info("lapse sweep: %d active project Flags read, %d patients to evaluate again", read, len(found))
    return Sweep(sorted(found), read)


def _evidence_times(client: FhirClient, ids: list[str]) -> dict[str, int | None]:
    times: dict[str, int | None] = {}
    for batch in patient_batches(ids, ID_BATCH):  # batches of ids, as of patients
        asked = set(batch)
        params = {"_id": ",".join(batch), "_elements": "status,effective", "_count": len(batch)}
        for resource in client.search("Observation", params):
            if resource.get("resourceType") == "Observation" and resource.get("id") in asked:
                times[resource["id"]] = evidence_time(resource)
    return times


def sweep_hour(text: str | None) -> int:
    """The hour of the day (UTC, 0-23) of the sweep, from its setting (LEUKOFHIR_LAPSE_SWEEP_HOUR); 0 when unset."""
    if text is None or not text.strip():
        return 0
    try:
        hour = int(text.strip())
    except ValueError:
        hour = -1
    if not 0 <= hour <= 23:
        raise UsageError(f"the lapse sweep hour {text!r} must be a whole hour of the day, 0 to 23 (UTC)")
    return hour


def sweep_due(since: datetime, until: datetime, hour: int) -> bool:
    """Whether [since, until) holds an instant at `hour`:00 UTC: the one scheduled run a day that sweeps (each instant
    lies in exactly one of a schedule's contiguous intervals)."""
    since, until = since.astimezone(timezone.utc), until.astimezone(timezone.utc)
    first = since.replace(hour=hour, minute=0, second=0, microsecond=0)
    if first < since:
        first += timedelta(days=1)
    return first < until
