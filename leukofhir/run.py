"""The online pipeline: a window (or a list of patients) on a FHIR server → Flags written back (`leukofhir run`).

Every step works in a run folder, so the Airflow tasks can run them one by one, and on other machines:

    find_patients  → run.json, chunks/NNNN/patients.json
    extract_chunk  → chunks/NNNN/staged/batch-NNNNN.ndjson         (extract.py: the server's pages, as they came)
    evaluate_chunk → chunks/NNNN/evaluated/batch-NNNNN/             (pipeline.evaluate_files: the offline stages)
    judge_contract → contract.json                                  (every chunk evaluated: the data contract on the
                                                                     whole run's totals, before any chunk writes)
    write_chunk    → chunks/NNNN/writes.json, rejects.ndjson        (write.py: diff, then conditional upserts)
    finish_run     → report.json, report.html, quarantine.ndjson, rejects.ndjson
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from leukofhir.config import Rules
from leukofhir.errors import LeukofhirError, UsageError
from leukofhir.extract import (
    Window, medication_types, patient_batches, read_patient_list, stage_batch, touched_patients,
    write_patient_list,
)
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.ids import is_valid_id, shown
from leukofhir.pipeline import evaluate_files
from leukofhir.reader import iter_resources
from leukofhir.report import merge_reports, write_counts
from leukofhir.report_html import write_report_html
from leukofhir.validate import ValidationThresholdError, check_contract, merge_contract
from leukofhir.write import apply_plan, ensure_author, plan_writes, write_rejects

__all__ = [
    "BATCH_SIZE", "find_patients", "extract_chunk", "evaluate_chunk", "judge_contract", "write_chunk", "finish_run",
    "run_pipeline", "chunk_dirs", "default_run_dir",
]

log = logging.getLogger(__name__)

BATCH_SIZE = 100  # patients per set of searches: a bounded page of history in memory, queries of a few KB
CONTRACT_FILE = "contract.json"  # the verdict of judge_contract, in the run folder


class UnevaluatedError(LeukofhirError):
    """A staged batch without its evaluation: the contract cannot be judged on the whole run."""


def default_run_dir(root: str | Path = "out") -> Path:
    """A fresh folder for a run's outputs: out/run-<UTC time>, numbered if that exists already."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = Path(root) / f"run-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def chunk_dirs(run_dir) -> list:
    """The chunk folders of a run folder (a local path, or an ObjectStoragePath in the DAGs); none before
    find_patients made them, or when it found no patient."""
    folder = (Path(run_dir) if isinstance(run_dir, str) else run_dir) / "chunks"
    return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name) if folder.exists() else []


def _check_patient_ids(patients: list[str]) -> list[str]:
    ids = [p.removeprefix("Patient/") for p in patients]
    bad = [p for p in ids if not is_valid_id(p)]
    if bad:
        raise UsageError(f"not FHIR patient ids: {', '.join(shown(b) for b in bad[:5])}")
    return sorted(set(ids))


def find_patients(
    client: FhirClient, rules: Rules, run_dir: Path, *, window: Window | None = None,
    patients: list[str] | None = None, chunks: int = 1, chunk_size: int | None = None, dry_run: bool = False,
) -> list[Path]:
    """Step 1: the touched patients (of the window, or the list given), split into `chunks` folders (or into
    folders of `chunk_size` patients)."""
    if (window is None) == (patients is None):
        raise UsageError("give either a window or a list of patients")
    if chunks < 1 or (chunk_size is not None and chunk_size < 1):
        raise UsageError("chunks and the chunk size must be at least 1")
    run_dir = Path(run_dir)
    if (run_dir / "chunks").exists():
        shutil.rmtree(run_dir / "chunks")  # a retried task starts its run folder over
    ids = _check_patient_ids(patients) if patients is not None else touched_patients(client, window, rules)
    return start_run(run_dir, client.base_url, ids, window=window, patients_given=patients is not None, chunks=chunks,
                     chunk_size=chunk_size, dry_run=dry_run)


