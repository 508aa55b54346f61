"""End to end with a real scheduler: a CLI backfill of the surveillance DAG over three hourly intervals, and the
backfill DAG triggered through the REST API with conf; both reach success and their Flags are on the server.
(The surveillance DAG runs on minute intervals here; hourly is its default.)"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from support.fhir_builders import at, days_ago, observation, patient
from support.server_data import project_flags, put, server_now

pytestmark = [pytest.mark.fhir, pytest.mark.airflow_server]


@pytest.fixture(scope="module", autouse=True)
def backfill_unpaused(airflow):
    airflow.unpause("leukopenia_backfill")


def test_cli_backfill_of_the_surveillance_dag_over_three_intervals(airflow, fhir_client, unique):
    pid = f"e2e-s-{unique}"
    # A count of yesterday: the runs evaluate as of their own time, and a count older than 90 days would have lapsed.
    put(fhir_client, patient(pid), observation(f"{pid}-w", "wbc", 2.2, time=days_ago(1), patient=f"Patient/{pid}"))
    minute = server_now(fhir_client).replace(second=0, microsecond=0)
    # Three complete data intervals, the last one holding the write above: wait for it to end.
    time.sleep(max(0.0, (minute + timedelta(minutes=1, seconds=2) - datetime.now(timezone.utc)).total_seconds()))
    # Created while the DAG is paused (its runs wait, as the README says), then the DAG is unpaused. SQLite: a write
    # that loses a race with the scheduler's is refused at once ("database is locked"); the command is tried again.
    for _ in range(5):
        done = airflow.cli(
            "backfill",
            "create",
            "--dag-id",
            "leukopenia_surveillance",
            "--from-date",
            (minute - timedelta(minutes=2)).isoformat(),
            "--to-date",
            minute.isoformat(),
        )
        if "database is locked" not in done.stderr:
            break
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    airflow.unpause("leukopenia_surveillance")
    runs = airflow.wait_for_runs("leukopenia_surveillance", 3, run_type="backfill")
    assert len(runs) == 3 and {r["state"] for r in runs} == {"success"}
    starts = sorted(r["data_interval_start"] for r in runs)
    assert starts[-1].startswith(minute.strftime("%Y-%m-%dT%H:%M:00"))
    (flag,) = project_flags(fhir_client, [pid])
    assert flag["status"] == "active" and flag["code"]["coding"][0]["code"] == "84828003"


def test_backfill_dag_triggered_through_the_rest_api_with_conf(airflow, fhir_client, unique):
    pids = [f"e2e-b{n}-{unique}" for n in range(3)]
    put(
        fhir_client,
        *(patient(p) for p in pids),
        *(observation(f"{p}-a", "anc", 0.3, time=at(days=-400), patient=f"Patient/{p}") for p in pids),
    )
    run_id = f"e2e-{unique}"
    answer = airflow.api(
        "POST",
        "dags/leukopenia_backfill/dagRuns",
        json={
            "dag_run_id": run_id,
            "logical_date": None,
            "conf": {"start": at(days=-401)[:10], "end": at(days=-399)[:10], "window_field": "effective", "chunks": 2},
        },
    )
    assert answer.status_code in (200, 201), answer.text
    (run,) = airflow.wait_for_runs("leukopenia_backfill", 1, dag_run_id=run_id)
    assert run["state"] == "success"
    tasks = airflow.api("GET", f"dags/leukopenia_backfill/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    assert {t["state"] for t in tasks} == {"success"}
    flags = project_flags(fhir_client, pids)
    assert len(flags) == 3 and {f["code"]["coding"][0]["code"] for f in flags} == {"17182001"}
