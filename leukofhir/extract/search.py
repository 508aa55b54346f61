"""Extract: a window → the patients it touches → each batch of patients' whole history, staged as NDJSON."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from leukofhir.config import Rules
from leukofhir.errors import UsageError
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import FatalFhirError
from leukofhir.fhir.ids import is_valid_id, shown
from leukofhir.fhir.references import reference_target

__all__ = [
    "Window",
    "WINDOW_FIELDS",
    "parse_instant",
    "fhir_instant",
    "touched_patients",
    "patient_batches",
    "stage_batch",
    "iter_history",
    "history_searches",
    "medication_types",
    "window_searches",
    "observation_codes",
    "project_flag_tag",
    "Subjects",
    "subject_of",
    "local_patient_id",
    "deleted_subjects",
    "changed_patients",
    "read_time",
]

log = logging.getLogger(__name__)

WINDOW_FIELDS = ("lastUpdated", "effective")
# The search parameter holding each resource's clinical date (FHIR R4 search parameter registry).
CLINICAL_DATE = {
    "Observation": "date",
    "MedicationStatement": "effective",
    "MedicationRequest": "authoredon",
    "MedicationAdministration": "effective-time",
}
PAGE_SIZE = 500


def parse_instant(text: str | datetime, what: str = "time") -> datetime:
    """An ISO 8601 date or date-time as an aware UTC datetime (a date, or a time without zone, is read as UTC)."""
    if isinstance(text, datetime):
        moment = text
    else:
        try:
            moment = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(f"{what} {text!r} is not an ISO 8601 date or date-time") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def fhir_instant(moment: datetime) -> str:
    """UTC, to the millisecond: HAPI stores `lastUpdated` in milliseconds, and windows may be shorter than a second."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Window:
    """Which patients a run re-evaluates: those whose data changed (`lastUpdated`) or is dated (`effective`) in
    [since, until). The window never limits what is read of those patients (clinical-rules §4 "Convergence")."""

    since: datetime
    until: datetime
    field: str = "lastUpdated"

    @classmethod
    def parse(cls, since, until, field: str = "lastUpdated") -> Window:
        if field not in WINDOW_FIELDS:
            raise UsageError(f"window field {field!r} must be one of {', '.join(WINDOW_FIELDS)}")
        window = cls(parse_instant(since, "since"), parse_instant(until, "until"), field)
        if window.until <= window.since:
            raise UsageError(
                f"the window is empty: until ({fhir_instant(window.until)}) must be after since "
                f"({fhir_instant(window.since)})"
            )
        return window

    def as_dict(self) -> dict:
        return {"since": fhir_instant(self.since), "until": fhir_instant(self.until), "field": self.field}


def medication_types(rules: Rules) -> list[str]:
    """The medication resources the rules read (clinical-rules §1.4: statements always, the others by site)."""
    types = ["MedicationStatement"]
    if rules.medications.include_requests:
        types.append("MedicationRequest")
    if rules.medications.include_administrations:
        types.append("MedicationAdministration")
    return types


def observation_codes(rules: Rules) -> str:
    """`code` search value: every LOINC code of §1.1, plus the site's benign-ethnic-neutropenia codes."""
    system = rules.observations.code_system
    tokens = [f"{system}|{code}" for code in rules.code_to_concept]
    tokens += [f"{c.system}|{c.code}" for c in rules.ben.codes]
    return ",".join(tokens)


def subject_of(resource: dict):
    """A resource's `subject.reference` (None when there is none)."""
    subject = resource.get("subject")
    return subject.get("reference") if isinstance(subject, dict) else None


def local_patient_id(reference, base_url: str) -> str | None:
    """The id of the Patient of this server (base URL `base_url`) a reference names, or None: another server's URL, a
    urn, another type or an id no URL may carry."""
    kind, rid = reference_target(reference)
    absolute = isinstance(reference, str) and "://" in reference
    # The base with its trailing slash: `http://h/fhir` must not claim `http://h/fhir-other/Patient/p`.
    if kind == "Patient" and is_valid_id(rid) and (not absolute or reference.startswith(base_url.rstrip("/") + "/")):
        return rid
    return None


