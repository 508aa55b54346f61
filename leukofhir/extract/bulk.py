"""Extract by Bulk Data `$export`, for large backfills: the window's export names the touched patients; an export of
the rules' resources without dates holds their whole histories, which are split by patient into the run's chunks.

Why a second export without dates, not a Group or `patient=`: the window only chooses the patients, each is judged on
their whole history (clinical-rules §4 "Convergence"), and the window's export holds only what is dated in the
window. A `Group/[id]/$export` would need a Group of the touched patients written to the hospital's server first (a
write outside the project's own Flags and Device, which many servers do not allow clients, e.g. Epic's groups are
defined by the site), and `Patient/$export?patient=` is optional in the Bulk Data IG (HAPI 8.8 takes it only by POST).
A system-level export of the rules' resources is what every Bulk Data server offers; `auto` chooses it only for long
windows, where the touched patients are most of those with blood counts, so little is exported in vain. Both
exports go into the run folder with their status URLs (export.state): a task that dies in the middle resumes the same
jobs (fhir/bulk.py) instead of starting over.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Callable
from urllib.parse import urlencode

from leukofhir.config import Rules
from leukofhir.errors import UsageError
from leukofhir.extract.reader import iter_located
from leukofhir.extract.run_folder import start_run
from leukofhir.extract.search import (
    Subjects,
    Window,
    ben_codes,
    deleted_subjects,
    local_patient_id,
    medication_types,
    observation_codes,
    project_flag_tag,
    subject_of,
    window_searches,
)
from leukofhir.fhir.bulk import ExportRequest, export
from leukofhir.fhir.capabilities import check_capabilities, missing_capabilities
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.ids import is_valid_id
from leukofhir.normalise.context import LocalBases
from leukofhir.normalise.exposures import medication_key

__all__ = [
    "EXTRACT_MODES",
    "EXPORT_MIN_RANGE",
    "choose_extract",
    "window_export",
    "history_export",
    "run_exports",
    "split_export",
    "STAGED_BY_EXPORT",
]

log = logging.getLogger(__name__)

EXTRACT_MODES = ("search", "export", "auto")
# `auto` exports a window of a year or more: past that, most patients with blood counts are touched anyway, and one
# export of everything beats a few searches per hundred patients (docs/airflow.md, "Backfill through $export").
EXPORT_MIN_RANGE = timedelta(days=365)
EXPORT_DIR = "export"
STAGED_BY_EXPORT = "export"  # patients.json `staged_by`: the chunk was staged by split_export, not by searches
SPLIT_DONE = "split.json"  # written once every chunk is staged: a retried split keeps them
_INCLUDED = "Medication"  # no subject: staged with each chunk whose medication resources reference it


def choose_extract(client: FhirClient, window: Window | None, requested: str) -> str:
    """`search` or `export` for a run: `export` only for a window (a list of patients is searched), and for `auto` only
    when the server declares a system-level `$export` and the window spans EXPORT_MIN_RANGE or more."""
    if requested not in EXTRACT_MODES:
        raise UsageError(f"extract {requested!r} must be one of {', '.join(EXTRACT_MODES)}")
    if requested == "search" or window is None:
        return "search"
    if requested == "export":
        check_capabilities(client, need_export="system", resource_types=[], write_flags=False)
        return "export"
    span = window.until - window.since
    if span < EXPORT_MIN_RANGE:
        log.info("extract auto: the window spans %s, under %s: search", span, EXPORT_MIN_RANGE)
        return "search"
    missing = missing_capabilities(client.capabilities(), need_export="system", resource_types=[], write_flags=False)
    if missing:
        log.info("extract auto: the server does not declare a system-level $export: search")
        return "search"
    log.info("extract auto: a window of %s on a server with $export: export", span)
    return "export"


def _type_filter(resource_type: str, params: dict) -> str:
    """A search as a `_typeFilter` value (`Type?query`); the Bulk Data IG URL-encodes its values like any query."""
    return f"{resource_type}?" + urlencode(params, doseq=True, safe="|,:/")


def window_export(rules: Rules, window: Window) -> ExportRequest:
    """The resources dated (or changed) in the window: the same searches search.touched_patients makes, as filters,
    so the server selects the same resources either way; plus, by `_lastUpdated`, the Patients changed in it."""
    searches = window_searches(window, rules)
    if window.field == "lastUpdated":
        searches.append(
            ("Patient", {"_lastUpdated": [f"ge{window.as_dict()['since']}", f"lt{window.as_dict()['until']}"]})
        )
    types = tuple(dict.fromkeys(t for t, _ in searches))
    return ExportRequest(types=types, type_filters=tuple(_type_filter(t, p) for t, p in searches))


def history_export(rules: Rules) -> ExportRequest:
    """Everyone's whole history of what the rules read (the searches of search.history_searches, without the
    patients): the in-scope results and the panel Observations holding results as members, every DiagnosticReport,
    the medication resources and Medications, the BEN Conditions, the Patients, and the project's Flags."""
    types = ["Observation", "DiagnosticReport", *medication_types(rules), _INCLUDED, "Patient", "Flag"]
    filters = [
        _type_filter("Observation", {"code": observation_codes(rules)}),
        # A panel's results may be its members (the HL7 panel style): every panel Observation comes along.
        "Observation?has-member:missing=false",
        _type_filter("Flag", {"_tag": project_flag_tag(rules)}),
    ]
    if rules.ben.codes:
        types.append("Condition")
        filters.append(_type_filter("Condition", {"code": ben_codes(rules)}))
    return ExportRequest(types=tuple(types), type_filters=tuple(filters))


