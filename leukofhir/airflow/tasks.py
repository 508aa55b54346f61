"""The Airflow tasks of the pipeline DAGs: each runs one step of leukofhir.run on a run folder in object storage.

Importing this module costs only Airflow's task SDK: the pipeline (pandas, Great Expectations, the FHIR client) is
imported inside the tasks, at run time, so DAG files that use it parse fast and touch nothing. XCom carries the
run folder's chunk URLs and counts, never data."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from airflow.sdk import ObjectStoragePath, Variable, get_current_context, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from leukofhir.airflow.notify import failure_notifiers

__all__ = [
    "bulk_export",
    "find_patients",
    "extract",
    "evaluate",
    "check_contract",
    "write_flags",
    "report",
    "refresh_board",
    "process_patients",
    "DEFAULT_ARGS",
    "PATIENTS_DEFAULT_ARGS",
    "FHIR_POOL",
    "BOARD_FOLDER",
]

log = logging.getLogger(__name__)

FHIR_CONN_ID = "fhir_default"
FHIR_POOL = "fhir_server"  # bounds how many tasks talk to the FHIR server at once (docs/airflow.md: create it)
# Where run folders go: Airflow Variable `leukofhir_runs` (or AIRFLOW_VAR_LEUKOFHIR_RUNS), e.g. s3://bucket/leukofhir
# with an Airflow connection; by default a folder beside AIRFLOW_HOME, for a single machine.
RUNS_VARIABLE = "leukofhir_runs"
# The hospital-wide board (leukofhir.report.board), refreshed by every surveillance run: <runs root>/board/board.html.
BOARD_FOLDER = "board"
# The memory a chunk's evaluation may give its rows (leukofhir.evaluate.partition; default there: a 2-core 4 GB worker);
# a site with larger workers sets it in the workers' environment, e.g. LEUKOFHIR_MEMORY_BUDGET=2GB.
MEMORY_BUDGET_ENV = "LEUKOFHIR_MEMORY_BUDGET"
# The hour of the day (UTC, 0-23) whose surveillance run also does the daily lapse sweep (leukofhir.extract.sweep);
# read when the run starts, so a change needs no new DAG file.
LAPSE_SWEEP_HOUR_ENV = "LEUKOFHIR_LAPSE_SWEEP_HOUR"

# The site's notifiers (leukofhir/airflow/notify.py: e-mail, Slack), told when a task has failed for good.
_NOTIFIERS = failure_notifiers()
DEFAULT_ARGS = {
    # A FHIR server restarting or a network blip must not lose an hour: retry, waiting longer each time.
    "retries": 3,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=15),
    "execution_timeout": timedelta(hours=2),
    **({"on_failure_callback": _NOTIFIERS} if _NOTIFIERS else {}),
}
# The near-real-time DAG's runs hold one receiver batch (500 patients at most, seconds of work usually): a run that
# hangs is ended long before two hours, so its pool slot and the patients' Flags are not held up that long.
PATIENTS_DEFAULT_ARGS = {**DEFAULT_ARGS, "execution_timeout": timedelta(minutes=30)}


def _runs_root() -> ObjectStoragePath:
    default = f"file://{Path(os.environ.get('AIRFLOW_HOME', '~/airflow')).expanduser()}/leukofhir-runs"
    return ObjectStoragePath(Variable.get(RUNS_VARIABLE, default=default))


def _is_local(path: ObjectStoragePath) -> bool:
    return path.protocol in ("file", "local", "")


def _copy_tree(source, target) -> None:
    """Copy a folder between a local Path and an ObjectStoragePath (either way), file by file, streaming."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_dir():
            _copy_tree(item, target / item.name)
        else:
            with item.open("rb") as src, (target / item.name).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def _push_file(local_root: Path, remote_url: str):
    """A function copying one file under `local_root` to the same place under `remote_url` (nothing when local)."""
    remote = ObjectStoragePath(remote_url)
    if _is_local(remote):
        return None

    def push(path: Path) -> None:
        target = remote / path.relative_to(local_root).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    return push


def _remove_remote(url: str) -> None:
    remote = ObjectStoragePath(url)
    if not _is_local(remote) and remote.exists():
        remote.fs.rm(remote.path, recursive=True)


@contextmanager
def _local(url: str, *, pull: bool = True, push: bool = True) -> Iterator[Path]:
    """A local folder for a run (or chunk) folder in object storage: the folder itself when storage is local;
    otherwise a temporary copy, pulled before and pushed after (so s3://... works unchanged)."""
    remote = ObjectStoragePath(url)
    if _is_local(remote):
        path = Path(remote.path)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="leukofhir-") as tmp:
        local = Path(tmp)
        if pull and remote.exists():
            _copy_tree(remote, local)
        yield local
        if push:
            _copy_tree(local, remote)


