"""Leukopenia backfill, for data engineers: the patients with blood counts or medications dated (`effective`) or
changed (`lastUpdated`) between the Params `start` and `end`, or exactly the Params' `patients`, are re-evaluated on
their whole history in `chunks` parallel groups, and their Flags on the FHIR server converge. The histories come from
searches, or from the server's Bulk Data `$export` (Param `extract`: `export`, or `auto` for a long window on a
server that offers it). Trigger it from the UI, `airflow dags trigger leukopenia_backfill --conf '{...}'` or the REST
API."""

from datetime import datetime, timezone

from airflow.sdk import Param, dag

from leukofhir.airflow.tasks import (
    DEFAULT_ARGS,
    bulk_export,
    check_contract,
    evaluate,
    extract,
    find_patients,
    report,
    write_flags,
)


@dag(
    dag_id="leukopenia_backfill",
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    default_args=DEFAULT_ARGS,
    params={
        "start": Param(None, type=["null", "string"], description="window start, ISO 8601 (UTC when no zone)"),
        "end": Param(None, type=["null", "string"], description="window end (exclusive)"),
        "window_field": Param(
            "effective",
            enum=["effective", "lastUpdated"],
            description="select by clinical date (effective) or by server change (lastUpdated)",
        ),
        "chunks": Param(4, type="integer", minimum=1, description="groups of patients handled by parallel tasks"),
        "patients": Param(
            None,
            type=["null", "array"],
            items={"type": "string"},
            description="evaluate exactly these Patient ids instead of a window",
        ),
        "dry_run": Param(False, type="boolean", description="write nothing; report what would be written"),
        "extract": Param(
            "search",
            enum=["search", "export", "auto"],
            description="histories by searches, or by Bulk Data $export (auto: export when the server "
            "offers it and the window spans a year or more)",
        ),
    },
    tags=["leukofhir"],
    doc_md=__doc__,
)
def leukopenia_backfill():
    chunks = find_patients(exported=bulk_export())
    evaluated = evaluate.expand(chunk=extract.expand(chunk=chunks))
    # No chunk writes before the data contract was judged on the whole run (a barrier over every chunk).
    written = write_flags.expand(chunk=check_contract(evaluated))
    written >> report()


backfill = leukopenia_backfill()