def run_exports(
    client: FhirClient,
    rules: Rules,
    folder: Path,
    window: Window,
    *,
    on_file: Callable[[Path], None] | None = None,
    max_wait: float = 6 * 3600.0,
    concurrent: bool = True,
) -> dict:
    """The window's export into folder/window, the histories' into folder/history. An export already complete there is
    kept; one begun is resumed from its status URL. `on_file(path)` is told of every file saved (a task copies it
    to object storage at once, so a crash keeps it). Returns resources exported per export and type.

    `concurrent`: both jobs at once (threads on the one client). Each job spends most of its time waiting (the
    server's job steps, the polls' back-off, the downloads), so two at once keep the server busier; measured on
    PostgreSQL in docs/speed-and-memory.md. A job that fails does not stop the other: its status URL is kept
    either way, and the first failure is raised once both have ended."""
    jobs = (("window", window_export(rules, window)), ("history", history_export(rules)))

    def one(name: str, request: ExportRequest):
        return export(client, Path(folder) / name, request, max_wait=max_wait, reuse_complete=True, on_file=on_file)

    if concurrent:
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="export") as pool:
            futures = [pool.submit(one, name, request) for name, request in jobs]
        failures = [f.exception() for f in futures if f.exception() is not None]
        if failures:
            raise failures[0]
        results = [f.result() for f in futures]
    else:
        results = [one(name, request) for name, request in jobs]
    counts = {}
    for (name, _), result in zip(jobs, results):
        if result.errors:
            log.warning(
                "the %s export: the server reported %d errors (%s); see %s",
                name,
                result.errors,
                ", ".join(f"{c} x{n}" for c, n in sorted(result.error_codes.items())),
                Path(folder) / name / "export-errors.log",
            )
        counts[name] = dict(sorted(result.counts.items()))
        log.info(
            "%s export%s: %s",
            name,
            " (resumed)" if result.resumed else "",
            ", ".join(f"{t} {n}" for t, n in counts[name].items()) or "nothing",
        )
    return counts


