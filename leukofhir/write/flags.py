"""Write: desired Flags against the project's Flags on the server → create / update / withdraw, as versioned PUTs."""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

from leukofhir.config import Rules
from leukofhir.evaluate.flag_resource import flag_text
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import FatalFhirError, VersionConflictError, outcome_summary
from leukofhir.fhir.ids import is_valid_id
from leukofhir.fhir.transactions import AUTH_REFUSALS, TransactionWriter

__all__ = [
    "Change",
    "Plan",
    "WriteResult",
    "Written",
    "plan_writes",
    "apply_plan",
    "write_plan",
    "ensure_author",
    "author_device",
    "flag_id",
    "WITHDRAWN_NOTE",
    "WRITES",
    "VERSION_ROUNDS",
]

log = logging.getLogger(__name__)

WITHDRAWN_NOTE = "; withdrawn: the patient's data no longer supports this Flag"
ENTRIES_PER_TRANSACTION = 100
ID_PREFIX = "leukofhir-"
WRITES = ("create", "update", "withdraw", "delete")
# The version a create names in If-Match: none the server ever gives. HAPI 8.8 creates the Flag when nothing was ever
# at its id and answers 409 HAPI-0989 when anything is or was (a Flag another writer created meanwhile, a deleted one);
# it ignores If-None-Match and ifNoneExist on a PUT (docs/pipeline.md, "How Flags are written";
# benchmarks/concurrent_create.py).
NEW = "0"
# How many times the patients of a write refused because the Flag's version moved are read and decided again before
# the write is reported as a conflict.
VERSION_ROUNDS = 3


def flag_id(identifier: str) -> str:
    """The id a new Flag is written at: derived from its identifier, so any number of writers, at any time, write
    the same resource. Conditional upserts (`PUT Flag?identifier=…`) were not enough: eight simultaneous ones on
    HAPI 8.8 left two Flags with one identifier in 3 runs of 5 (answers 201, 200, 409 and 412); eight PUTs at one
    id never did (docs/pipeline.md, "How Flags are written"). An identifier is 40 hex digits: the id is a valid FHIR
    id."""
    return ID_PREFIX + identifier


@dataclass(frozen=True)
class Change:
    """What was decided for the Flag at `flag_id`: a write (`create`, `update` or `withdraw` it, or `delete` a
    duplicate) or none (`unchanged`; `not_created`: wanted `entered-in-error` with nothing on the server). `version`:
    the server's `meta.versionId` of the Flag it was decided from (NEW for a create), sent as If-Match; `subject`:
    the patient's reference, who is decided again when that version has moved."""

    action: str
    identifier: str
    flag: dict | None = None
    flag_id: str | None = None
    version: str | None = None
    subject: str | None = None
    # Tags of a previous canonical base on the Flag on the server: HAPI keeps a resource's tags across updates (the
    # tags of what is written are added to them), so they are removed with $meta-delete once the write is done.
    stale_tags: tuple = ()

    @property
    def key(self) -> tuple:
        return self.action, self.flag_id

    @property
    def if_match(self) -> str | None:
        """The version sent in If-Match: the one decided from; NEW for a create that names none."""
        return NEW if self.version is None and self.action == "create" else self.version


@dataclass
class Plan:
    """Every decision of a comparison, one per Flag (a wanted one, or one on the server no longer wanted), and the
    server's time when the data decided from was read (None: not known)."""

    decisions: list[Change] = field(default_factory=list)
    read_at: datetime | None = None

    @property
    def changes(self) -> list[Change]:
        """The decisions that write."""
        return [d for d in self.decisions if d.action in WRITES]

    @property
    def unchanged(self) -> int:
        return sum(d.action == "unchanged" for d in self.decisions)

    @property
    def not_created(self) -> int:
        return sum(d.action == "not_created" for d in self.decisions)

    def counts(self) -> Counter:
        counts = Counter(d.action for d in self.decisions)
        return Counter({action: counts[action] for action in (*WRITES, "unchanged", "not_created")})


