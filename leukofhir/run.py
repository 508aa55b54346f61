"""The online pipeline: a window (or a list of patients) on a FHIR server → Flags written back (`leukofhir run`).

Every step works in a run folder, so the Airflow tasks can run them one by one, and on other machines:

    find_patients  → run.json, chunks/NNNN/patients.json
    extract_chunk  → chunks/NNNN/staged/batch-NNNNN.ndjson         (extract/search.py: the server's pages, as they came)
    evaluate_chunk → chunks/NNNN/evaluated/batch-NNNNN/             (pipeline.evaluate_files: the offline stages)
    judge_contract → contract.json                                  (every chunk evaluated: the data contract on the
                                                                     whole run's totals, before any chunk writes)
    write_chunk    → chunks/NNNN/writes.json, rejects.ndjson        (write/flags.py: diff, then versioned PUTs)
    finish_run     → report.json, report.html, quarantine.ndjson, rejects.ndjson (for a failed run too)
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Iterator

from leukofhir.config import Rules
from leukofhir.errors import LeukofhirError, UsageError
from leukofhir.evaluate.pipeline import evaluate_files
from leukofhir.evaluate.stages import progress_bar
from leukofhir.evaluate.summary import merge_reports, write_counts
from leukofhir.evaluate.validate import ValidationThresholdError, check_contract, merge_contract
from leukofhir.extract.reader import iter_resources
from leukofhir.extract.run_folder import CONTRACT_FILE, chunk_dirs, run_start, start_run
from leukofhir.extract.search import (
    Window,
    changed_patients,
    local_patient_id,
    medication_types,
    parse_instant,
    patient_batches,
    read_patient_list,
    read_time,
    stage_batch,
    touched_patients,
)
from leukofhir.extract.sweep import lapse_candidates
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.ids import is_valid_id, shown
from leukofhir.report.html import write_report_html
from leukofhir.write.alerts import critical_subjects, sync_alerts
from leukofhir.write.flags import Plan, ensure_author, plan_writes, write_plan, write_rejects

__all__ = [
    "BATCH_SIZE",
    "find_patients",
    "extract_chunk",
    "evaluate_chunk",
    "judge_contract",
    "write_chunk",
    "finish_run",
    "run_pipeline",
    "default_run_dir",
]

log = logging.getLogger(__name__)

BATCH_SIZE = 100  # patients per set of searches: a bounded page of history in memory, queries of a few KB


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


def _check_patient_ids(patients: list[str]) -> list[str]:
    ids = [p.removeprefix("Patient/") for p in patients]
    bad = [p for p in ids if not is_valid_id(p)]
    if bad:
        raise UsageError(f"not FHIR patient ids: {', '.join(shown(b) for b in bad[:5])}")
    return sorted(set(ids))


def find_patients(
    client: FhirClient,
    rules: Rules,
    run_dir: Path,
    *,
    window: Window | None = None,
    patients: list[str] | None = None,
    sweep: bool = False,
    chunks: int = 1,
    chunk_size: int | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> list[Path]:
    """Step 1: the touched patients (of the window, or the list given), and with `sweep` the lapse sweep's candidates
    (leukofhir.extract.sweep: the patients whose active project Flags may have lapsed as of the run's start), split into
    `chunks` folders (or into folders of `chunk_size` patients). `now`: the run's start, the time it evaluates as of
    (default: the clock; tests give another)."""
    if window is not None and patients is not None:
        raise UsageError("give either a window or a list of patients")
    if window is None and patients is None and not sweep:
        raise UsageError("give a window, a list of patients or the lapse sweep")
    if chunks < 1 or (chunk_size is not None and chunk_size < 1):
        raise UsageError("chunks and the chunk size must be at least 1")
    run_dir = Path(run_dir)
    if (run_dir / "chunks").exists():
        shutil.rmtree(run_dir / "chunks")  # a retried task starts its run folder over
    started = run_start(now)
    if patients is not None:
        ids = _check_patient_ids(patients)
    else:
        ids = touched_patients(client, window, rules) if window is not None else []
    swept = None
    if sweep:
        found = lapse_candidates(client, rules, started)
        added = sorted(set(found.patients) - set(ids))
        swept = {"candidates": len(found.patients), "flags_read": found.flags_read, "added": len(added)}
        ids = sorted([*ids, *added])
    return start_run(
        run_dir,
        client.base_url,
        ids,
        window=window,
        patients_given=patients is not None,
        chunks=chunks,
        chunk_size=chunk_size,
        dry_run=dry_run,
        started=started,
        sweep=swept,
    )


def _staged(chunk_dir: Path) -> list[Path]:
    folder = chunk_dir / "staged"
    return sorted(folder.glob("batch-*.ndjson")) if folder.exists() else []


def extract_chunk(client: FhirClient, rules: Rules, chunk_dir: Path, batch_size: int = BATCH_SIZE) -> dict:
    """Step 2: each batch of the chunk's patients, whole history, staged as NDJSON. Returns counts by type. A chunk
    staged from a Bulk Data export (extract.bulk.split_export) is left as it is."""
    chunk_dir = Path(chunk_dir)
    listing = json.loads((chunk_dir / "patients.json").read_text(encoding="utf-8"))
    if listing.get("staged_by") == "export":
        log.info("chunk %s: staged from the export already", chunk_dir.name)
        return {}
    patients = listing["patients"]
    totals: dict[str, int] = {}
    for number, batch in enumerate(patient_batches(patients, batch_size), start=1):
        counts = stage_batch(client, batch, rules, chunk_dir / "staged" / f"batch-{number:05d}.ndjson")
        log.info(
            "chunk %s batch %d: %d patients, staged %s",
            chunk_dir.name,
            number,
            len(batch),
            ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing",
        )
        for kind, n in counts.items():
            totals[kind] = totals.get(kind, 0) + n
    return totals


def _evaluated(chunk_dir: Path, staged: Path) -> Path:
    return chunk_dir / "evaluated" / staged.name.removesuffix(".ndjson")


def evaluate_chunk(rules: Rules, chunk_dir: Path, *, memory_budget=None, workers: int = 1) -> dict:
    """Step 3: the offline stages (normalise → validate → evaluate → Flags) on each staged batch, partitioned by
    patient when it is larger than the memory budget (leukofhir.evaluate.partition). A batch never fails on its data:
    failing rows are quarantined and counted for the contract, judged on the whole run (judge_contract). Returns the
    desired Flag count and the quarantined count."""
    chunk_dir = Path(chunk_dir)
    # References to the server the pages came from are local; another server's are quarantined (§1.1 subject).
    meta = json.loads((chunk_dir.parent.parent / "run.json").read_text(encoding="utf-8"))
    desired = quarantined = 0
    for staged in _staged(chunk_dir):
        # As of the run's start, so that an open episode without a count for too long lapses (v1.3 §4).
        report = evaluate_files(
            [staged],
            _evaluated(chunk_dir, staged),
            config=rules,
            progress=False,
            base_url=meta["server"],
            memory_budget=memory_budget,
            workers=workers,
            run_time=meta["started"],
        )
        desired += report["flags"]["total"]
        quarantined += sum(report["quarantined"].values())
    return {"flags_desired": desired, "quarantined": quarantined}


def evaluation_reports(chunk_dir) -> list[dict]:
    """The report of every staged batch of a chunk (a local path or an ObjectStoragePath); UnevaluatedError for a
    staged batch that has none."""
    staged = chunk_dir / "staged"
    names = (
        sorted(p.name for p in staged.iterdir() if p.name.startswith("batch-") and p.name.endswith(".ndjson"))
        if staged.exists()
        else []
    )
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
    scopes = merge_contract(
        report.get("contract") for chunk in chunk_dirs(run_dir) for report in evaluation_reports(chunk)
    )
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
    dry run), each naming the version it was decided from; the patients of a write refused because that version
    moved are read and evaluated again (write.flags.write_plan). Returns the counts by action; refused writes go to the
    chunk's rejects.ndjson. The staged pages are removed once written (they are a copy of the server's data, every
    resource read) unless `keep_staged`. When it fails (the server gone), writes.json still says what was written
    before, and why it stopped (`error`)."""
    chunk_dir = Path(chunk_dir)
    rejects = chunk_dir / "rejects.ndjson"
    rejects.unlink(missing_ok=True)
    meta = json.loads((chunk_dir.parent.parent / "run.json").read_text(encoding="utf-8"))
    # Data changed after this is taken as unread when a batch's own read time is not known (UNKNOWN_READ_MARGIN).
    unknown_read = parse_instant(meta["started"]) - UNKNOWN_READ_MARGIN
    counts: Counter = Counter()
    written: Counter = Counter()  # every write made so far, the batch being written included
    author_ready = dry_run
    critical: set[str] = set()  # the patients with a grade-4 Flag, wanted or on the server (leukofhir.write.alerts)
    try:
        for staged in _staged(chunk_dir):
            plan = _plan_batch(rules, staged, _evaluated(chunk_dir, staged))
            critical |= critical_subjects((d.flag for d in plan.decisions if d.flag), rules)
            if dry_run or not plan.changes:
                counts.update(plan.counts())
                continue
            if not author_ready:
                ensure_author(client, rules)
                author_ready = True
            before = Counter(written)
            try:
                done = write_plan(
                    client,
                    plan,
                    _decide_again(client, rules, chunk_dir / "redecided" / staged.stem, meta),
                    changed=_changed_since(client, rules, meta["server"], unknown_read),
                    written=written,
                )
            except Exception:
                counts.update(written - before)  # this batch's writes so far: nothing else of it is known
                raise
            counts.update(done.counts)
            counts["reevaluated"] += done.reevaluated
            if done.refused:
                write_rejects(rejects, done.refused)
        if critical and not dry_run and rules.alerts.communication_requests:
            if not author_ready:
                ensure_author(client, rules)  # the requests' requester
            counts.update(sync_alerts(client, rules, sorted(critical)))
    except Exception as exc:
        _save_writes(chunk_dir, counts, error=f"{type(exc).__name__}: {exc}")
        raise
    _save_writes(chunk_dir, counts)
    if not keep_staged:
        shutil.rmtree(chunk_dir / "staged", ignore_errors=True)
        shutil.rmtree(chunk_dir / "redecided", ignore_errors=True)
    return dict(counts)


def _save_writes(chunk_dir: Path, counts: Counter, error: str | None = None) -> None:
    """writes.json: the chunk's write counts; with `error` when it stopped before the end (it is then not written,
    and what it holds was written before it stopped)."""
    body = {**counts, **({"error": error} if error else {})}
    (chunk_dir / "writes.json").write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _plan_batch(rules: Rules, staged: Path, evaluated: Path) -> Plan:
    """The batch's desired Flags (its evaluation) against the project's Flags in its staged pages."""
    desired = list(_flags_in(evaluated / "Flag.ndjson"))
    report = json.loads((evaluated / "report.json").read_text(encoding="utf-8"))
    # A Flag the Flag suite refused is not "no longer wanted", nor one whose evidence this run quarantined (held): its
    # Flag on the server stays as it is, whatever this run would want for its identifier.
    keep = {*(report.get("flags_rejected_identifiers") or []), *(report.get("flags_held_identifiers") or [])}
    desired = [f for f in desired if not _identifier_in(f, keep)]
    existing = [f for f in _flags_in(staged) if not _identifier_in(f, keep)]
    plan = plan_writes(desired, existing, rules)
    plan.read_at = read_time(staged)
    return plan


# When a batch's read time is not known (staged from a Bulk Data export), the data is taken as read this long before
# the run started: a change in between only costs reading those patients again, and the margin covers a client
# clock ahead of the server's.
UNKNOWN_READ_MARGIN = timedelta(minutes=10)


def _changed_since(client: FhirClient, rules: Rules, server: str, fallback: datetime):
    """write_plan's `changed`: the subjects whose data changed on the server since their plan's data was read."""

    def changed(subjects: list[str], read_at: datetime | None) -> set[str]:
        ids = {pid: s for s in subjects if (pid := local_patient_id(s, server)) is not None}
        moved = changed_patients(client, rules, sorted(ids), read_at or fallback)
        return {ids[pid] for pid in moved}

    return changed


def _decide_again(client: FhirClient, rules: Rules, folder: Path, meta: dict):
    """write_plan's `redecide`: the patients named are read again from the server, whole history, as extract reads
    them (into `folder`/round-N), evaluated again as the batch was (`meta`: the run's run.json), and their Flags
    compared again with the versions just read.

    No data-contract threshold here: the batch's data was judged when it was first evaluated, and a rate over the
    few rows of the patients read again says nothing about a feed; their bad rows are quarantined as ever (in the
    round's folder)."""
    rounds = itertools.count(1)
    server = meta["server"]

    def redecide(subjects: list[str]) -> Plan:
        here = folder / f"round-{next(rounds)}"
        patients = sorted({pid for s in subjects if (pid := local_patient_id(s, server)) is not None})
        staged = here / "staged.ndjson"
        stage_batch(client, patients, rules, staged)
        evaluate_files(
            [staged], here / "evaluated", config=rules, progress=False, base_url=server, run_time=meta["started"]
        )
        return _plan_batch(rules, staged, here / "evaluated")

    return redecide


def _identifier_in(flag: dict, values: set[str]) -> bool:
    return bool(values) and any(isinstance(i, dict) and i.get("value") in values for i in flag.get("identifier") or [])


def finish_run(run_dir: Path, seconds: dict | None = None, error: str | None = None) -> dict:
    """Step 5: one report.json / report.html / quarantine.ndjson / rejects.ndjson for the whole run; `seconds`,
    the time each step took, when one process ran them all. Also for a run that stopped (`error`, or a chunk that
    says it failed or was never written): `status` is then `failed`, with the `error`, the write counts hold what
    was written before it stopped, and `patients_not_written` the patients of the chunks not written."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    chunks = chunk_dirs(run_dir) if (run_dir / "chunks").exists() else []
    evaluated = [
        d for chunk in chunks for d in sorted((chunk / "evaluated").glob("batch-*")) if (d / "report.json").exists()
    ]  # a batch whose evaluation did not finish has none
    report = merge_reports(json.loads((d / "report.json").read_text(encoding="utf-8")) for d in evaluated)
    writes = {
        c: json.loads((c / "writes.json").read_text(encoding="utf-8")) for c in chunks if (c / "writes.json").exists()
    }
    unwritten = [c for c in chunks if c not in writes or "error" in writes[c]]
    error = error or next((w["error"] for w in writes.values() if "error" in w), None)
    if error is None and unwritten:
        error = f"{len(unwritten)} of {len(chunks)} chunk(s) not written"
    verdict = run_dir / CONTRACT_FILE
    report = {
        "server": meta["server"],
        "window": meta["window"],
        "sweep": meta.get("sweep"),
        "extract": meta.get("extract", "search"),
        "as_of": meta["started"],
        "dry_run": meta["dry_run"],
        "status": "failed" if error else "done",
        **({"error": error} if error else {}),
        "patients_touched": meta["patients_touched"],
        "chunks": len(chunks),
        **report,
        # The contract's verdict on the whole run (judge_contract); None when the run stopped before it was judged.
        "contract_verdict": json.loads(verdict.read_text(encoding="utf-8")) if verdict.exists() else None,
        "writes": write_counts(writes.values()),
        "chunks_written": len(chunks) - len(unwritten),
        "patients_not_written": sum(len(read_patient_list(c / "patients.json")) for c in unwritten),
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
    client: FhirClient,
    rules: Rules,
    run_dir: Path,
    *,
    window: Window | None = None,
    patients: list[str] | None = None,
    lapse_sweep: bool = False,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    progress: bool = False,
    keep_staged: bool = False,
    now: datetime | None = None,
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
    under evaluate), so with the overlap they add up to more than `total`. `lapse_sweep` adds the lapse sweep's
    patients (find_patients); `now`, the run's start, is for tests (the command line has no such option)."""
    run_dir = Path(run_dir)
    if batch_size < 1:
        raise UsageError("the batch size must be at least 1")
    seconds = dict.fromkeys(("find", "extract", "evaluate", "write"), 0.0)
    started = time.perf_counter()
    # One chunk per batch, so memory is bounded by the batch (two at most: one evaluated while the next is staged).
    chunks = find_patients(
        client,
        rules,
        run_dir,
        window=window,
        patients=patients,
        sweep=lapse_sweep,
        chunk_size=batch_size,
        dry_run=dry_run,
        now=now,
    )
    seconds["find"] = time.perf_counter() - started
    sizes = [len(read_patient_list(c / "patients.json")) for c in chunks]
    bar = progress_bar("evaluating", progress and sum(sizes) > 0, total=sum(sizes), unit=" patients", unit_scale=False)

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
                timed("evaluate", partial(evaluate_chunk, rules, chunk))
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
            timed("write", partial(write_chunk, client, rules, chunk, dry_run=dry_run, keep_staged=keep_staged))
            if bar is not None:
                bar.update(sizes[number])
    finally:
        if bar is not None:
            bar.close()
    seconds["total"] = time.perf_counter() - started
    return finish_run(run_dir, seconds)


def check_server(
    client: FhirClient, rules: Rules, *, window: Window | None = None, dry_run: bool = False, extract: str = "search"
) -> None:
    """Before anything is read or written: the server declares every search (or the export), history and write the
    run needs."""
    from leukofhir.fhir.capabilities import check_capabilities

    history = ["Observation", *medication_types(rules)] if window is not None and window.field == "lastUpdated" else []
    if extract == "export":
        check_capabilities(
            client, need_export="system", resource_types=["Flag"], write_flags=not dry_run, history_types=history
        )
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
        + (f", in conflict {writes['conflict']}" if writes.get("conflict") else "")
        + f"; {sum(report['quarantined'].values())} resources quarantined"
        + (
            f"; lapse sweep: {sweep['added']} patients added ({sweep['candidates']} whose active Flags may have "
            f"lapsed, of {sweep['flags_read']} active Flags read)"
            if (sweep := report.get("sweep"))
            else ""
        )
        + f"; report: {run_dir / 'report.html'}"
    )


