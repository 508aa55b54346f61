"""`leukofhir load`: write FHIR Bundles / NDJSON to a server in transaction Bundles, ids kept, idempotent."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import FatalFhirError
from leukofhir.reader import ReadError, iter_resources

log = logging.getLogger(__name__)

# Referential integrity is enforced on write, so targets go before the resources that point at them.
# Resources of one type keep their input order; types not listed go after these, Flags last of all.
TYPE_ORDER = [
    "Organization", "Location", "Practitioner", "PractitionerRole", "Patient", "RelatedPerson", "Device",
    "Medication", "Encounter", "Condition", "Goal", "CarePlan", "Procedure", "Specimen", "ServiceRequest",
    "Observation", "DiagnosticReport", "MedicationRequest", "MedicationStatement", "MedicationAdministration",
    "Immunization", "AllergyIntolerance", "Claim", "ExplanationOfBenefit",
]


def _rank(resource_type: str) -> tuple[int, str]:
    if resource_type == "Flag":
        return len(TYPE_ORDER) + 1, resource_type
    try:
        return TYPE_ORDER.index(resource_type), resource_type
    except ValueError:
        return len(TYPE_ORDER), resource_type


@dataclass
class LoadReport:
    """What a load did: resources read and written per type, and each one refused with the server's reason."""

    read: Counter = field(default_factory=Counter)
    written: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # transaction response statuses, e.g. "201 Created"
    rejected: list[tuple[str, str]] = field(default_factory=list)  # ("Type/id" or file:line, reason)

    @property
    def ok(self) -> bool:
        return not self.rejected


def _rewrite_uuid_references(node, index: dict[str, str]) -> None:
    """`urn:uuid:<id>` → `Type/<id>` when exactly one input resource has that id (Synthea NDJSON style)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value.startswith("urn:uuid:"):
                target = index.get(value[9:])
                if target:
                    node[key] = f"{target}/{value[9:]}"
            elif isinstance(value, (dict, list)):
                _rewrite_uuid_references(value, index)
    elif isinstance(node, list):
        for value in node:
            _rewrite_uuid_references(value, index)


def _spooled(spool: Path, resource_type: str) -> Iterator[dict]:
    with open(spool / f"{resource_type}.ndjson", encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def _batches(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _entry(resource: dict) -> dict:
    return {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}


class Loader:
    """Loads files into one server; holds the urn:uuid index and the report while it runs."""

    def __init__(self, client: FhirClient, batch_size: int = 200):
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.client = client
        self.batch_size = batch_size
        self.report = LoadReport()

    def load(self, paths: Iterable[str]) -> LoadReport:
        with tempfile.TemporaryDirectory(prefix="leukofhir-load-") as tmp:
            spool = Path(tmp)
            index = self._spool(paths, spool)
            for resource_type in sorted(self.report.read, key=_rank):
                resources = _spooled(spool, resource_type)
                for batch in _batches(resources, self.batch_size):
                    for resource in batch:
                        _rewrite_uuid_references(resource, index)
                    self._send([_entry(r) for r in batch])
                log.info("%s: %d written", resource_type, self.report.written[resource_type])
        return self.report

    def _spool(self, paths: Iterable[str], spool: Path) -> dict[str, str]:
        """Pass 1: read everything once, file it per type on disk, index ids for urn:uuid references."""
        index: dict[str, str] = {}
        ambiguous: set[str] = set()
        handles = {}

        def on_error(error: ReadError) -> None:
            self.report.rejected.append((str(error.source), error.message))

        try:
            for item in iter_resources(paths, on_error):
                res = item.resource
                rtype, rid = res["resourceType"], res.get("id")
                if not isinstance(rid, str) or not rid:
                    # Without an id there is no idempotent PUT: a second load would duplicate it.
                    self.report.rejected.append((f"{rtype} at {item.source}", "no id; cannot be loaded idempotently"))
                    continue
                self.report.read[rtype] += 1
                if rid in index and index[rid] != rtype:
                    ambiguous.add(rid)
                index[rid] = rtype
                if rtype not in handles:
                    handles[rtype] = open(spool / f"{rtype}.ndjson", "w", encoding="utf-8")
                handles[rtype].write(json.dumps(res, separators=(",", ":")) + "\n")
        finally:
            for fh in handles.values():
                fh.close()
        for rid in ambiguous:
            del index[rid]
        return index

    def _send(self, entries: list[dict]) -> None:
        try:
            self._record(entries, self.client.transaction(entries))
            return
        except FatalFhirError as exc:
            if len(entries) == 1:
                ref = entries[0]["request"]["url"]
                self.report.rejected.append((ref, str(exc)))
                log.warning("rejected %s: HTTP %s", ref, exc.status)
                return
            log.info("transaction of %d refused (HTTP %s); writing its entries one by one", len(entries), exc.status)
        # One bad resource fails a whole transaction; write the rest singly so only the bad one is lost.
        # Entries that fail only because a target comes later in the same batch succeed in the second round.
        pending = entries
        for final_round in (False, True):
            failed = []
            for entry in pending:
                try:
                    self._record([entry], self.client.transaction([entry]))
                except FatalFhirError as exc:
                    if final_round:
                        ref = entry["request"]["url"]
                        self.report.rejected.append((ref, str(exc)))
                        log.warning("rejected %s: HTTP %s", ref, exc.status)
                    else:
                        failed.append(entry)
            pending = failed
            if not pending:
                break

    def _record(self, entries: list[dict], response: dict) -> None:
        for entry, answer in zip(entries, response.get("entry") or []):
            self.report.written[entry["resource"]["resourceType"]] += 1
            self.report.outcomes[(answer.get("response") or {}).get("status", "?")] += 1


def load_files(client: FhirClient, paths: Iterable[str], batch_size: int = 200) -> LoadReport:
    return Loader(client, batch_size).load(paths)


def print_report(report: LoadReport, out=sys.stdout) -> None:
    read, written = sum(report.read.values()), sum(report.written.values())
    print(f"read {read} resources, wrote {written}, rejected {len(report.rejected)}", file=out)
    for rtype in sorted(report.read, key=_rank):
        print(f"  {rtype:<28} read {report.read[rtype]:>7}  written {report.written[rtype]:>7}", file=out)
    if report.outcomes:
        print("  server answers: " + ", ".join(f"{k} ×{v}" for k, v in sorted(report.outcomes.items())), file=out)
    for ref, reason in report.rejected[:50]:
        print(f"  REJECTED {ref}: {reason}", file=out)
    if len(report.rejected) > 50:
        print(f"  ... and {len(report.rejected) - 50} more rejected", file=out)


def load_command(args) -> int:
    from leukofhir.fhir.client import connect

    with connect(args.fhir_url, args.auth, timeout=args.timeout) as client:
        report = load_files(client, args.files, args.batch_size)
    print_report(report)
    # Partial success is still worth a non-zero exit: a script loading test data must notice a refusal.
    return 0 if report.ok else 1