@dataclass
class WriteResult:
    """What the server accepted (`written`, by action, counted as each transaction is answered), each write it
    refused with its OperationOutcome, and each it refused because the Flag's version had moved (`conflicts`)."""

    written: Counter = field(default_factory=Counter)
    refused: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)


def _identifier(flag: dict, systems: str | tuple[str, ...]) -> str | None:
    """The Flag's episode identifier value under one of `systems` (the base's, then the previous bases')."""
    systems = (systems,) if isinstance(systems, str) else systems
    for identifier in flag.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") in systems and identifier.get("value"):
            return identifier["value"]
    return None


def rebased(flag: dict, rules: Rules) -> dict:
    """A Flag of the project written under a previous canonical base, with its identifier system, tag system and
    extension URL under the current base (issue 21): what the next run writes over it. Other elements unchanged."""
    current = rules.uris.under(rules.uris.base)
    moved = {}
    for base in rules.uris.previous_bases:
        old = rules.uris.under(base)
        moved.update({old[key]: current[key] for key in ("identifier_system", "tag_system", "ctcae_grade_extension")})
    if not moved:
        return flag
    out = copy.deepcopy(flag)
    for identifier in out.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") in moved:
            identifier["system"] = moved[identifier["system"]]
    for tag in (out.get("meta") or {}).get("tag") or []:
        if isinstance(tag, dict) and tag.get("system") in moved:
            tag["system"] = moved[tag["system"]]
    for ext in out.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") in moved:
            ext["url"] = moved[ext["url"]]
    return out


def comparable(flag: dict) -> dict:
    """A Flag without what the server adds (id, versionId, lastUpdated, source): two Flags that compare equal need
    no write. Tags and profiles are compared as sets, in case a server reorders them."""
    out = {k: v for k, v in flag.items() if k not in ("id", "meta")}
    meta = flag.get("meta") or {}
    out["tags"] = sorted((t.get("system"), t.get("code")) for t in meta.get("tag") or [] if isinstance(t, dict))
    out["profiles"] = sorted(str(p) for p in meta.get("profile") or [])
    return out


def withdrawn(flag: dict, rules: Rules) -> dict:
    """The Flag as it stays in the chart once withdrawn: same content, status entered-in-error (clinical-rules §4),
    the project's profile, its narrative made again, under the current canonical base."""
    flag = rebased(flag, rules)
    out = {k: copy.deepcopy(v) for k, v in flag.items() if k not in ("id", "meta", "text")}
    out["meta"] = {"profile": [rules.uris.flag_profile], "tag": [t for t in (flag.get("meta") or {}).get("tag") or []]}
    out["status"] = "entered-in-error"
    code = out.get("code")
    if isinstance(code, dict) and isinstance(code.get("text"), str) and not code["text"].endswith(WITHDRAWN_NOTE):
        code["text"] += WITHDRAWN_NOTE
    out["text"] = flag_text(out, rules)
    return out


def _stale_tags(flag: dict, rules: Rules) -> tuple:
    """The Flag's tags under a previous canonical base, as (system, code)."""
    previous = {rules.uris.under(b)["tag_system"] for b in rules.uris.previous_bases}
    return tuple(
        sorted(
            (t.get("system"), t.get("code"))
            for t in (flag.get("meta") or {}).get("tag") or []
            if isinstance(t, dict) and t.get("system") in previous
        )
    )


def _subject(flag: dict) -> str | None:
    subject = flag.get("subject")
    return subject.get("reference") if isinstance(subject, dict) else None


def _version_of(flag: dict) -> str | None:
    version = (flag.get("meta") or {}).get("versionId")
    return str(version) if version else None