def _client():
    from leukofhir.airflow.hook import FhirHook

    return FhirHook(FHIR_CONN_ID).get_client()


def _rules():
    from leukofhir.config import load_config

    return load_config(os.environ.get("LEUKOFHIR_RULES") or None)


def _run_url(context) -> str:
    run_id = re.sub(r"[^A-Za-z0-9._-]+", "_", context["run_id"])
    return str(_runs_root() / context["dag"].dag_id / run_id)


def _window(context, window_field: str | None):
    """The window of this run: the data interval (scheduled runs and backfills of the surveillance DAG), else the
    Params `start` and `end` (manual runs, the backfill DAG); None when the Params name patients instead."""
    from leukofhir.errors import UsageError
    from leukofhir.extract.search import Window

    params = context["params"]
    field = params.get("window_field") or window_field or "lastUpdated"
    start, end = params.get("start"), params.get("end")
    if _by_interval(context, window_field):
        return Window.parse(context["data_interval_start"], context["data_interval_end"], field)
    if params.get("patients"):
        return None
    if not (start and end):
        raise UsageError("no window: this run has no data interval; give the Params start and end (or patients)")
    return Window.parse(start, end, field)


def _by_interval(context, window_field: str | None) -> bool:
    """Whether this run's window is its data interval: a scheduled run (or a backfill) of the surveillance DAG."""
    params = context["params"]
    return (
        window_field == "lastUpdated"
        and not (params.get("start") or params.get("end"))
        and context.get("data_interval_start") is not None
    )


def _sweeps(context, window) -> bool:
    """Whether this surveillance run does the daily lapse sweep: its data interval holds the sweep hour (UTC,
    LEUKOFHIR_LAPSE_SWEEP_HOUR, read now, at run time; 00:00 by default), so one run a day sweeps. A manual run with
    Params sweeps never (`leukofhir run --lapse-sweep` does it by hand)."""
    from leukofhir.extract.sweep import sweep_due, sweep_hour

    if not _by_interval(context, "lastUpdated"):
        return False
    hour = sweep_hour(os.environ.get(LAPSE_SWEEP_HOUR_ENV))
    due = sweep_due(window.since, window.until, hour)
    if due:
        log.info("lapse sweep: this run's data interval holds %02d:00 UTC", hour)
    return due


def _fail(exc: Exception):
    from leukofhir.evaluate.validate import ValidationThresholdError

    # A one-line reason in the task log instead of a traceback through the library. Data that failed its contract
    # fails the same way on every try: no retry (half an hour of them) for it.
    kind = AirflowFailException if isinstance(exc, ValidationThresholdError) else AirflowException
    raise kind(f"{type(exc).__name__}: {exc}") from None


# The export is the server's work, which this task only polls: a ten-year export of a large hospital takes hours
# (docs/bounded-memory.md, projection: 2-5 h for 10 M results). Its time-out must not end a healthy job; a retry
# resumes the same jobs from their status URLs.
EXPORT_TIMEOUT = timedelta(hours=12)


@task(pool=FHIR_POOL, execution_timeout=EXPORT_TIMEOUT)
def bulk_export(window_field: str | None = None) -> dict:
    """Param `extract`: `export` (or `auto`, when the server declares $export and the window is long) runs the Bulk
    Data exports of the window and of the histories into the run folder, resuming them after a crash; `search` (and
    a list of patients) leaves the extract to the searches of the next tasks."""
    from leukofhir.errors import LeukofhirError
    from leukofhir.extract.bulk import EXPORT_DIR, choose_extract, run_exports

    context = get_current_context()
    url = _run_url(context)
    try:
        window = _window(context, window_field)
        with _client() as client:
            mode = choose_extract(client, window, context["params"].get("extract") or "search")
            if mode == "search":
                return {"extract": "search"}
            export_url = f"{url}/{EXPORT_DIR}"
            # Each file of the export is in the run folder as soon as it is saved: a retried task resumes the job.
            with _local(export_url, push=False) as folder:
                counts = run_exports(client, _rules(), folder, window, on_file=_push_file(folder, export_url))
    except LeukofhirError as exc:
        _fail(exc)
    log.info("exported: %s", counts)
    return {"extract": "export", "export": export_url}