def start_run(run_dir: Path, server: str, ids: list[str], *, window: Window | None, patients_given: bool,
              chunks: int = 1, chunk_size: int | None = None, dry_run: bool = False, extract: str = "search",
              **chunk_meta) -> list[Path]:
    """run.json, and the sorted patient ids cut into contiguous chunk folders (`chunks` of them, or of `chunk_size`
    patients), each with its patients.json (and `chunk_meta`). `extract`: how the histories are read (search,
    export)."""
    log.info("%d patients touched", len(ids))
    meta = {"server": server, "dry_run": dry_run, "extract": extract,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "window": window.as_dict() if window else None, "patients_given": patients_given,
            "patients_touched": len(ids)}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    (run_dir / CONTRACT_FILE).unlink(missing_ok=True)  # a retried run is judged again
    if chunk_size:
        bounds = list(range(0, len(ids), chunk_size)) + [len(ids)]
    else:  # `chunks` contiguous slices (fewer when there are fewer patients), their sizes one apart at most
        count = min(chunks, len(ids))
        bounds = [len(ids) * n // count for n in range(count + 1)] if count else [0]
    out = []
    for number, (start, stop) in enumerate(zip(bounds, bounds[1:]), start=1):
        folder = run_dir / "chunks" / f"{number:05d}"
        write_patient_list(folder / "patients.json", ids[start:stop], **chunk_meta)
        out.append(folder)
    return out


def _staged(chunk_dir: Path) -> list[Path]:
    folder = chunk_dir / "staged"
    return sorted(folder.glob("batch-*.ndjson")) if folder.exists() else []


def extract_chunk(client: FhirClient, rules: Rules, chunk_dir: Path, batch_size: int = BATCH_SIZE) -> dict:
    """Step 2: each batch of the chunk's patients, whole history, staged as NDJSON. Returns counts by type. A chunk
    staged from a Bulk Data export (bulk_extract.split_export) is left as it is."""
    chunk_dir = Path(chunk_dir)
    listing = json.loads((chunk_dir / "patients.json").read_text(encoding="utf-8"))
    if listing.get("staged_by") == "export":
        log.info("chunk %s: staged from the export already", chunk_dir.name)
        return {}
    patients = listing["patients"]
    totals: dict[str, int] = {}
    for number, batch in enumerate(patient_batches(patients, batch_size), start=1):
        counts = stage_batch(client, batch, rules, chunk_dir / "staged" / f"batch-{number:05d}.ndjson")
        log.info("chunk %s batch %d: %d patients, staged %s", chunk_dir.name, number, len(batch),
                 ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing")
        for kind, n in counts.items():
            totals[kind] = totals.get(kind, 0) + n
    return totals


def _evaluated(chunk_dir: Path, staged: Path) -> Path:
    return chunk_dir / "evaluated" / staged.name.removesuffix(".ndjson")


def evaluate_chunk(rules: Rules, chunk_dir: Path, *, memory_budget=None, workers: int = 1) -> dict:
    """Step 3: the offline stages (normalise → validate → evaluate → Flags) on each staged batch, partitioned by
    patient when it is larger than the memory budget (leukofhir.partition). A batch never fails on its data: failing
    rows are quarantined and counted for the contract, judged on the whole run (judge_contract). Returns the desired
    Flag count and the quarantined count."""
    chunk_dir = Path(chunk_dir)
    # References to the server the pages came from are local; another server's are quarantined (§1.1 subject).
    meta = json.loads((chunk_dir.parent.parent / "run.json").read_text(encoding="utf-8"))
    desired = quarantined = 0
    for staged in _staged(chunk_dir):
        # As of the run's start, so that an open episode without a count for too long lapses (v1.3 §4).
        report = evaluate_files([staged], _evaluated(chunk_dir, staged), config=rules, progress=False,
                                base_url=meta["server"], memory_budget=memory_budget, workers=workers,
                                run_time=meta["started"])
        desired += report["flags"]["total"]
        quarantined += sum(report["quarantined"].values())
    return {"flags_desired": desired, "quarantined": quarantined}


def evaluation_reports(chunk_dir) -> list[dict]:
    """The report of every staged batch of a chunk (a local path or an ObjectStoragePath); UnevaluatedError for a
    staged batch that has none."""
    staged = chunk_dir / "staged"
    names = sorted(p.name for p in staged.iterdir() if p.name.startswith("batch-") and p.name.endswith(".ndjson")) \
        if staged.exists() else []
    reports = []
    for name in names:
        path = chunk_dir / "evaluated" / name.removesuffix(".ndjson") / "report.json"
        if not path.exists():
            raise UnevaluatedError(f"chunk {chunk_dir.name}: {name} was not evaluated; the contract cannot be judged")
        reports.append(json.loads(path.read_text(encoding="utf-8")))
    return reports


def judge_contract(rules: Rules, run_dir) -> list[dict]:
    """Step 3b, the barrier between evaluate and write: the data contract (validate.check_contract) judged on the
    whole run's totals, every evaluated batch of every chunk, before any chunk writes, so that the Flags never
    depend on how the patients were cut. The verdict goes to the run folder's contract.json (finish_run reports it);
    a systemic failure raises ValidationThresholdError. `run_dir`: a local path or an ObjectStoragePath. Returns
    the run's contract counts."""
    run_dir = Path(run_dir) if isinstance(run_dir, str) else run_dir
    scopes = merge_contract(report.get("contract") for chunk in chunk_dirs(run_dir)
                            for report in evaluation_reports(chunk))
    verdict = {"passed": True, "message": None}
    try:
        check_contract(scopes, rules.validation)
    except ValidationThresholdError as exc:
        verdict = {"passed": False, "message": str(exc)}
        raise
    finally:
        (run_dir / CONTRACT_FILE).write_text(json.dumps(verdict, indent=1) + "\n", encoding="utf-8")
    return scopes


def _flags_in(path: Path) -> Iterator[dict]:
    for item in iter_resources([path], lambda error: None):
        if item.resource.get("resourceType") == "Flag":
            yield item.resource


def write_chunk(
    client: FhirClient, rules: Rules, chunk_dir: Path, *, dry_run: bool = False, keep_staged: bool = False
) -> dict:
    """Step 4: per batch, the desired Flags against the project's Flags on the server, then the writes (none in a
    dry run). Returns the counts by action; refused writes go to the chunk's rejects.ndjson. The staged pages are
    removed once written (they are a copy of the server's data, every resource read) unless `keep_staged`."""
    chunk_dir = Path(chunk_dir)
    rejects = chunk_dir / "rejects.ndjson"
    rejects.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    author_ready = dry_run
    for staged in _staged(chunk_dir):
        evaluated = _evaluated(chunk_dir, staged)
        desired = list(_flags_in(evaluated / "Flag.ndjson"))
        report = json.loads((evaluated / "report.json").read_text(encoding="utf-8"))
        # A Flag the Flag suite refused is not "no longer wanted", nor one whose evidence this run quarantined (held):
        # its Flag on the server stays as it is, whatever this run would want for its identifier.
        keep = {*(report.get("flags_rejected_identifiers") or []), *(report.get("flags_held_identifiers") or [])}
        desired = [f for f in desired if not _identifier_in(f, keep)]
        existing = [f for f in _flags_in(staged) if not _identifier_in(f, keep)]
        plan = plan_writes(desired, existing, rules)
        for action, n in plan.counts().items():
            counts[action] = counts.get(action, 0) + n
        if dry_run or not plan.changes:
            continue
        if not author_ready:
            ensure_author(client, rules)
            author_ready = True
        result = apply_plan(client, plan.changes)
        if result.refused:
            write_rejects(rejects, result.refused)
            counts["refused"] = counts.get("refused", 0) + len(result.refused)
            for item in result.refused:  # not written after all
                counts[item["action"]] -= 1
    (chunk_dir / "writes.json").write_text(json.dumps(counts, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if not keep_staged:
        shutil.rmtree(chunk_dir / "staged", ignore_errors=True)
    return counts


def _identifier_in(flag: dict, values: set[str]) -> bool:
    return bool(values) and any(isinstance(i, dict) and i.get("value") in values for i in flag.get("identifier") or [])


def finish_run(run_dir: Path, seconds: dict | None = None) -> dict:
    """Step 5: one report.json / report.html / quarantine.ndjson / rejects.ndjson for the whole run; `seconds`,
    the time each step took, when one process ran them all."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    chunks = chunk_dirs(run_dir)
    evaluated = [d for chunk in chunks for d in sorted((chunk / "evaluated").glob("batch-*"))]
    report = merge_reports(json.loads((d / "report.json").read_text(encoding="utf-8")) for d in evaluated)
    writes = [json.loads((c / "writes.json").read_text(encoding="utf-8")) for c in chunks
              if (c / "writes.json").exists()]
    verdict = run_dir / CONTRACT_FILE
    report = {
        "server": meta["server"], "window": meta["window"], "extract": meta.get("extract", "search"),
        "as_of": meta["started"], "dry_run": meta["dry_run"],
        "patients_touched": meta["patients_touched"], "chunks": len(chunks),
        **report,
        # The contract's verdict on the whole run (judge_contract); None when the run stopped before it was judged.
        "contract_verdict": json.loads(verdict.read_text(encoding="utf-8")) if verdict.exists() else None,
        "writes": write_counts(writes),
        "chunks_written": len(writes),
        **({"seconds": {k: round(v, 3) for k, v in seconds.items()}} if seconds else {}),
    }
    _concatenate(run_dir / "quarantine.ndjson", [d / "quarantine.ndjson" for d in evaluated])
    _concatenate(run_dir / "rejects.ndjson", [c / "rejects.ndjson" for c in chunks])
    with open(run_dir / "report.json", "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, default=str)
        fh.write("\n")
    write_report_html(report, run_dir / "report.html")
    return report


def _concatenate(target: Path, parts: list[Path]) -> None:
    with open(target, "wb") as out:
        for part in parts:
            if part.exists():
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out)


def run_pipeline(
    client: FhirClient, rules: Rules, run_dir: Path, *, window: Window | None = None,
    patients: list[str] | None = None, dry_run: bool = False, batch_size: int = BATCH_SIZE,
    progress: bool = False, keep_staged: bool = False,
) -> dict:
    """The whole run in this process, one batch at a time (a chunk per batch): what `leukofhir run` does, with the
    step functions the DAG tasks call.

    Every batch is extracted and evaluated first, then the data contract is judged on the whole run's totals
    (judge_contract), then the batches are written: a systemic failure writes nothing (ValidationThresholdError, after
    the run's report is written), and the Flags never depend on how the patients were batched. The evaluations wait on
    disk, so memory stays bounded by the batch; the staged pages stay on disk until their batch is written. While a
    batch is evaluated, the next one is extracted in a second thread, so the server is kept busy: evaluating is CPU
    work here, extracting mostly waits for the server (benchmarks/pipeline_bench.py). The client is never used by both
    threads at once: the writes begin once every batch is staged. `seconds` holds each step's own time (the contract's
    under evaluate), so with the overlap they add up to more than `total`."""
    run_dir = Path(run_dir)
    if batch_size < 1:
        raise UsageError("the batch size must be at least 1")
    seconds = dict.fromkeys(("find", "extract", "evaluate", "write"), 0.0)
    started = time.perf_counter()
    # One chunk per batch, so memory is bounded by the batch (two at most: one evaluated while the next is staged).
    chunks = find_patients(client, rules, run_dir, window=window, patients=patients, chunk_size=batch_size,
                           dry_run=dry_run)
    seconds["find"] = time.perf_counter() - started
    sizes = [len(read_patient_list(c / "patients.json")) for c in chunks]
    bar = _progress(sum(sizes), progress)

    def timed(step: str, work):
        begin = time.perf_counter()
        try:
            return work()
        finally:
            seconds[step] += time.perf_counter() - begin

    def extract(chunk: Path):
        return timed("extract", lambda: extract_chunk(client, rules, chunk, batch_size))

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract") as prefetch:
            staged = prefetch.submit(extract, chunks[0]) if chunks else None
            for number, chunk in enumerate(chunks):
                staged.result()  # this batch's pages are on disk (a failed extract stops the run here)
                staged = prefetch.submit(extract, chunks[number + 1]) if number + 1 < len(chunks) else None
                timed("evaluate", lambda: evaluate_chunk(rules, chunk))
                if bar is not None:
                    bar.update(sizes[number])
        try:
            timed("evaluate", lambda: judge_contract(rules, run_dir))
        except ValidationThresholdError:
            seconds["total"] = time.perf_counter() - started
            finish_run(run_dir, seconds)  # the run folder says what was quarantined, and why nothing was written
            raise
        if bar is not None:
            bar.set_description("writing")
            bar.reset()
        for number, chunk in enumerate(chunks):
            timed("write", lambda: write_chunk(client, rules, chunk, dry_run=dry_run, keep_staged=keep_staged))
            if bar is not None:
                bar.update(sizes[number])
    finally:
        if bar is not None:
            bar.close()
    seconds["total"] = time.perf_counter() - started
    return finish_run(run_dir, seconds)


def _progress(total: int, enabled: bool):
    if enabled and total and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit=" patients", file=sys.stderr, desc="evaluating")
    return None


def check_server(client: FhirClient, rules: Rules, *, window: Window | None = None, dry_run: bool = False,
                 extract: str = "search") -> None:
    """Before anything is read or written: the server declares every search (or the export), history and write the
    run needs."""
    from leukofhir.fhir.capabilities import check_capabilities

    history = ["Observation", *medication_types(rules)] if window is not None and window.field == "lastUpdated" else []
    if extract == "export":
        check_capabilities(client, need_export="system", resource_types=["Flag"], write_flags=not dry_run,
                           history_types=history)
        return
    types = ["Observation", "DiagnosticReport", *medication_types(rules), "Patient", "Flag"]
    check_capabilities(client, resource_types=types, write_flags=not dry_run, history_types=history)


def summary_line(report: dict, run_dir: Path) -> str:
    writes = report["writes"]
    verb = "would be " if report["dry_run"] else ""
    return (
        f"{report['patients_touched']} patients touched; Flags {verb}created {writes['create']}, "
        f"{verb}updated {writes['update']}, {verb}withdrawn {writes['withdraw']}, unchanged {writes['unchanged']}"
        + (f", refused {writes['refused']}" if writes["refused"] else "")
        + (f", {report['flags_held']} left as they are (evidence quarantined)" if report.get("flags_held") else "")
        + f"; {sum(report['quarantined'].values())} resources quarantined; report: {run_dir / 'report.html'}"
    )


def run_command(args) -> int:
    """`leukofhir run`: the whole pipeline against a server; prints one summary line; the CLI's exit codes."""
    from leukofhir.cli import EXIT_DATA, EXIT_INCOMPLETE, EXIT_OK, exit_code
    from leukofhir.config import load_config
    from leukofhir.fhir.errors import FhirError

    from leukofhir.fhir.client import connect

    rules = load_config(args.config)
    patients = [p.strip() for p in args.patients.split(",") if p.strip()] if args.patients else None
    if patients is not None and (args.since or args.until):
        raise UsageError("give either --since/--until or --patients, not both")
    window = None if patients is not None else Window.parse(
        args.since or _missing("--since"), args.until or _missing("--until"), args.window_field)
    run_dir = Path(args.out) if args.out else default_run_dir()
    try:
        with connect(args.fhir_url, args.auth, timeout=args.timeout) as client:
            check_server(client, rules, window=window, dry_run=args.dry_run)
            report = run_pipeline(client, rules, run_dir, window=window, patients=patients, dry_run=args.dry_run,
                                  batch_size=args.batch_size, progress=True, keep_staged=args.keep_staged)
    except ValidationThresholdError as exc:
        print(f"leukofhir run: the data failed its contract, nothing written: {exc}; report: {run_dir / 'report.html'}",
              file=sys.stderr)
        return EXIT_DATA
    except FhirError as exc:
        print(f"leukofhir run: the FHIR server cannot be used: {exc} (run folder {run_dir})", file=sys.stderr)
        return exit_code(exc)  # 3 for refused credentials, 4 for anything else the server did
    print(summary_line(report, run_dir))
    return EXIT_INCOMPLETE if report["writes"]["refused"] else EXIT_OK


def _missing(flag: str):
    raise UsageError(f"{flag} is required (or give --patients)")