def _exported(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.ndjson"))


def _touched(folder: Path, rules: Rules, window: Window, base_url: str, client: FhirClient | None) -> list[str]:
    """The touched patients of search.touched_patients, from the window's export: the subjects of what it holds,
    the Patients changed in a `_lastUpdated` window, and the subjects of results deleted since it began."""
    subjects = Subjects(base_url)
    for resource, *_ in iter_located(_exported(folder / "window"), _unreadable):
        if resource["resourceType"] != "Patient":
            subjects.add(resource)
        elif is_valid_id(resource.get("id")):
            subjects.ids.add(resource["id"])
    if window.field == "lastUpdated":
        if client is None:
            raise UsageError("a _lastUpdated window needs the server, for the results deleted in it")
        # The export holds no deletions: the types' history lists them (as the searching path finds them).
        for resource_type in ["Observation", *medication_types(rules)]:
            for reference in deleted_subjects(client, resource_type, window.since):
                subjects.add_reference(reference)
    subjects.warn_unusable()
    return sorted(subjects.ids)


def _unreadable(error) -> None:
    # The server's own NDJSON: a line that cannot be read is the export's fault, and the run must not go on without it.
    raise UsageError(f"the export holds a line that cannot be read: {error}")


def split_export(
    folder: Path,
    run_dir: Path,
    server: str,
    rules: Rules,
    window: Window,
    *,
    chunks: int = 1,
    dry_run: bool = False,
    client: FhirClient | None = None,
    keep_export: bool = False,
) -> list[Path]:
    """The touched patients (from the window's export), cut into `chunks` as find_patients does, and each chunk's
    whole history staged from the histories' export as one NDJSON file (chunks/NNNNN/staged/batch-00001.ndjson,
    which evaluate_chunk partitions when it is large). A Medication goes with every chunk that references it. The
    exports are removed once every chunk is staged, unless `keep_export`; a split already done is kept."""
    run_dir = Path(run_dir)
    done = run_dir / "chunks" / SPLIT_DONE
    if done.exists():
        log.info("the export was split into chunks already: kept")
        return sorted(p for p in (run_dir / "chunks").iterdir() if p.is_dir())
    if (run_dir / "chunks").exists():
        shutil.rmtree(run_dir / "chunks")
    ids = _touched(folder, rules, window, server, client)
    chunk_dirs = start_run(
        run_dir,
        server,
        ids,
        window=window,
        patients_given=False,
        chunks=chunks,
        dry_run=dry_run,
        extract="export",
        staged_by=STAGED_BY_EXPORT,
    )
    chunk_of = {
        pid: n
        for n, chunk in enumerate(chunk_dirs)
        for pid in json.loads((chunk / "patients.json").read_text(encoding="utf-8"))["patients"]
    }
    counts = _stage(folder / "history", chunk_dirs, chunk_of, server)
    for chunk, staged in zip(chunk_dirs, counts):
        log.info(
            "chunk %s: staged %s", chunk.name, ", ".join(f"{t} {n}" for t, n in sorted(staged.items())) or "nothing"
        )
    (run_dir / "chunks").mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"chunks": len(chunk_dirs), "patients": len(ids)}) + "\n", encoding="utf-8")
    if not keep_export:
        shutil.rmtree(folder, ignore_errors=True)  # a copy of the server's data, every resource of it now staged
    return chunk_dirs


def _stage(history: Path, chunk_dirs: list[Path], chunk_of: dict[str, int], server: str) -> list[Counter]:
    """Each resource of a touched patient into its chunk's staged file, as the server wrote it; then each Medication
    into the chunks whose medication resources reference it. Others' resources are left out."""
    counts = [Counter() for _ in chunk_dirs]
    wanted: dict[str, set[int]] = defaultdict(set)  # "Medication/x" -> chunks that reference it
    parts = [chunk / "staged" / "batch-00001.ndjson.part" for chunk in chunk_dirs]
    for part in parts:
        part.parent.mkdir(parents=True, exist_ok=True)
    files = _exported(history)
    bases = LocalBases(server)
    outs = [open(part, "wb") for part in parts]
    try:
        for path in files:
            if path.name.startswith(_INCLUDED + "."):
                continue
            for resource, _, _, _, raw in iter_located([path], _unreadable, raw=True):
                kind = resource["resourceType"]
                pid = resource.get("id") if kind == "Patient" else local_patient_id(subject_of(resource), server)
                chunk = chunk_of.get(pid) if isinstance(pid, str) else None
                if chunk is None:
                    continue
                outs[chunk].write(raw if raw.endswith(b"\n") else raw + b"\n")
                counts[chunk][kind] += 1
                medication = resource.get("medicationReference")
                if isinstance(medication, dict):
                    key = medication_key(bases, medication.get("reference"))
                    if key is not None:
                        wanted[key].add(chunk)
        for path in files:
            if not path.name.startswith(_INCLUDED + "."):
                continue
            for resource, _, _, _, raw in iter_located([path], _unreadable, raw=True):
                for chunk in sorted(wanted.get(f"{_INCLUDED}/{resource.get('id')}", ())):
                    outs[chunk].write(raw if raw.endswith(b"\n") else raw + b"\n")
                    counts[chunk][_INCLUDED] += 1
    finally:
        for out in outs:
            out.close()
    for part in parts:
        part.replace(part.with_name(part.name.removesuffix(".part")))  # a staged file exists once it is complete
    return counts
