"""`leukofhir load`: write FHIR Bundles / NDJSON to a server in transaction Bundles, ids kept, idempotent."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from requests.adapters import HTTPAdapter

from leukofhir.errors import LeukofhirError, OutputError, UsageError
from leukofhir.extract.reader import ReadError, iter_resources
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import AuthError, FatalFhirError, FhirError, outcome_summary
from leukofhir.fhir.ids import InvalidIdError, resource_path, shown
from leukofhir.fhir.transactions import IncompleteAnswerError, TransactionWriter, answers

log = logging.getLogger(__name__)

# Referential integrity is enforced on write, so targets go before the resources that point at them.
# Resources of one type keep their input order; types not listed go after these, Flags last of all.
TYPE_ORDER = [
    "Organization",
    "Location",
    "Practitioner",
    "PractitionerRole",
    "Patient",
    "RelatedPerson",
    "Device",
    "Medication",
    "Encounter",
    "Condition",
    "Goal",
    "CarePlan",
    "Procedure",
    "Specimen",
    "ServiceRequest",
    "Observation",
    "DiagnosticReport",
    "MedicationRequest",
    "MedicationStatement",
    "MedicationAdministration",
    "Immunization",
    "AllergyIntolerance",
    "Claim",
    "ExplanationOfBenefit",
]


def _rank(resource_type: str) -> tuple[int, str]:
    if resource_type == "Flag":
        return len(TYPE_ORDER) + 1, resource_type
    try:
        return TYPE_ORDER.index(resource_type), resource_type
    except ValueError:
        return len(TYPE_ORDER), resource_type


REJECTS = "rejects.ndjson"
SHOWN_REJECTED = 50
# Refusals of the request itself, not of the resources in it: no FHIR transaction endpoint at this URL (a redirect,
# which is never followed for a write; Not Found, Method Not Allowed, Not Acceptable, Unsupported Media Type, Not
# Implemented). Sending each resource on its own would only repeat them, so the load stops.
_ENDPOINT_REFUSALS = frozenset({301, 302, 303, 307, 308, 404, 405, 406, 415, 501})


@dataclass
class LoadReport:
    """What a load did: resources read and written per type, and each one refused with the reason.

    `rejected` holds what may be shown (ids, file and line, HTTP status, issue codes and element paths); the
    server's full OperationOutcome, which may quote patient data, goes only to `rejects_path` (see _Rejects)."""

    read: Counter = field(default_factory=Counter)
    written: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # transaction response statuses, e.g. "201 Created"
    rejected: list[tuple[str, str]] = field(default_factory=list)  # ("Type/id" or file:line, reason)
    rejects_path: Path | None = None
    stopped: str | None = None  # why the load ended before every resource was sent

    @property
    def ok(self) -> bool:
        return not self.rejected and self.stopped is None


class LoadStopped(LeukofhirError):
    """The load ended early (credentials refused, the server gone or answering nonsense); `report` says what was
    written before, `__cause__` is the error."""

    def __init__(self, report: LoadReport, cause: FhirError):
        self.report = report
        report.stopped = describe(cause)
        super().__init__(report.stopped)


def describe(error: FhirError) -> str:
    """An error of the server as it may be shown: status, issue codes and element paths, never the issue text."""
    if error.status is None or error.status < 400 or isinstance(error, IncompleteAnswerError):
        # No answer at all, or an answer that is no FHIR answer (a body that is not JSON): the client's own words.
        return str(error)
    summary = outcome_summary(error.outcome)
    text = f"HTTP {error.status}" + (f": {summary}" if summary else "")
    if isinstance(error, AuthError):
        what = "credentials" if error.status == 401 else "rights"
        return f"the server refused our {what} ({text})"
    return text