def ben_codes(rules: Rules) -> str:
    """`code` search value of the Conditions that mark benign ethnic neutropenia (§2)."""
    return ",".join(f"{c.system}|{c.code}" for c in rules.ben.codes)


def project_flag_tag(rules: Rules) -> str:
    """The `_tag` search value of the project's own Flags: its tag under the canonical base or any previous one."""
    return ",".join(rules.uris.tags)


def previous_base_subjects(client: FhirClient, rules: Rules, subjects: Subjects) -> None:
    """Add the patients of the project's Flags still tagged under a previous canonical base: each run then rewrites
    them under the current one (issue 21), and once none is left this one search finds nothing."""
    if rules.uris.previous_bases:
        params = {"_tag": ",".join(rules.uris.tags[1:]), "_elements": "subject", "_count": PAGE_SIZE}
        for resource in client.search("Flag", params):
            if resource.get("resourceType") == "Flag":
                subjects.add(resource)


class Subjects:
    """Collects patient ids from subject references, counting the ones that cannot be used."""

    def __init__(self, base_url: str):
        self.ids: set[str] = set()
        self.unusable = 0
        self._base = base_url

    def add(self, resource: dict) -> None:
        self.add_reference(subject_of(resource))

    def add_reference(self, reference) -> None:
        rid = local_patient_id(reference, self._base)
        if rid is not None:
            self.ids.add(rid)
        elif reference_target(reference)[0] in ("Patient", None):
            # Not a Patient of this server (another server's URL, a urn, an id no URL may carry): the resource is
            # judged, and quarantined with its reason, if another of the patient's resources brings it in.
            self.unusable += 1

    def warn_unusable(self) -> None:
        if self.unusable:
            log.warning("%d touched resources have a subject that is not a Patient of this server", self.unusable)


def _window_params(window: Window, resource_type: str) -> dict | None:
    since, until = fhir_instant(window.since), fhir_instant(window.until)
    if window.field == "lastUpdated":
        return {"_lastUpdated": [f"ge{since}", f"lt{until}"]}
    param = CLINICAL_DATE.get(resource_type)
    return {param: [f"ge{since}", f"lt{until}"]} if param else None


def window_searches(window: Window, rules: Rules) -> list[tuple[str, dict]]:
    """The searches whose subjects are the touched patients (Patients and deletions aside)."""
    dated = [("Observation", {"code": observation_codes(rules)})] + [(t, {}) for t in medication_types(rules)]
    if window.field == "lastUpdated":
        dated.append(("DiagnosticReport", {}))
    searches = [(t, {**extra, **_window_params(window, t)}) for t, extra in dated]
    if window.field == "effective":
        # A Flag's `date` is its period: ge/lt select the project's Flags whose period overlaps the window.
        searches.append(
            ("Flag", {"_tag": project_flag_tag(rules), "date": _window_params(window, "Observation")["date"]})
        )
    return searches


def touched_patients(client: FhirClient, window: Window, rules: Rules) -> list[str]:
    """The ids of the patients a window touches, sorted.

    lastUpdated: subjects of the in-scope Observations, their DiagnosticReports and the medication resources changed
    in the window; Patients changed in it (a new birth date changes the thresholds); subjects of results and
    medication resources deleted since the window began (`_history?_since=` lists DELETEs, and the version before
    the delete names the patient); patients of the project's Flags still under a previous canonical base.
    effective: subjects of the in-scope Observations and medication resources dated in the window, and of the
    project's own Flags whose period overlaps it (their evidence may have been deleted since)."""
    subjects = Subjects(client.base_url)
    for resource_type, params in window_searches(window, rules):
        params.update({"_elements": "subject", "_count": PAGE_SIZE})
        for resource in client.search(resource_type, params):
            if resource.get("resourceType") == resource_type:
                subjects.add(resource)
    if window.field == "lastUpdated":
        params = {**_window_params(window, "Patient"), "_elements": "id", "_count": PAGE_SIZE}
        for resource in client.search("Patient", params):
            if is_valid_id(resource.get("id")):
                subjects.ids.add(resource["id"])
        for resource_type in ["Observation", *medication_types(rules)]:
            for reference in deleted_subjects(client, resource_type, window.since):
                subjects.add_reference(reference)
        previous_base_subjects(client, rules, subjects)
    subjects.warn_unusable()
    return sorted(subjects.ids)


