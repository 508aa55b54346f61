"""Write: desired Flags against the project's Flags on the server → create / update / withdraw, as idempotent PUTs."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from leukofhir.config import Rules
from leukofhir.fhir.ids import is_valid_id
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import FatalFhirError, outcome_summary

__all__ = ["Change", "Plan", "WriteResult", "plan_writes", "apply_plan", "ensure_author", "author_device",
           "flag_id", "WITHDRAWN_NOTE"]

log = logging.getLogger(__name__)

WITHDRAWN_NOTE = "; withdrawn: the patient's data no longer supports this Flag"
ENTRIES_PER_TRANSACTION = 100
# Two writers of one Flag at the same instant (two runs touching a patient): the server may answer 409 to one; the
# same PUT a moment later finds the Flag there and updates it.
CONFLICT_RETRIES = 5
ID_PREFIX = "leukofhir-"


def flag_id(identifier: str) -> str:
    """The id a new Flag is written at: derived from its identifier, so any number of writers, at any time, write
    the same resource. Conditional upserts (`PUT Flag?identifier=…`) were not enough: eight simultaneous ones on
    HAPI 8.8 left two Flags with one identifier in 3 runs of 5 (answers 201, 200, 409 and 412); eight PUTs at one
    id never did (README, "How Flags are written"). An identifier is 40 hex digits: the id is a valid FHIR id."""
    return ID_PREFIX + identifier


@dataclass(frozen=True)
class Change:
    """One write of the Flag at `flag_id`: `create`, `update` or `withdraw` it, or `delete` a duplicate."""

    action: str
    identifier: str
    flag: dict | None = None
    flag_id: str | None = None


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    unchanged: int = 0
    # Desired `entered-in-error` Flags with nothing on the server to withdraw: never created (clinical-decisions).
    not_created: int = 0

    def counts(self) -> Counter:
        counts = Counter(c.action for c in self.changes)
        return Counter({"create": counts["create"], "update": counts["update"], "withdraw": counts["withdraw"],
                        "delete": counts["delete"], "unchanged": self.unchanged, "not_created": self.not_created})


@dataclass
class WriteResult:
    """What the server accepted (`written`, by action) and each write it refused, with its OperationOutcome."""

    written: Counter = field(default_factory=Counter)
    refused: list[dict] = field(default_factory=list)


def _identifier(flag: dict, system: str) -> str | None:
    for identifier in flag.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") == system and identifier.get("value"):
            return identifier["value"]
    return None


def comparable(flag: dict) -> dict:
    """A Flag without what the server adds (id, versionId, lastUpdated, source): two Flags that compare equal need
    no write. Tags are compared as a set, in case a server reorders them."""
    out = {k: v for k, v in flag.items() if k not in ("id", "meta", "text")}
    tags = (flag.get("meta") or {}).get("tag") or []
    out["tags"] = sorted((t.get("system"), t.get("code")) for t in tags if isinstance(t, dict))
    return out


def withdrawn(flag: dict) -> dict:
    """The Flag as it stays in the chart once withdrawn: same content, status entered-in-error (clinical-rules §4)."""
    out = {k: copy.deepcopy(v) for k, v in flag.items() if k not in ("id", "meta", "text")}
    out["meta"] = {"tag": [t for t in (flag.get("meta") or {}).get("tag") or []]}
    out["status"] = "entered-in-error"
    code = out.get("code")
    if isinstance(code, dict) and isinstance(code.get("text"), str) and not code["text"].endswith(WITHDRAWN_NOTE):
        code["text"] += WITHDRAWN_NOTE
    return out


def plan_writes(desired: Iterable[dict], existing: Iterable[dict], rules: Rules) -> Plan:
    """Compare the Flags the rules want for some patients with the project's Flags of the same patients.

    - wanted, none on the server: create (unless it is `entered-in-error`: nothing to withdraw, nothing written);
    - wanted, on the server with other content: update; with the same content: unchanged;
    - on the server, no longer wanted: withdraw (status `entered-in-error`), once;
    - several on the server with one identifier (written by another tool, or by conditional writes that raced):
      the one at the identifier's own id is kept (else the first by id), the others are deleted.
    A new Flag is written at the id derived from its identifier; one already there keeps its id."""
    system = rules.uris.identifier_system
    on_server: dict[str, dict] = {}
    plan = Plan()

    def kept_first(flag: dict) -> tuple:
        key = _identifier(flag, system)
        return (key is None or flag.get("id") != flag_id(key), str(flag.get("id")))

    for flag in sorted(existing, key=kept_first):
        key = _identifier(flag, system)
        if key is None:
            log.warning("Flag/%s carries the project's tag but no identifier of %s: left alone", flag.get("id"), system)
            continue
        if key in on_server:
            plan.changes.append(Change("delete", key, flag_id=flag.get("id")))
            continue
        on_server[key] = flag
    for flag in desired:
        key = _identifier(flag, system)
        current = on_server.pop(key, None)
        if current is None:
            if flag.get("status") == "entered-in-error":
                plan.not_created += 1
            else:
                plan.changes.append(Change("create", key, flag, flag_id(key)))
        elif comparable(current) == comparable(flag):
            plan.unchanged += 1
        else:
            plan.changes.append(Change("update", key, flag, current["id"]))
    for key, flag in sorted(on_server.items()):
        if flag.get("status") == "entered-in-error":
            plan.unchanged += 1
        else:
            plan.changes.append(Change("withdraw", key, withdrawn(flag), flag["id"]))
    return plan


def _entry(change: Change) -> dict:
    if not is_valid_id(change.flag_id):
        raise ValueError(f"Flag id {change.flag_id!r} is not a FHIR id")  # never put into a URL
    url = f"Flag/{change.flag_id}"
    if change.action == "delete":
        return {"request": {"method": "DELETE", "url": url}}
    return {"resource": {**change.flag, "id": change.flag_id}, "request": {"method": "PUT", "url": url}}


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


def apply_plan(client: FhirClient, changes: list[Change], *, sleep: Callable[[float], None] = time.sleep) -> WriteResult:
    """Send the changes in transaction Bundles. A refused transaction is split until the refused entries stand
    alone; each is reported with the server's OperationOutcome and the rest is written."""
    result = WriteResult()
    for start in range(0, len(changes), ENTRIES_PER_TRANSACTION):
        _send(client, changes[start:start + ENTRIES_PER_TRANSACTION], result, sleep)
    return result