def plan_writes(desired: Iterable[dict], existing: Iterable[dict], rules: Rules) -> Plan:
    """Compare the Flags the rules want for some patients with the project's Flags of the same patients.

    - wanted, none on the server: create (unless it is `entered-in-error`: nothing to withdraw, nothing written);
    - wanted, on the server with other content: update; with the same content: unchanged;
    - on the server, no longer wanted: withdraw (status `entered-in-error`), once;
    - several on the server with one identifier (written by another tool, or by conditional writes that raced):
      the one at the identifier's own id is kept (else the first by id), the others are deleted.
    A new Flag is written at the id derived from its identifier; one already there keeps its id. Every write of a
    Flag on the server names the version it was decided from (`meta.versionId`); a create names NEW."""
    # A Flag written under a previous canonical base is the same episode (the value is a digest of patient, family
    # and start, the id derives from it): it is updated in place, under the current base.
    systems = tuple(rules.uris.identifier_systems)
    on_server: dict[str, dict] = {}
    plan = Plan()
    decide = plan.decisions.append

    def kept_first(flag: dict) -> tuple:
        key = _identifier(flag, systems)
        return (key is None or flag.get("id") != flag_id(key), str(flag.get("id")))

    for flag in sorted(existing, key=kept_first):
        key = _identifier(flag, systems)
        if key is None:
            log.warning(
                "Flag/%s carries the project's tag but no identifier of %s: left alone", flag.get("id"), systems[0]
            )
            continue
        if key in on_server:
            decide(Change("delete", key, flag_id=flag.get("id"), version=_version_of(flag), subject=_subject(flag)))
            continue
        on_server[key] = flag
    for flag in desired:
        key = _identifier(flag, systems[0])
        current = on_server.pop(key, None)
        if current is None:
            action = "not_created" if flag.get("status") == "entered-in-error" else "create"
            decide(Change(action, key, flag, flag_id(key), NEW, _subject(flag)))
        else:
            action = "unchanged" if comparable(current) == comparable(flag) else "update"
            decide(
                Change(
                    action,
                    key,
                    flag,
                    current["id"],
                    _version_of(current),
                    _subject(current),
                    _stale_tags(current, rules),
                )
            )
    for key, flag in sorted(on_server.items()):
        target, stale = withdrawn(flag, rules), _stale_tags(flag, rules)
        if flag.get("status") != "entered-in-error":
            decide(Change("withdraw", key, target, flag["id"], _version_of(flag), _subject(flag), stale))
        elif comparable(target) == comparable(flag):
            decide(Change("unchanged", key, flag, flag["id"], _version_of(flag), _subject(flag)))
        else:  # withdrawn before its profile or narrative was written, or under a previous base: brought up to date
            decide(Change("update", key, target, flag["id"], _version_of(flag), _subject(flag), stale))
    return plan


def _entry(change: Change) -> dict:
    """The transaction entry of a write, with `If-Match` of the version it was decided from: the server refuses it if
    the Flag changed since (FHIR R4 http.html#concurrency; HAPI answers 409 HAPI-0989)."""
    if not is_valid_id(change.flag_id):
        raise ValueError(f"Flag id {change.flag_id!r} is not a FHIR id")  # never put into a URL
    url = f"Flag/{change.flag_id}"
    request = {
        "method": "DELETE" if change.action == "delete" else "PUT",
        "url": url,
        "ifMatch": f'W/"{change.if_match}"',
    }
    if change.action == "delete":
        return {"request": request}
    return {"resource": {**change.flag, "id": change.flag_id}, "request": request}