def written_before(report: dict) -> str:
    """What a failed run had written when it stopped, in words."""
    writes = report["writes"]
    return (
        f"written before it stopped: Flags created {writes['create']}, updated {writes['update']}, withdrawn "
        f"{writes['withdraw']}; {report['chunks_written']} of {report['chunks']} batches done, "
        f"{report['patients_not_written']} patients not written"
    )


def failed_report(run_dir: Path, exc: Exception) -> dict | None:
    """The report of a run that stopped on `exc` (None when it stopped before its run folder was made)."""
    if not (Path(run_dir) / "run.json").exists():
        return None
    return finish_run(run_dir, error=f"{type(exc).__name__}: {exc}")


def run_command(args) -> int:
    """`leukofhir run`: the whole pipeline against a server; prints one summary line; the CLI's exit codes."""
    from leukofhir.config import load_config
    from leukofhir.errors import EXIT_DATA, EXIT_INCOMPLETE, EXIT_OK, exit_code
    from leukofhir.fhir.client import connect
    from leukofhir.fhir.errors import FhirError

    rules = load_config(args.config)
    patients = [p.strip() for p in args.patients.split(",") if p.strip()] if args.patients else None
    if patients is not None and (args.since or args.until):
        raise UsageError("give either --since/--until or --patients, not both")
    sweep_alone = args.lapse_sweep and not (args.since or args.until)
    window = (
        None
        if patients is not None or sweep_alone
        else Window.parse(args.since or _missing("--since"), args.until or _missing("--until"), args.window_field)
    )
    run_dir = Path(args.out) if args.out else default_run_dir()
    try:
        with connect(args.fhir_url, args.auth, timeout=args.timeout) as client:
            check_server(client, rules, window=window, dry_run=args.dry_run)
            report = run_pipeline(
                client,
                rules,
                run_dir,
                window=window,
                patients=patients,
                lapse_sweep=args.lapse_sweep,
                dry_run=args.dry_run,
                batch_size=args.batch_size,
                progress=True,
                keep_staged=args.keep_staged,
            )
    except (ValidationThresholdError, FhirError) as exc:
        failed = failed_report(run_dir, exc)
        # Every write names the version it was decided from, and a re-run writes only what is still missing.
        after = (
            ""
            if failed is None
            else (f"; {written_before(failed)}; re-running is safe; report: {run_dir / 'report.html'}")
        )
        if isinstance(exc, ValidationThresholdError):
            print(
                f"leukofhir run: the data failed its contract, nothing written: {exc}"
                + (after or f" (run folder {run_dir})"),
                file=sys.stderr,
            )
            return EXIT_DATA
        if failed is None:
            print(f"leukofhir run: the FHIR server cannot be used: {exc} (run folder {run_dir})", file=sys.stderr)
        else:
            print(f"leukofhir run: the FHIR server failed during the run: {exc}{after}", file=sys.stderr)
        return exit_code(exc)  # 3 for refused credentials, 4 for anything else the server did
    print(summary_line(report, run_dir))
    writes = report["writes"]
    return EXIT_INCOMPLETE if writes["refused"] or writes["conflict"] else EXIT_OK


def _missing(flag: str):
    raise UsageError(f"{flag} is required (or give --patients, or --lapse-sweep alone)")