def deleted_subjects(client: FhirClient, resource_type: str, since: datetime) -> Iterator[str]:
    """Subject references of the resources of a type deleted since `since`.

    HAPI lists a DELETE in the type's history without a resource (`request.url` = `Type/id/_history/n`); the version
    before it still answers a read (/work/shared/fhir-server.md, seen on HAPI 8.8)."""
    params = {"_since": fhir_instant(since), "_count": PAGE_SIZE}
    for bundle in client.search_pages(f"{resource_type}/_history", params):
        for entry in bundle.get("entry") or []:
            request = entry.get("request") or {}
            if request.get("method") != "DELETE":
                continue
            parts = str(request.get("url") or "").split("/")
            if len(parts) != 4 or parts[2] != "_history" or not parts[3].isdigit() or not is_valid_id(parts[1]):
                continue
            version = int(parts[3]) - 1
            if version < 1:
                continue
            try:
                before = client.request_json("GET", f"{resource_type}/{parts[1]}/_history/{version}")
            except FatalFhirError as exc:
                if exc.status in (404, 410):  # that version was itself a delete, or has been expunged
                    continue
                raise
            subject = before.get("subject") if isinstance(before, dict) else None
            if isinstance(subject, dict):
                yield subject.get("reference")


def patient_batches(patients: list[str], size: int) -> Iterator[list[str]]:
    """Patients in groups of `size`: one set of searches per group, never one request per patient."""
    if size < 1:
        raise UsageError("the batch size must be at least 1")
    for start in range(0, len(patients), size):
        yield patients[start : start + size]


def history_searches(rules: Rules, patients: list[str]) -> Iterator[tuple[str, dict]]:
    """The searches that bring a batch of patients' whole history of what the rules read (clinical-rules §1)."""
    refs = ",".join(f"Patient/{p}" for p in patients)
    # Each result with the reports that list it (their time and blood-count grouping, §1.1 and §2) and the panel
    # Observations that hold it as a member (the HL7 panel style).
    yield (
        "Observation",
        {
            "subject": refs,
            "code": observation_codes(rules),
            "_revinclude": ["DiagnosticReport:result", "Observation:has-member"],
        },
    )
    for resource_type in medication_types(rules):
        # The drug may sit in a referenced Medication (§1.4): brought along, once per page.
        yield resource_type, {"subject": refs, "_include": f"{resource_type}:medication"}
    if rules.ben.codes:
        yield "Condition", {"subject": refs, "code": ben_codes(rules)}
    yield "Patient", {"_id": ",".join(patients)}
    yield "Flag", {"subject": refs, "_tag": project_flag_tag(rules)}


def iter_history(client: FhirClient, patients: list[str], rules: Rules, read_at: list | None = None) -> Iterator[dict]:
    """The patients' whole history of what the rules read (history_searches), page by page, each resource once (an
    included report listed on two pages is yielded once). `read_at`, when given, gets the server's time of the first
    search: what changed after it was not read. Ids that are not FHIR ids are a UsageError, never sent."""
    bad = [p for p in patients if not is_valid_id(p)]
    if bad:
        raise UsageError(f"not FHIR ids, never sent to the server: {', '.join(shown(b) for b in bad[:5])}")
    return _history(client, patients, rules, read_at)


