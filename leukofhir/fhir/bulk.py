"""Bulk Data `$export` (FHIR Bulk Data Access IG 2.0): kick-off, polling within a cap, streaming NDJSON downloads,
resumable from the status URL after a crash, the job deleted when done."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import requests

from leukofhir.errors import UsageError
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.errors import FatalFhirError, FhirError, InvalidResponseError, outcome_text
from leukofhir.fhir.http import retry_after_seconds
from leukofhir.fhir.ids import is_resource_type, is_valid_id
from leukofhir.fhir.urls import redact_url

log = logging.getLogger(__name__)

NDJSON = "application/fhir+ndjson"
STATE_FILE = "export.state"  # JSON, but named so `leukofhir evaluate DIR` never reads it as data
ERRORS_FILE = "export-errors.log"  # the manifest's error OperationOutcomes, one per line (may quote data)
# Bodies that are not NDJSON: a server ignoring our Accept header answers with the Binary resource or a page.
_NOT_NDJSON = ("application/fhir+json", "application/json", "text/html")
_CHUNK = 1 << 20


class BulkExportError(FhirError):
    """The export job failed, timed out, or produced something unusable; the message says what and where."""


@dataclass(frozen=True)
class ExportRequest:
    """What to export: `level` system, patient (`Patient/$export`) or group (`Group/[id]/$export`)."""

    level: str = "system"
    group_id: str | None = None
    types: tuple[str, ...] = ()
    since: str | None = None
    type_filters: tuple[str, ...] = ()

    def __post_init__(self):
        if self.level not in ("system", "patient", "group"):
            raise UsageError(f"unknown export level {self.level!r} (system, patient or group)")
        if (self.level == "group") != bool(self.group_id):
            raise UsageError("a group export needs a group id, and only a group export takes one")
        if self.group_id and not is_valid_id(self.group_id):
            raise UsageError(f"group id {self.group_id!r} is not a FHIR id ([A-Za-z0-9-.]{{1,64}})")
        if self.since is not None:
            try:
                moment = datetime.fromisoformat(self.since.replace("Z", "+00:00"))
            except ValueError:
                raise UsageError(f"--since {self.since!r} is not an ISO 8601 instant") from None
            if moment.tzinfo is None:
                raise UsageError(f"--since {self.since!r} needs a time zone (e.g. 2024-05-01T00:00:00Z)")
        for rtype in self.types:
            if not is_resource_type(rtype):
                raise UsageError(f"{rtype!r} is not a FHIR resource type")
        for type_filter in self.type_filters:
            if not is_resource_type(type_filter.split("?", 1)[0]) or "?" not in type_filter:
                raise UsageError(f"type filter {type_filter!r} is not Type?search (e.g. Observation?code=…)")

    @property
    def path(self) -> str:
        return {"system": "$export", "patient": "Patient/$export"}.get(self.level) or f"Group/{self.group_id}/$export"

    def params(self) -> list[tuple[str, str]]:
        params = [("_outputFormat", NDJSON)]
        if self.types:
            params.append(("_type", ",".join(self.types)))
        if self.since:
            params.append(("_since", self.since))
        params.extend(("_typeFilter", f) for f in self.type_filters)
        return params

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class ExportResult:
    """What an export wrote: NDJSON files, resources per type, error outcomes, the server's transactionTime
    (the `--since` of the next incremental export)."""

    out_dir: Path
    files: list[Path] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    errors: int = 0
    error_codes: Counter = field(default_factory=Counter)
    transaction_time: str | None = None
    resumed: bool = False


class BulkExport:
    """One export into `out_dir`. Polls at growing intervals (1, 2, 4 … s, never more than `max_interval`),
    taking a shorter Retry-After when the server gives one: HAPI answers `Retry-After: 120` for jobs done in
    seconds, so the server's value is honoured only within that cap. Gives up after `max_wait` seconds,
    leaving the status URL in `out_dir/export.state` so the same command resumes the job."""

    def __init__(
        self,
        client: FhirClient,
        out_dir: str | os.PathLike,
        *,
        max_interval: float = 60.0,
        max_wait: float = 6 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        reuse_complete: bool = False,
        on_file: Callable[[Path], None] | None = None,
    ):
        self.client = client
        self.out_dir = Path(out_dir)
        self.max_interval = max_interval
        self.max_wait = max_wait
        self._clock = clock
        self._sleep = sleep or client.sleep
        # A pipeline's task run again keeps a finished export of the same request (`leukofhir export` run again
        # starts a new one: fresh data). `on_file(path)`: told of each file saved in out_dir (state, downloads), so a
        # caller can copy it away at once (to object storage) and a crash keeps what was done.
        self.reuse_complete = reuse_complete
        self.on_file = on_file

    # --- the whole job --------------------------------------------------------------------------------

    def run(self, request: ExportRequest) -> ExportResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        result = ExportResult(self.out_dir)
        if (
            self.reuse_complete
            and state
            and state.get("request") == request.as_dict()
            and state.get("complete")
            and all((self.out_dir / name).exists() for name in state.get("done") or {})
        ):
            log.info("the export in %s is complete already: kept", self.out_dir)
            result.resumed = True
            for name, lines in sorted(state["done"].items()):
                result.files.append(self.out_dir / name)
                result.counts[name.split(".", 1)[0]] += lines
            result.transaction_time = (state.get("manifest") or {}).get("transactionTime")
            return result
        if state and state.get("request") == request.as_dict() and not state.get("complete"):
            result.resumed = True
            log.info("resuming the export job at %s", redact_url(state["status_url"]))
            try:
                manifest = self.poll(state["status_url"])
            except FatalFhirError as exc:
                if exc.status not in (404, 410):
                    raise
                log.warning(
                    "the export job at %s is gone (HTTP %s); starting a new one",
                    redact_url(state["status_url"]),
                    exc.status,
                )
                state = self._start(request, state)
                manifest = self.poll(state["status_url"])
        else:
            state = self._start(request, state)
            manifest = self.poll(state["status_url"])
        state["manifest"] = manifest
        self._save_state(state)
        self._download_all(manifest, state, result)
        self._delete_job(state["status_url"])
        state["complete"] = True
        self._save_state(state)
        result.transaction_time = manifest.get("transactionTime")
        return result

    def _start(self, request: ExportRequest, previous: dict | None) -> dict:
        self._remove_outputs(previous)
        state = {"request": request.as_dict(), "status_url": self.kick_off(request), "done": {}}
        self._save_state(state)
        return state

    # --- kick-off and polling -------------------------------------------------------------------------

    def kick_off(self, request: ExportRequest) -> str:
        """Start the job; its status URL (Bulk Data IG: 202 Accepted with Content-Location)."""
        response = self.client.request(
            "GET",
            request.path,
            params=request.params(),
            headers={"Accept": "application/fhir+json", "Prefer": "respond-async"},
        )
        location = response.headers.get("Content-Location")
        response.close()
        if response.status_code != 202 or not location:
            raise BulkExportError(
                f"$export kick-off at {redact_url(self.client.url(request.path))} answered HTTP "
                f"{response.status_code}" + ("" if location else " without a Content-Location"),
                status=response.status_code,
            )
        log.info("export job started: %s", redact_url(location))
        return location

    def poll_interval(self, polls: int, retry_after: str | None) -> float:
        """The wait before the next poll: 1, 2, 4 … s up to `max_interval`, or the server's shorter Retry-After."""
        interval = min(2.0**polls, self.max_interval)
        asked = retry_after_seconds(retry_after)
        return interval if asked is None else min(asked, interval)

    def poll(self, status_url: str) -> dict:
        """Poll until the manifest (200); each 202 logs the server's X-Progress."""
        started, polls = self._clock(), 0
        shown = redact_url(status_url)
        while True:
            response = self.client.request("GET", status_url, headers={"Accept": "application/json"})
            if response.status_code == 200:
                return self._check_manifest(self.client.decode(response), shown)
            if response.status_code != 202:
                raise BulkExportError(
                    f"export status {shown}: unexpected HTTP {response.status_code}",
                    status=response.status_code,
                    url=shown,
                )
            wait = self.poll_interval(polls, response.headers.get("Retry-After"))
            log.info(
                "export in progress (%s); next poll in %.0fs (server asked %s)",
                response.headers.get("X-Progress") or "no X-Progress",
                wait,
                response.headers.get("Retry-After") or "nothing",
            )
            response.close()
            if self._clock() - started + wait > self.max_wait:
                raise BulkExportError(
                    f"export not finished after {self.max_wait:.0f}s; the same command resumes it from {shown}",
                    url=shown,
                )
            self._sleep(wait)
            polls += 1

    @staticmethod
    def _check_manifest(manifest: dict, shown: str) -> dict:
        outputs, errors = manifest.get("output"), manifest.get("error", [])
        if (
            not isinstance(outputs, list)
            or not isinstance(errors, list)
            or not all(isinstance(o, dict) and isinstance(o.get("url"), str) for o in outputs + errors)
        ):
            raise BulkExportError(f"export status {shown}: the manifest has no usable output list", url=shown)
        for o in outputs:
            if not is_resource_type(str(o.get("type"))):
                raise BulkExportError(
                    f"export status {shown}: output type {o.get('type')!r} is not a resource type", url=shown
                )
        return manifest

    # --- downloads ------------------------------------------------------------------------------------

    def _download_all(self, manifest: dict, state: dict, result: ExportResult) -> None:
        requires_token = manifest.get("requiresAccessToken", True) is not False
        per_type: Counter = Counter()
        for output in manifest["output"]:
            rtype = output["type"]
            name = f"{rtype}.{per_type[rtype]:03d}.ndjson"
            per_type[rtype] += 1
            path = self.out_dir / name
            if name in state["done"] and path.exists():
                lines = state["done"][name]
            else:
                lines = self.download(output["url"], path, requires_token)
                expected = output.get("count")
                if isinstance(expected, int) and expected != lines:
                    raise BulkExportError(f"{name}: {lines} resources downloaded, the manifest says {expected}")
                if self.on_file is not None:
                    self.on_file(path)
                state["done"][name] = lines
                self._save_state(state)
            result.files.append(path)
            result.counts[rtype] += lines
        self._download_errors(manifest.get("error") or [], requires_token, result)

    def download(self, url: str, path: Path, requires_token: bool = True) -> int:
        """Stream one NDJSON file to `path` (through `path.part`, renamed when whole); its number of lines.
        The token goes only where the manifest says it is needed (and only to the server's own origin)."""
        shown = redact_url(url)
        for attempt in range(self.client.max_retries + 1):
            response = self.client.request(
                "GET", url, headers={"Accept": NDJSON}, stream=True, authenticate=requires_token
            )
            kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind in _NOT_NDJSON:
                response.close()
                raise InvalidResponseError(f"GET {shown}: the file came as {kind}, not NDJSON", url=shown)
            part = path.with_name(path.name + ".part")
            lines, last = 0, b"\n"
            try:
                with open(part, "wb") as fh:
                    for chunk in response.iter_content(_CHUNK):
                        if chunk:
                            fh.write(chunk)
                            lines += chunk.count(b"\n")
                            last = chunk[-1:]
                    if last != b"\n":  # a last line without its newline is still a line
                        fh.write(b"\n")
                        lines += 1
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                part.unlink(missing_ok=True)
                if attempt == self.client.max_retries:
                    raise BulkExportError(
                        f"GET {shown}: download cut off {attempt + 1} times ({type(exc).__name__})", url=shown
                    ) from None
                log.warning(
                    "GET %s: download cut off (%s); retry %d of %d",
                    shown,
                    type(exc).__name__,
                    attempt + 1,
                    self.client.max_retries,
                )
                continue
            finally:
                response.close()
            os.replace(part, path)
            log.info(
                "%s: %d resources%s",
                path.name,
                lines,
                " (gzip)" if "gzip" in response.headers.get("Content-Encoding", "") else "",
            )
            return lines
        raise AssertionError("unreachable")

    def _download_errors(self, errors: list[dict], requires_token: bool, result: ExportResult) -> None:
        """The manifest's error files (OperationOutcomes) go to one log file; counted by issue code on screen."""
        path = self.out_dir / ERRORS_FILE
        path.unlink(missing_ok=True)
        if not errors:
            return
        part = self.out_dir / (ERRORS_FILE + ".download")
        with open(path, "wb") as out:
            for error in errors:
                self.download(error["url"], part, requires_token)
                with open(part, "rb") as fh:
                    for line in fh:
                        if not line.strip():
                            continue
                        out.write(line if line.endswith(b"\n") else line + b"\n")
                        result.errors += 1
                        try:
                            outcome = json.loads(line)
                        except ValueError:
                            result.error_codes["unreadable"] += 1
                            continue
                        for issue in (outcome.get("issue") or []) if isinstance(outcome, dict) else []:
                            result.error_codes[str(issue.get("code", "?"))] += 1
                        log.debug("export error: %s", outcome_text(outcome))
        part.unlink(missing_ok=True)
        if self.on_file is not None:
            self.on_file(path)

    def _delete_job(self, status_url: str) -> None:
        """Bulk Data IG: DELETE on the status URL tells the server the files may go. HAPI answers 404 for a
        finished job ("already cancelled or has completed"): nothing left to do, so not an error."""
        try:
            self.client.request("DELETE", status_url).close()
            log.info("export job deleted: %s", redact_url(status_url))
        except FatalFhirError as exc:
            if exc.status in (404, 410):
                log.info("export job %s: already released by the server", redact_url(status_url))
            else:
                log.warning("could not delete the export job %s: %s", redact_url(status_url), exc)

    # --- state, for resuming --------------------------------------------------------------------------

    def _load_state(self) -> dict | None:
        path = self.out_dir / STATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("%s is unreadable; starting a new export", path)
            return None
        return state if isinstance(state, dict) and isinstance(state.get("status_url"), str) else None

    def _save_state(self, state: dict) -> None:
        path = self.out_dir / STATE_FILE
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps(state, indent=1), encoding="utf-8")
        os.replace(part, path)
        if self.on_file is not None:
            self.on_file(path)

    def _remove_outputs(self, previous: dict | None) -> None:
        """A new export replaces the files of the previous one in the same folder (only those it wrote)."""
        for name in (previous or {}).get("done") or {}:
            if "/" not in name and name.endswith(".ndjson"):
                (self.out_dir / name).unlink(missing_ok=True)
        (self.out_dir / ERRORS_FILE).unlink(missing_ok=True)


def export(client: FhirClient, out_dir: str | os.PathLike, request: ExportRequest, **options) -> ExportResult:
    """Run (or resume) one Bulk Data export of `request` into `out_dir`."""
    return BulkExport(client, out_dir, **options).run(request)
