"""Leukopenia surveillance, hospital-wide: every hour, the patients whose blood counts, reports, medications or
Patient record changed in the data interval (`_lastUpdated`) are re-evaluated on their whole history, and their
Flags on the FHIR server converge. Once a day, the run whose interval holds 00:00 UTC (LEUKOFHIR_LAPSE_SWEEP_HOUR)
also re-evaluates the patients whose active Flags have had no count for longer than the lapse (clinical-rules v1.3 §4:
their data does not change, so no window touches them). Every run then refreshes the hospital-wide board
(<runs root>/board/board.html). Missed intervals: `airflow backfill create --dag-id leukopenia_surveillance`."""

import os
from datetime import datetime, timezone

from airflow.sdk import CronDataIntervalTimetable, Param, dag

from leukofhir.airflow.tasks import (
    DEFAULT_ARGS,
    check_contract,
    evaluate,
    extract,
    find_patients,
    refresh_board,
    report,
    write_flags,
)

# Hourly by default; a site sets its own cron in the environment (read at parse time: no I/O).
SCHEDULE = os.environ.get("LEUKOFHIR_SURVEILLANCE_CRON", "0 * * * *")


@dag(
    dag_id="leukopenia_surveillance",
    schedule=CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        "chunks": Param(1, type="integer", minimum=1, description="groups of patients handled by parallel tasks"),
        "dry_run": Param(False, type="boolean", description="write nothing; report what would be written"),
        # Only for a manual run without a data interval (Airflow 3 API runs with logical_date null).
        "start": Param(None, type=["null", "string"], description="window start when the run has no data interval"),
        "end": Param(None, type=["null", "string"], description="window end when the run has no data interval"),
    },
    tags=["leukofhir"],
    doc_md=__doc__,
)
def leukopenia_surveillance():
    chunks = find_patients(window_field="lastUpdated", lapse_sweep=True)
    evaluated = evaluate.expand(chunk=extract.expand(chunk=chunks))
    # No chunk writes before the data contract was judged on the whole run (a barrier over every chunk).
    written = write_flags.expand(chunk=check_contract(evaluated))
    # Both after the writes, both leaves: a failed run stays failed however the board fares.
    written >> [report(), refresh_board()]


surveillance = leukopenia_surveillance()
