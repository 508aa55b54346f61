"""Critical results told to the care team: one CommunicationRequest per grade-4 Flag episode, created once while the
Flag is active and revoked when the Flag is withdrawn (rules.yaml `alerts`; docs/cds-hooks.md)."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timezone
from typing import Iterable

from fhir.resources.R4B.communicationrequest import CommunicationRequest

from leukofhir.config import Rules
from leukofhir.extract.search import PAGE_SIZE, patient_batches, project_flag_tag
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import FatalFhirError, outcome_summary
from leukofhir.fhir.ids import is_valid_id
from leukofhir.fhir.references import DETAIL_URL, reference_target
from leukofhir.normalise import Normaliser
from leukofhir.write.flags import NEW

__all__ = ["request_id", "is_critical", "critical_subjects", "sync_alerts", "ALERT_ACTIONS"]

log = logging.getLogger(__name__)

ID_PREFIX = "leukofhir-cr-"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/communication-category"
CLOSED = {"revoked", "entered-in-error", "completed"}  # a request the care team or a run has closed: left alone
RECIPIENT_TYPES = {"Practitioner", "PractitionerRole", "Organization"}
ALERT_ACTIONS = ("alert_create", "alert_revoke", "alert_refused")
# The concept whose lowest value a critical Flag's request names, by the Flag's SNOMED code's condition.
_LOWEST_CONCEPT = {
    "leukopenia": "wbc",
    "neutropenia": "anc",
    "agranulocytosis": "anc",
    "lymphopenia": "lymphocytes_abs",
    "pancytopenia": "wbc",
}


def request_id(identifier: str) -> str:
    """The id of a Flag episode's request, derived from the Flag's identifier (40 hex digits): every run and every
    writer writes the same resource, as Flags are written (flags.flag_id)."""
    return ID_PREFIX + identifier


def _identifier(flag: dict, rules: Rules) -> str | None:
    for identifier in flag.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") == rules.uris.identifier_system:
            value = identifier.get("value")
            return value if isinstance(value, str) and is_valid_id(request_id(value)) else None
    return None


def _grade(flag: dict, rules: Rules) -> int | None:
    for extension in flag.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == rules.uris.ctcae_grade_extension:
            return extension.get("valueInteger")
    return None


def _code(flag: dict) -> str | None:
    codings = (flag.get("code") or {}).get("coding") or []
    return codings[0].get("code") if codings and isinstance(codings[0], dict) else None


def is_critical(flag: dict, rules: Rules) -> bool:
    """A grade-4 Flag, or agranulocytosis (grade 4 by definition, §2)."""
    return _grade(flag, rules) == 4 or _code(flag) == rules.agranulocytosis.snomed


def critical_subjects(flags: Iterable[dict], rules: Rules) -> set[str]:
    """The patients ("Patient/<id>") of the critical Flags among `flags`."""
    return {
        ref
        for flag in flags
        if is_critical(flag, rules) and isinstance(ref := (flag.get("subject") or {}).get("reference"), str)
    }


def _lowest_observation(client: FhirClient, flag: dict, rules: Rules) -> str | None:
    """The evidence Observation with the lowest value of the Flag's concept, its units converted as the rules
    convert them (§1.2); the first piece of evidence when none can be compared."""
    evidence = [
        e["valueReference"]["reference"]
        for e in flag.get("extension") or []
        if isinstance(e, dict)
        and e.get("url") == DETAIL_URL
        and isinstance((e.get("valueReference") or {}).get("reference"), str)
        and e["valueReference"]["reference"].startswith("Observation/")
    ]
    if not evidence:
        return None
    ids = [ref.split("/", 1)[1] for ref in evidence if is_valid_id(ref.split("/", 1)[1])]
    condition = {
        c.snomed: name
        for name, c in (
            ("leukopenia", rules.leukopenia),
            ("neutropenia", rules.neutropenia),
            ("agranulocytosis", rules.agranulocytosis),
            ("lymphopenia", rules.lymphopenia),
            ("pancytopenia", rules.pancytopenia),
        )
    }.get(_code(flag))
    normaliser = Normaliser(rules, base_url=client.base_url)
    for index, resource in enumerate(client.search("Observation", {"_id": ",".join(ids), "_count": PAGE_SIZE})):
        normaliser.add(resource, index)
    rows = normaliser.finish().observations
    rows = rows[rows["concept"] == _LOWEST_CONCEPT.get(condition)] if len(rows) else rows
    if not len(rows):
        return evidence[0]
    return str(rows.sort_values(["value", "time"]).iloc[0]["resource_id"])


def _recipients(client: FhirClient, subject: str) -> list[dict]:
    """The patient's generalPractitioner references that name a resource of this server."""
    kind, pid = reference_target(subject)
    if kind != "Patient" or not is_valid_id(pid):
        return []
    try:
        patient = client.request_json("GET", f"Patient/{pid}")
    except FatalFhirError:
        return []
    out = []
    for reference in patient.get("generalPractitioner") or []:
        target = reference.get("reference") if isinstance(reference, dict) else None
        kind, rid = reference_target(target)
        if kind in RECIPIENT_TYPES and is_valid_id(rid) and "://" not in str(target):
            out.append({"reference": f"{kind}/{rid}"})
    return out