@task(pool=FHIR_POOL)
def find_patients(
    window_field: str | None = None, exported: dict | None = None, lapse_sweep: bool = False
) -> list[str]:
    """The touched patients of the window (or the Params' patients), cut into `chunks` folders: their URLs. After an
    export (`exported` from bulk_export), from the window's export, each chunk staged from the histories' export.
    `lapse_sweep` (the surveillance DAG): in the one run a day whose data interval holds the sweep hour, the lapse
    sweep's patients too (leukofhir.extract.sweep), evaluated and written as every touched patient."""
    from leukofhir.errors import LeukofhirError
    from leukofhir.run import check_server
    from leukofhir.run import find_patients as find

    context = get_current_context()
    params = context["params"]
    url = _run_url(context)
    by_export = bool(exported) and exported.get("extract") == "export"
    try:
        window = _window(context, window_field)
        patients = None if window is not None else list(params["patients"])
        rules, dry_run = _rules(), bool(params.get("dry_run"))
        with _client() as client, _local(url, pull=by_export) as run_dir:
            if by_export:
                from leukofhir.extract.bulk import EXPORT_DIR, split_export

                check_server(client, rules, window=window, dry_run=dry_run, extract="export")
                chunks = split_export(
                    run_dir / EXPORT_DIR,
                    run_dir,
                    client.base_url,
                    rules,
                    window,
                    chunks=int(params.get("chunks") or 1),
                    dry_run=dry_run,
                    client=client,
                )
            else:
                check_server(client, rules, window=window, dry_run=dry_run)
                chunks = find(
                    client,
                    rules,
                    run_dir,
                    window=window,
                    patients=patients,
                    sweep=lapse_sweep and _sweeps(context, window),
                    chunks=int(params.get("chunks") or 1),
                    dry_run=dry_run,
                )
        if by_export:
            _remove_remote(exported["export"])  # staged in the chunks now
    except LeukofhirError as exc:
        _fail(exc)
    log.info("run folder %s: %d chunk(s)", url, len(chunks))
    return [f"{url}/chunks/{chunk.name}" for chunk in chunks]