class _Rejects:
    """`rejects.ndjson` in the run folder: every resource or line not loaded, one JSON object a line, with the
    server's full OperationOutcome for its refusals. It may hold patient data (as the quarantine does), so it is
    written only here, in a folder the user names (`--out`) or a fresh private one (mode 0700, made at the first
    reject)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.path: Path | None = None
        self._fh = None
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / REJECTS).unlink(missing_ok=True)  # an earlier load's rejects must not pass for this one's
            except OSError as exc:
                raise UsageError(f"cannot use run folder {folder}: {exc.strerror or exc}") from None

    def write(self, record: dict) -> None:
        try:
            if self._fh is None:
                folder = self.folder or Path(tempfile.mkdtemp(prefix="leukofhir-load-"))
                self.path = folder / REJECTS
                self._fh = open(self.path, "w", encoding="utf-8")
            self._fh.write(json.dumps(record) + "\n")  # ASCII: U+2028 and the like never split a line
            self._fh.flush()
        except OSError as exc:
            raise OutputError(f"cannot write {self.path or self.folder}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


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
    # Type and id were checked when spooled (Loader._spool); resource_path checks again: nothing unchecked goes out.
    return {
        "resource": resource,
        "request": {"method": "PUT", "url": resource_path(resource["resourceType"], resource["id"])},
    }


# Transactions in flight at once: more than the server's connection pool (HAPI's is 20 here) would only queue there.
MAX_WORKERS = 16


class Loader:
    """Loads files into one server; holds the urn:uuid index and the report while it runs.

    `run_dir`: the run folder for rejects.ndjson; None for a fresh private folder made at the first reject.
    `workers`: transactions in flight at once (threads on the one client). Every resource of a type is written before
    the next type starts, so targets still come before the resources that refer to them."""

    def __init__(self, client: FhirClient, batch_size: int = 200, run_dir: str | Path | None = None, workers: int = 1):
        if batch_size < 1:
            raise UsageError("batch size must be at least 1")
        if not 1 <= workers <= MAX_WORKERS:
            raise UsageError(f"workers must be between 1 and {MAX_WORKERS}")
        self.client = client
        self.batch_size = batch_size
        self.workers = workers
        self.report = LoadReport()
        self.rejects = _Rejects(Path(run_dir) if run_dir is not None else None)
        # An entry refused alone is sent once more at the end: it may refer to one later in its transaction.
        self.writer = TransactionWriter(
            client, self._record, self._refused, stops=_ENDPOINT_REFUSALS, second_round=True
        )

    def load(self, paths: Iterable[str]) -> LoadReport:
        """Send every resource; raise LoadStopped (with the report so far) when the server makes going on pointless:
        credentials refused (401/403), the server gone, or answers that do not account for what was sent."""
        try:
            with tempfile.TemporaryDirectory(prefix="leukofhir-load-") as tmp:
                spool = Path(tmp)
                try:
                    index = self._spool(paths, spool)
                except OSError as exc:  # a full temporary folder
                    raise OutputError(f"cannot spool the input to {spool}: {exc.strerror or exc}") from None
                for resource_type in sorted(self.report.read, key=_rank):
                    batches = _batches(_spooled(spool, resource_type), self.batch_size)
                    if self.workers == 1:
                        for batch in batches:
                            self.writer.send(self._entries(batch, index))
                    else:
                        self._send_concurrently(self._entries(batch, index) for batch in batches)
                    log.info("%s: %d written", resource_type, self.report.written[resource_type])
        except FhirError as exc:
            raise LoadStopped(self.report, exc) from exc
        finally:
            self.rejects.close()
            self.report.rejects_path = self.rejects.path
        return self.report

    @staticmethod
    def _entries(batch: list[dict], index: dict[str, str]) -> list[dict]:
        for resource in batch:
            _rewrite_uuid_references(resource, index)
        return [_entry(r) for r in batch]

    def _send_concurrently(self, transactions: Iterable[list[dict]]) -> None:
        """The transactions of one type, `workers` at a time. Answers are recorded here, in the calling thread, in
        the order sent; a transaction the server refuses is written entry by entry once the others of its type are
        done (an entry may refer to a resource of the same type in a transaction still in flight)."""
        session = self.client.session
        if getattr(session.get_adapter(self.client.base_url), "_pool_maxsize", self.workers) < self.workers:
            # A kept connection per worker, or requests opens and drops a connection per transaction.
            session.mount(self.client.base_url, HTTPAdapter(pool_maxsize=self.workers, max_retries=0))
        refused: list[list[dict]] = []
        in_flight: deque[tuple[list[dict], Future]] = deque()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="load") as pool:
            try:
                for entries in transactions:
                    in_flight.append((entries, pool.submit(self.client.transaction, entries)))
                    if len(in_flight) >= 2 * self.workers:  # bounded: the spool is read as fast as it is written
                        self._settle(*in_flight.popleft(), refused)
                while in_flight:
                    self._settle(*in_flight.popleft(), refused)
            except BaseException:
                # The load stops: what was already sent is still counted (its answers are awaited), nothing new goes.
                for entries, future in in_flight:
                    if not future.cancel():
                        try:
                            self._record(entries, answers(entries, future.result()))
                        except Exception:  # noqa: BLE001  (the error that stops the load is the one raised)
                            pass
                raise
        for entries in refused:
            self.writer.isolate(entries)

    def _settle(self, entries: list[dict], future: Future, refused: list[list[dict]]) -> None:
        """One concurrent transaction's answer: recorded, or its entries kept to be isolated when refused."""
        if not self.writer.settle(entries, future.result):
            refused.append(entries)

    def _reject(self, ref: str, reason: str, error: FhirError | None = None) -> None:
        """Note a resource not loaded: what may be shown in the report, everything in the rejects file."""
        self.report.rejected.append((ref, reason))
        record = {"resource": ref, "reason": reason}
        if error is not None:
            record.update(status=error.status, outcome=error.outcome, message=str(error))
        self.rejects.write(record)

    def _spool(self, paths: Iterable[str], spool: Path) -> dict[str, str]:
        """Pass 1: read everything once, file it per type on disk, index ids for urn:uuid references."""
        index: dict[str, str] = {}
        ambiguous: set[str] = set()
        handles = {}

        def on_error(error: ReadError) -> None:
            self._reject(str(error.source), error.message)

        try:
            for item in iter_resources(paths, on_error):
                res = item.resource
                rtype, rid = res["resourceType"], res.get("id")
                if rid is None:
                    # Without an id there is no idempotent PUT: a second load would duplicate it.
                    self._reject(f"{shown(rtype)} at {item.source}", "no id; cannot be loaded idempotently")
                    continue
                try:
                    resource_path(rtype, rid)  # checked here, before it can go into any URL
                except InvalidIdError as exc:
                    where = rtype if isinstance(rtype, str) and rtype.isalpha() else "resource"
                    self._reject(f"{where} at {item.source}", f"{exc}; not sent")
                    continue
                try:
                    line = json.dumps(res, separators=(",", ":"), allow_nan=False)
                except ValueError:
                    # json.loads reads them, JSON (RFC 8259 §6) and FHIR do not: no request could carry them.
                    self._reject(
                        f"{rtype} at {item.source}", "holds NaN or Infinity, which JSON does not allow; not sent"
                    )
                    continue
                self.report.read[rtype] += 1
                if rid in index and index[rid] != rtype:
                    ambiguous.add(rid)
                index[rid] = rtype
                if rtype not in handles:
                    handles[rtype] = open(spool / f"{rtype}.ndjson", "w", encoding="utf-8")
                handles[rtype].write(line + "\n")
        finally:
            for fh in handles.values():
                fh.close()
        for rid in ambiguous:
            del index[rid]
        return index

    def _refused(self, entry: dict, error: FatalFhirError) -> None:
        ref = entry["request"]["url"]
        self._reject(ref, describe(error), error)
        log.warning("rejected %s: HTTP %s", ref, error.status)

    def _record(self, entries: list[dict], answered: list) -> None:
        """Count what the transaction-response says was written (`answered`: its entries, one per entry sent)."""
        for entry, answer in zip(entries, answered):
            response_ = answer.get("response") if isinstance(answer, dict) else None
            status = response_.get("status") if isinstance(response_, dict) else None
            if not isinstance(status, str) or status[:1] != "2":
                # A transaction is all or nothing (FHIR R4 §3.1.0.11.2), so a non-2xx answer inside a 200 is odd:
                # the entry is not counted as written.
                outcome = response_.get("outcome") if isinstance(response_, dict) else None
                code = int(status[:3]) if isinstance(status, str) and status[:3].isdigit() else None
                self._refused(entry, FatalFhirError(f"entry answered {shown(status)}", status=code, outcome=outcome))
                continue
            self.report.written[entry["resource"]["resourceType"]] += 1
            self.report.outcomes[status] += 1