def author_device(rules: Rules) -> dict:
    """The Device named as every Flag's author (clinical-rules §5): the rules engine, with the rules' version."""
    device_id = rules.uris.author.split("/", 1)[1]
    return {
        "resourceType": "Device",
        "id": device_id,
        "meta": {"tag": [{"system": rules.uris.tag_system, "code": rules.uris.tag_code}]},
        "status": "active",
        "deviceName": [{"name": "leukofhir leukopenia rules engine", "type": "manufacturer-name"}],
        "version": [{"value": _version()}],
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("leukofhir")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


def ensure_author(client: FhirClient, rules: Rules) -> None:
    """PUT the author Device at its id: Flags that name it are refused until it exists (referential integrity).
    Idempotent: the server keeps the version when the content is the same."""
    client.update(author_device(rules))


def apply_plan(client: FhirClient, changes: list[Change], written: Counter | None = None) -> WriteResult:
    """Send the changes in transaction Bundles. A refused transaction is split until the refused entries stand
    alone: each is reported with the server's OperationOutcome (in `conflicts` when the Flag's version had moved) and
    the rest is written. `written`: a Counter of the writes done, kept up to date as each transaction is answered (so
    a caller still knows what was written when the server fails mid-way)."""
    result = WriteResult(written=Counter() if written is None else written)
    sendable = []
    for change in changes:
        if change.if_match is None:
            # Never written blindly: without the version it was decided from, a write could undo a newer one.
            result.refused.append(
                _report(
                    change,
                    None,
                    None,
                    "the Flag on the server has no meta.versionId, so it cannot be written over safely",
                )
            )
            log.warning("Flag %s (%s) not written: the server gave it no version", change.identifier, change.action)
        else:
            sendable.append(change)
    change_of: dict[int, Change] = {}  # each entry sent → its change

    def count(sent: list[dict], answers: list) -> None:
        for entry in sent:
            result.written[change_of[id(entry)].action] += 1
        for entry in sent:
            if change_of[id(entry)].stale_tags:
                _remove_tags(client, change_of[id(entry)])

    def refused(entry: dict, exc: FatalFhirError) -> None:
        change = change_of[id(entry)]
        conflict = isinstance(exc, VersionConflictError)
        (result.conflicts if conflict else result.refused).append(_report(change, exc.status, exc.outcome, str(exc)))
        # Codes and element paths only: the outcome's text may quote patient data (rejects.ndjson has it all).
        log.log(
            logging.INFO if conflict else logging.WARNING,
            "Flag %s (%s) %s: HTTP %s: %s",
            change.identifier,
            change.action,
            "not written, its version moved" if conflict else "refused",
            exc.status,
            outcome_summary(exc.outcome) or "no OperationOutcome",
        )

    # One retry policy: the client's (leukofhir.fhir.http), which repeats a 409 from a simultaneous writer. A version
    # conflict, or any other refusal, is isolated by halving, so every other entry is still written.
    writer = TransactionWriter(client, count, refused)
    for start in range(0, len(sendable), ENTRIES_PER_TRANSACTION):
        entries = []
        for change in sendable[start : start + ENTRIES_PER_TRANSACTION]:
            entries.append(_entry(change))
            change_of[id(entries[-1])] = change
        writer.send(entries)
    return result


def _report(change: Change, status: int | None, outcome: dict | None, message: str) -> dict:
    return {
        "action": change.action,
        "identifier": change.identifier,
        "flag_id": change.flag_id,
        "subject": change.subject,
        "status": status,
        "outcome": outcome,
        "message": message,
    }


def _remove_tags(client: FhirClient, change: Change) -> None:
    """$meta-delete the tags of a previous canonical base from a Flag just written (HAPI keeps the version). When it
    fails the tag stays, the Flag still differs from what is wanted, and the next run writes and removes it again."""
    tags = [{"system": system, "code": code} for system, code in change.stale_tags]
    body = {"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": tags}}]}
    try:
        client.request_json("POST", f"Flag/{change.flag_id}/$meta-delete", json=body)
    except FatalFhirError as exc:
        if exc.status in AUTH_REFUSALS:
            raise
        log.warning(
            "Flag %s: the tags of the previous base were not removed: HTTP %s: %s",
            change.identifier,
            exc.status,
            outcome_summary(exc.outcome) or "no OperationOutcome",
        )


@dataclass
class Written:
    """How a plan ended, one count per decision: its write (`create`, …), `unchanged`, `not_created`, `refused`, or
    `conflict` (its version still moving after VERSION_ROUNDS decisions); `refused`: the server's answer to each
    write not applied (conflicts marked); `reevaluated`: patients read and decided again."""

    counts: Counter = field(default_factory=Counter)
    refused: list[dict] = field(default_factory=list)
    reevaluated: int = 0