@task(pool=FHIR_POOL)
def extract(chunk: str) -> str:
    """Stage each batch of the chunk's patients (whole history) as NDJSON."""
    from leukofhir.errors import LeukofhirError
    from leukofhir.run import extract_chunk

    try:
        with _client() as client, _local(chunk) as chunk_dir:
            counts = extract_chunk(client, _rules(), chunk_dir)
    except LeukofhirError as exc:
        _fail(exc)
    log.info("staged: %s", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing")
    return chunk


@task
def evaluate(chunk: str) -> str:
    """Normalise, validate (Great Expectations: failing rows quarantined, counted for the contract) and evaluate each
    staged batch."""
    from leukofhir.errors import LeukofhirError
    from leukofhir.run import evaluate_chunk

    try:
        with _local(chunk) as chunk_dir:
            counts = evaluate_chunk(_rules(), chunk_dir, memory_budget=os.environ.get(MEMORY_BUDGET_ENV) or None)
    except LeukofhirError as exc:
        _fail(exc)
    log.info("Flags wanted: %d; resources quarantined: %d", counts["flags_desired"], counts["quarantined"])
    return chunk


@task
def check_contract(chunks: list[str]) -> list[str]:
    """The barrier between evaluate and write_flags: the data contract judged on the whole run's totals, every
    chunk's evaluation reports (leukofhir.run.judge_contract), before any chunk writes. A systemic failure (a
    laboratory that changed its units) fails this task, and no chunk is written; otherwise the chunks to write."""
    from leukofhir.errors import LeukofhirError
    from leukofhir.report.html import scope_name
    from leukofhir.run import judge_contract

    chunks = list(chunks)
    try:
        # Only the evaluations' small reports are read, where they are (no copy of the staged pages).
        scopes = judge_contract(_rules(), ObjectStoragePath(_run_url(get_current_context())))
    except LeukofhirError as exc:
        _fail(exc)
    failing = [f"{scope_name(s)}: {s['failed']} of {s['rows']}" for s in scopes if s["failed"]]
    log.info("data contract passed over %d chunk(s); rows failing: %s", len(chunks), "; ".join(failing[:5]) or "none")
    return chunks


@task(pool=FHIR_POOL)
def write_flags(chunk: str) -> str:
    """Diff the wanted Flags with the project's Flags on the server; write what changed (nothing in a dry run), each
    write naming the version it was decided from; the patients whose Flags moved on since extract are read and
    evaluated again here (leukofhir.write.flags.write_plan)."""
    from leukofhir.errors import LeukofhirError
    from leukofhir.run import write_chunk

    dry_run = bool(get_current_context()["params"].get("dry_run"))
    failed = None
    try:
        with _client() as client, _local(chunk) as chunk_dir:
            try:
                counts = write_chunk(client, _rules(), chunk_dir, dry_run=dry_run)
            except LeukofhirError as exc:
                failed = exc  # its writes.json says what was written before it stopped: kept with the chunk folder
    except LeukofhirError as exc:
        failed = exc
    if failed is not None:
        _fail(failed)
    staged = ObjectStoragePath(chunk) / "staged"
    if not _is_local(staged) and staged.exists():
        staged.fs.rm(staged.path, recursive=True)  # the local copy is gone already; the pushed one goes too
    log.info("Flags%s: %s", " (dry run)" if dry_run else "", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return chunk


@task(trigger_rule="all_done")
def report() -> dict:
    """One report for the whole run (report.json, report.html, quarantine.ndjson, rejects.ndjson), written even
    when a chunk failed, so the run folder says how far it got and why (`status`, `error`, what was written before
    it stopped); the task then fails for that chunk. Writes left in conflict are a warning, not a failure."""
    from leukofhir.run import finish_run, summary_line

    url = _run_url(get_current_context())
    with _local(url) as run_dir:
        done = finish_run(run_dir)
    log.info("%s", summary_line(done, Path(url)))
    _warn_conflicts(done, url)
    verdict = done["contract_verdict"]
    # What the run folder says is final: trying again would read the same folder.
    if verdict and not verdict["passed"]:
        raise AirflowFailException(
            f"the data failed its contract, no chunk written: {verdict['message']}; see {url}/report.html"
        )
    if done["status"] == "failed":
        from leukofhir.run import written_before

        raise AirflowFailException(
            f"{done['error']}; {written_before(done)}; re-running is safe; see {url}/report.html"
        )
    return {"patients_touched": done["patients_touched"], **done["writes"]}


@task(pool=FHIR_POOL, trigger_rule="all_done")
def refresh_board() -> dict:
    """The hospital-wide board from the project's Flags on the server, after the run whatever became of it (a run
    that stopped may still have written): <runs root>/board/board.html, replaced whole, one place to serve it from."""
    from leukofhir.errors import LeukofhirError
    from leukofhir.report.board import read_board, write_board

    url = str(_runs_root() / BOARD_FOLDER)
    try:
        with _client() as client:
            board = read_board(client, _rules())
        with _local(url, pull=False) as folder:
            write_board(board, folder)
    except LeukofhirError as exc:
        _fail(exc)
    log.info("board: %d project Flags, %d active: %s/board.html", board.total, board.by_status["active"], url)
    return {"flags": board.total, "active": board.by_status["active"]}


def _warn_conflicts(done: dict, url: str) -> None:
    # Another writer kept changing these Flags: what stands is its versioned write, decided from data read after the
    # version this run saw. Not a failure: the next run (or a re-run) of these patients decides them again.
    from leukofhir.write.flags import VERSION_ROUNDS

    if done["writes"].get("conflict"):
        log.warning(
            "%d Flag write(s) in conflict after %d re-evaluations; see %s/report.html",
            done["writes"]["conflict"],
            VERSION_ROUNDS,
            url,
        )


@task(pool=FHIR_POOL)
def process_patients() -> dict:
    """The Params' patients, start to end in this one task (leukofhir.run.run_pipeline: find → extract → evaluate →
    write → report in one process). For a receiver's batch of a few patients, each further task would cost a
    scheduler round and a task process start-up for seconds of work (docs/near-real-time.md)."""
    from leukofhir.errors import LeukofhirError
    from leukofhir.run import check_server, failed_report, run_pipeline, summary_line, written_before

    context = get_current_context()
    patients = list(context["params"]["patients"])
    url = _run_url(context)
    failed = None
    try:
        rules = _rules()
        with _client() as client, _local(url, pull=False) as run_dir:
            try:
                check_server(client, rules)
                done = run_pipeline(client, rules, run_dir, patients=patients)
            except LeukofhirError as exc:
                failed = exc
                done = failed_report(run_dir, exc)  # the run folder says what was written before it stopped
    except LeukofhirError as exc:
        _fail(exc)
    if failed is not None:
        if done is not None:
            log.error("%s; %s; re-running is safe; see %s/report.html", failed, written_before(done), url)
        _fail(failed)
    log.info("%s", summary_line(done, Path(url)))
    _warn_conflicts(done, url)
    return {"patients_touched": done["patients_touched"], **done["writes"], "seconds": done["seconds"]}