def _send(client: FhirClient, changes: list[Change], result: WriteResult, sleep) -> None:
    entries = [_entry(c) for c in changes]
    for attempt in range(CONFLICT_RETRIES + 1):
        try:
            response = client.transaction(entries)
        except FatalFhirError as exc:
            if exc.status == 409 and attempt < CONFLICT_RETRIES:
                log.info("Flag write conflict (HTTP 409): another writer holds an identifier; retry %d", attempt + 1)
                sleep(0.2 * 2 ** attempt)
                continue
            if exc.status in (401, 403):
                raise
            if len(changes) > 1:
                # All or nothing: find the refused entries by halving, so every other one is still written.
                middle = len(changes) // 2
                _send(client, changes[:middle], result, sleep)
                _send(client, changes[middle:], result, sleep)
                return
            change = changes[0]
            result.refused.append({"action": change.action, "identifier": change.identifier,
                                   "flag_id": change.flag_id, "status": exc.status, "outcome": exc.outcome,
                                   "message": str(exc)})
            # Codes and element paths only: the outcome's text may quote patient data (rejects.ndjson has it all).
            log.warning("Flag %s (%s) refused: HTTP %s: %s", change.identifier, change.action, exc.status,
                        outcome_summary(exc.outcome) or "no OperationOutcome")
            return
        answers = response.get("entry") or []
        if len(answers) != len(entries):
            raise FatalFhirError(f"transaction-response has {len(answers)} entries for {len(entries)} sent",
                                 status=None, outcome=response)
        for change in changes:
            result.written[change.action] += 1
        return


def write_rejects(path: Path, refused: list[dict]) -> None:
    """The server's full answer to each refused write: the run folder holds it, logs never do."""
    with open(path, "a", encoding="utf-8") as fh:
        for item in refused:
            fh.write(json.dumps(item, ensure_ascii=True) + "\n")