def _history(client: FhirClient, patients: list[str], rules: Rules, read_at: list | None) -> Iterator[dict]:
    seen: set[tuple[str, str, str]] = set()
    for resource_type, params in history_searches(rules, patients):
        params = {**params, "_count": PAGE_SIZE}
        for bundle in client.search_pages(resource_type, params):
            if read_at is not None and not read_at and (bundle.get("meta") or {}).get("lastUpdated"):
                read_at.append(bundle["meta"]["lastUpdated"])
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource")
                if not isinstance(resource, dict) or (entry.get("search") or {}).get("mode") == "outcome":
                    continue
                key = (resource.get("resourceType"), resource.get("id"), (resource.get("meta") or {}).get("versionId"))
                if key in seen:
                    continue
                seen.add(key)
                yield resource


def stage_batch(client: FhirClient, patients: list[str], rules: Rules, path: Path) -> dict[str, int]:
    """Write the batch's resources (iter_history) to one NDJSON file, page by page (never the whole batch in memory);
    return how many resources of each type were staged. The server's time of the first search goes beside it
    (read_time): what changed after it was not read."""
    counts: dict[str, int] = {}
    read_at: list[str] = []
    history = iter_history(client, patients, rules, read_at)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as out:
        for resource in history:
            kind = resource.get("resourceType")
            out.write(json.dumps(resource, ensure_ascii=True, separators=(",", ":")))
            out.write("\n")
            counts[kind] = counts.get(kind, 0) + 1
    _read_time_path(path).write_text(str(read_at[0] if read_at else ""), encoding="utf-8")
    tmp.replace(path)  # a staged file exists only once it is complete
    return counts


def _read_time_path(staged: Path) -> Path:
    return staged.with_name(staged.name + ".read-at")


def read_time(staged: Path) -> datetime | None:
    """The server's time when `staged` (a stage_batch file) was read, or None when it is not known."""
    try:
        text = _read_time_path(staged).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    try:
        return parse_instant(text) if text else None
    except UsageError:
        return None


def changed_patients(client: FhirClient, rules: Rules, patients: list[str], since: datetime) -> set[str]:
    """Those of `patients` whose data the rules read has changed on the server at or after `since` (the server's
    clock): a resource of theirs created or updated since (any Observation, the DiagnosticReports, the medication
    resources, the benign-ethnic-neutropenia Conditions, the Patient; `_lastUpdated`), or deleted since (the types'
    history, as touched_patients finds deletions). A change that does not matter to the rules (an Observation of
    another code) is counted too: it only costs reading that patient again. Not seen: an edit of a Medication that
    a medication resource references (it has no subject)."""
    if not patients:
        return set()
    refs = ",".join(f"Patient/{p}" for p in patients)
    changed = {"_lastUpdated": f"ge{fhir_instant(since)}", "_count": PAGE_SIZE}
    searches = [("Observation", {"subject": refs}), ("DiagnosticReport", {"subject": refs})]
    searches += [(t, {"subject": refs}) for t in medication_types(rules)]
    if rules.ben.codes:
        searches.append(("Condition", {"subject": refs, "code": ben_codes(rules)}))
    subjects = Subjects(client.base_url)
    for resource_type, params in searches:
        for resource in client.search(resource_type, {**params, **changed, "_elements": "subject"}):
            if resource.get("resourceType") == resource_type:
                subjects.add(resource)
    for resource in client.search("Patient", {"_id": ",".join(patients), **changed, "_elements": "id"}):
        subjects.ids.add(str(resource.get("id")))
    for resource_type in ["Observation", "DiagnosticReport", *medication_types(rules)]:
        for reference in deleted_subjects(client, resource_type, since):
            subjects.add_reference(reference)
    return subjects.ids & set(patients)


def read_patient_list(path: Path) -> list[str]:
    return json.loads(Path(path).read_text(encoding="utf-8"))["patients"]


def write_patient_list(path: Path, patients: Iterable[str], **meta) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "patients": list(patients)}, indent=1) + "\n", encoding="utf-8")