def load_files(
    client: FhirClient, paths: Iterable[str], batch_size: int = 200, run_dir: str | Path | None = None, workers: int = 1
) -> LoadReport:
    """Load the files (see Loader); raises LoadStopped, with the report so far, when the load ends early."""
    return Loader(client, batch_size, run_dir, workers).load(paths)


def print_report(report: LoadReport, out=None) -> None:
    out = out or sys.stdout
    read, written = sum(report.read.values()), sum(report.written.values())
    print(f"read {read} resources, wrote {written}, rejected {len(report.rejected)}", file=out)
    for rtype in sorted(report.read, key=_rank):
        print(f"  {rtype:<28} read {report.read[rtype]:>7}  written {report.written[rtype]:>7}", file=out)
    if report.outcomes:
        print("  server answers: " + ", ".join(f"{k} ×{v}" for k, v in sorted(report.outcomes.items())), file=out)
    for ref, reason in report.rejected[:SHOWN_REJECTED]:
        print(f"  REJECTED {ref}: {reason}", file=out)
    if len(report.rejected) > SHOWN_REJECTED:
        print(f"  ... and {len(report.rejected) - SHOWN_REJECTED} more rejected", file=out)
    if report.rejects_path is not None:
        print(
            f"  every reject, with the server's full reasons (may quote patient data): {report.rejects_path}", file=out
        )
    if report.stopped:
        print(f"  stopped: {report.stopped}", file=out)
        print(
            "  (loading the same files again is safe: resources keep their ids, and unchanged ones stay as they are)",
            file=out,
        )


def run_load(client: FhirClient, args) -> int:
    """`leukofhir load` on a client: load, print the report (also of a load that stopped), return the exit code."""
    from leukofhir.errors import EXIT_INCOMPLETE, EXIT_OK, exit_code

    try:
        report = load_files(
            client, args.files, args.batch_size, getattr(args, "out", None), getattr(args, "workers", 1)
        )
    except LoadStopped as stop:
        print_report(stop.report)
        print(f"leukofhir load: error: {stop}", file=sys.stderr)
        return exit_code(stop)
    print_report(report)
    # Partial success is still worth a non-zero exit: a script loading test data must notice a refusal.
    return EXIT_OK if report.ok else EXIT_INCOMPLETE


def load_command(args) -> int:
    from leukofhir.fhir.client import connect

    # An input that does not exist is a UsageError while the input is spooled, before the server is ever asked.
    with connect(args.fhir_url, args.auth, timeout=args.timeout) as client:
        return run_load(client, args)