def write_plan(
    client: FhirClient,
    plan: Plan,
    redecide: Callable[[list[str]], Plan],
    *,
    changed: Callable[[list[str], datetime | None], set[str]] | None = None,
    rounds: int = VERSION_ROUNDS,
    written: Counter | None = None,
) -> Written:
    """Apply the plan, then decide again, from the server's data now, the patients whose decision may be stale, and
    apply that, up to `rounds` times:
    - a write the server refused because the Flag's version moved since it was read (another writer wrote it);
    - a patient written whose data changed on the server since it was read (`changed(subjects, read_at)`: the
      subjects among those given): another run may have judged the new data, found nothing to write, and finished
      before this write landed over it.
    `redecide(subjects)` reads those patients again and returns their new plan. A write still in conflict after the
    last round is counted as `conflict`, never written blindly.

    Counts are per decision, in the last plan that decided it; a Flag this run wrote in an earlier round that the
    next plan finds unchanged counts as that write. `written` (a Counter) follows the writes as they are made."""
    written = Counter() if written is None else written
    out = Written()
    earlier: dict[tuple, str] = {}  # (identifier, Flag id) → what this run wrote, for patients decided again
    for round_number in range(rounds + 1):
        result = apply_plan(client, plan.changes, written)
        stale = {(c["action"], c["flag_id"]): c for c in result.conflicts}
        refused = {(r["action"], r["flag_id"]) for r in result.refused}
        last = round_number == rounds
        again = set() if last else {c["subject"] for c in result.conflicts if c["subject"]}
        applied = {d.subject for d in plan.changes if d.subject and d.key not in stale and d.key not in refused}
        moved = changed(sorted(applied - again), plan.read_at) if changed and not last and applied - again else set()
        again |= moved
        out.refused += [r for r in result.refused if r["subject"] not in again]
        for decision in plan.decisions:
            if decision.subject in again:  # decided again in the next round
                if decision.action in WRITES and decision.key not in stale and decision.key not in refused:
                    earlier[decision.identifier, decision.flag_id] = decision.action
                continue
            if decision.key in refused:
                out.counts["refused"] += 1
            elif decision.key in stale:
                out.counts["conflict"] += 1
                out.refused.append({**stale[decision.key], "conflict": True})
            elif decision.action == "unchanged":
                out.counts[earlier.get((decision.identifier, decision.flag_id), "unchanged")] += 1
            else:
                out.counts[decision.action] += 1
        if not again:
            return out
        log.info(
            "%d Flag writes found their version moved, %d patients written had new data: %d patients read and "
            "decided again (round %d of %d)",
            len(stale),
            len(moved),
            len(again),
            round_number + 1,
            rounds,
        )
        out.reevaluated += len(again)
        created = {c["flag_id"] for c in result.conflicts if c["action"] == "create"}
        plan = _over_deleted(client, redecide(sorted(again)), created)
    return out


def _over_deleted(client: FhirClient, plan: Plan, refused_creates: set[str]) -> Plan:
    """A create refused because its id was taken, and decided again as a create, finds a deleted Flag there (a live
    one would have been read): it is written over that deletion's version, as a plain PUT would have resurrected it."""
    decisions = []
    for decision in plan.decisions:
        if decision.action == "create" and decision.flag_id in refused_creates:
            version = _deleted_version(client, decision.flag_id)
            if version is not None:
                decision = Change(
                    decision.action, decision.identifier, decision.flag, decision.flag_id, version, decision.subject
                )
        decisions.append(decision)
    return Plan(decisions, plan.read_at)


def _deleted_version(client: FhirClient, resource_id: str) -> str | None:
    """The version of the deletion of Flag/`resource_id` when its last version is one, else None."""
    try:
        bundle = client.request_json(
            "GET", f"Flag/{resource_id}/_history", params={"_count": 1}, headers={"Cache-Control": "no-cache"}
        )
    except FatalFhirError as exc:
        if exc.status in (404, 410):
            return None
        raise
    for entry in bundle.get("entry") or []:
        if (entry.get("request") or {}).get("method") == "DELETE":
            etag = str((entry.get("response") or {}).get("etag") or "")
            version = etag.removeprefix("W/").strip('"')
            return version if version.isdigit() else None
        return None
    return None


def write_rejects(path: Path, refused: list[dict]) -> None:
    """The server's full answer to each refused write: the run folder holds it, logs never do."""
    with open(path, "a", encoding="utf-8") as fh:
        for item in refused:
            fh.write(json.dumps(item, ensure_ascii=True) + "\n")