def build_request(flag: dict, rules: Rules, lowest: str | None, recipients: list[dict], now: datetime) -> dict:
    """The CommunicationRequest of a critical Flag (validated as R4); its text is the Flag's, nothing more."""
    identifier = _identifier(flag, rules)
    about = [{"reference": f"Flag/{flag['id']}"}] + ([{"reference": lowest}] if lowest else [])
    request = {
        "resourceType": "CommunicationRequest",
        "id": request_id(identifier),
        "meta": {"tag": [{"system": rules.uris.tag_system, "code": rules.uris.tag_code}]},
        "identifier": [{"system": rules.uris.identifier_system, "value": identifier}],
        "status": "active",
        "category": [{"coding": [{"system": CATEGORY_SYSTEM, "code": "alert", "display": "Alert"}]}],
        "priority": "stat",
        "subject": flag["subject"],
        "about": about,
        "payload": [{"contentString": (flag.get("code") or {}).get("text") or "Critical low blood count"}],
        "authoredOn": now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "requester": {"reference": rules.uris.author},
        **({"recipient": recipients} if recipients else {}),
    }
    CommunicationRequest.model_validate(request)
    return request


def _put(client: FhirClient, resource: dict, version: str) -> bool:
    """PUT with If-Match (NEW for a create: refused when anything is or was at the id); False when refused for a
    version that moved (another run wrote it first: the next run decides again)."""
    entry = {
        "resource": resource,
        "request": {"method": "PUT", "url": f"CommunicationRequest/{resource['id']}", "ifMatch": f'W/"{version}"'},
    }
    try:
        client.transaction([entry])
    except FatalFhirError as exc:
        if exc.status in (409, 412):
            log.info(
                "CommunicationRequest/%s not written, its version moved: %s",
                resource["id"],
                outcome_summary(exc.outcome) or exc.status,
            )
            return False
        raise
    return True


def _version(resource: dict) -> str | None:
    version = (resource.get("meta") or {}).get("versionId")
    return str(version) if version else None


def sync_alerts(client: FhirClient, rules: Rules, subjects: Iterable[str], now: datetime | None = None) -> Counter:
    """For the patients named ("Patient/<id>"), from their project Flags on the server as they are now: a request
    created for each critical active Flag that has none, a request revoked for each withdrawn critical Flag. Returns
    the counts (`alert_create`, `alert_revoke`, and `alert_refused`: batches whose requests the server refused);
    nothing when the site turned it off."""
    counts: Counter = Counter()
    if not rules.alerts.communication_requests:
        return counts
    now = now or datetime.now(timezone.utc)
    ids = sorted({pid for s in subjects if (pid := reference_target(s)[1]) and is_valid_id(pid)})
    for batch in patient_batches(ids, 100):
        try:
            _sync_batch(client, rules, batch, now, counts)
        except FatalFhirError as exc:
            # The Flags are written; a server that refuses the requests (no CommunicationRequest support, a token
            # without its scope) must not fail the run for them. The next run tries again: a missing one is created.
            counts["alert_refused"] += 1
            log.warning(
                "critical-result CommunicationRequests of %d patient(s) not written: HTTP %s: %s",
                len(batch),
                exc.status,
                outcome_summary(exc.outcome) or type(exc).__name__,
            )
    return counts


def _sync_batch(client: FhirClient, rules: Rules, batch: list[str], now: datetime, counts: Counter) -> None:
    """One batch of patients (sync_alerts), their counts added to `counts`."""
    refs = ",".join(f"Patient/{p}" for p in batch)
    flags = [
        f
        for f in client.search("Flag", {"subject": refs, "_tag": project_flag_tag(rules), "_count": PAGE_SIZE})
        if is_critical(f, rules) and _identifier(f, rules)
    ]
    wanted = {request_id(_identifier(f, rules)): f for f in flags if f.get("status") == "active"}
    withdrawn = {request_id(_identifier(f, rules)): f for f in flags if f.get("status") == "entered-in-error"}
    if not wanted and not withdrawn:
        return
    existing = {
        r.get("id"): r
        for r in client.search(
            "CommunicationRequest", {"_id": ",".join(sorted({*wanted, *withdrawn})), "_count": PAGE_SIZE}
        )
    }
    for rid, flag in sorted(wanted.items()):
        if rid in existing:
            continue
        request = build_request(
            flag,
            rules,
            _lowest_observation(client, flag, rules),
            _recipients(client, flag["subject"]["reference"]),
            now,
        )
        if _put(client, request, NEW):
            counts["alert_create"] += 1
    for rid in sorted(withdrawn):
        current = existing.get(rid)
        if current is None or current.get("status") in CLOSED or _version(current) is None:
            continue
        revoked = {k: v for k, v in current.items() if k != "meta"}
        revoked["meta"] = {"tag": (current.get("meta") or {}).get("tag") or []}
        revoked["status"] = "revoked"
        if _put(client, revoked, _version(current)):
            counts["alert_revoke"] += 1
