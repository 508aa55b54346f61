"""The DAG files: fast to import, touching no database, connection or network at parse time; shaped as DESIGN.md
says."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import pytest
from conftest import ROOT

DAG_FILES = sorted((ROOT / "dags").glob("*.py"))

# Run in a fresh interpreter: an audit hook refuses any socket connection and any SQLite database opened, and no
# database or FHIR connection is configured; the import of each DAG file is timed beyond Airflow's own.
_PROBE = r"""
import json, sys, time, importlib.util
touched = []
def guard(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "sqlite3.connect"):
        touched.append(event)
        raise RuntimeError(f"{event} at DAG parse time")
sys.addaudithook(guard)
start = time.perf_counter()
import airflow.sdk
airflow_s = time.perf_counter() - start
out = {}
for path in sys.argv[1:]:
    start = time.perf_counter()
    spec = importlib.util.spec_from_file_location(path.replace("/", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out[path] = time.perf_counter() - start
heavy = [m for m in ("pandas", "great_expectations", "fhir.resources", "requests", "numpy", "leukofhir.run",
                     "leukofhir.fhir.client") if m in sys.modules]
print(json.dumps({"airflow": airflow_s, "dags": out, "heavy": heavy, "touched": touched}))
"""


def test_every_dag_file_imports_fast_and_touches_nothing(tmp_path):
    assert {p.stem for p in DAG_FILES} >= {"leukopenia_surveillance", "leukopenia_backfill", "leukopenia_patients"}
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        # A database that cannot exist, and proxies that go nowhere: any use at parse time fails loudly.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/no/such/dir/airflow.db",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *map(str, DAG_FILES)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["touched"] == []
    # Only Airflow's task SDK: the pipeline (pandas, GX, the FHIR client) is imported by the tasks, at run time.
    assert result["heavy"] == []
    for path, seconds in result["dags"].items():
        assert seconds < 1.0, f"{path} took {seconds:.2f} s to import beyond Airflow's own {result['airflow']:.2f} s"


@pytest.fixture(scope="module")
def dags(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    # Built afresh, as Airflow's parser builds them: another test module may have changed the cached DAG objects.
    for name in [m for m in sys.modules if m.startswith("leukofhir.airflow.dags.")]:
        del sys.modules[name]
    bag = DagBag(str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags


def test_surveillance_dag_windows_its_data_interval_one_run_at_a_time(dags):
    dag = dags["leukopenia_surveillance"]
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert [t.task_id for t in dag.topological_sort()] == [
        "find_patients",
        "extract",
        "evaluate",
        "check_contract",
        "write_flags",
        "report",
        "refresh_board",
    ]
    board = dag.get_task("refresh_board")
    assert board.trigger_rule == "all_done" and board.upstream_task_ids == {"write_flags"}  # even after a stop
    assert dag.get_task("report").downstream_task_ids == set()  # a leaf: the run fails when its report says so


def test_backfill_dag_has_the_params_of_the_design(dags):
    dag = dags["leukopenia_backfill"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # manual only
    assert set(dag.params) == {"start", "end", "window_field", "chunks", "patients", "dry_run", "extract"}
    assert dag.params["window_field"] == "effective" and dag.params["dry_run"] is False
    assert dag.params["extract"] == "search"  # $export only when asked for (or auto)
    assert [t.task_id for t in dag.topological_sort()] == [
        "bulk_export",
        "find_patients",
        "extract",
        "evaluate",
        "check_contract",
        "write_flags",
        "report",
    ]


@pytest.mark.parametrize("dag_id", ["leukopenia_surveillance", "leukopenia_backfill"])
def test_tasks_that_talk_to_the_server_share_the_pool_and_all_retry_with_backoff(dags, dag_id):
    tasks = {t.task_id: t for t in dags[dag_id].tasks}
    talking = {"find_patients", "extract", "write_flags"} | (
        {"bulk_export"} if dag_id == "leukopenia_backfill" else {"refresh_board"}
    )
    assert {tid for tid, t in tasks.items() if t.pool == "fhir_server"} == talking
    for t in tasks.values():
        # The export only polls the server's job: hours for a large backfill, so a longer (still bounded) time-out.
        limit = timedelta(hours=12) if t.task_id == "bulk_export" else timedelta(hours=2)
        assert t.retries >= 2 and t.retry_exponential_backoff and t.execution_timeout <= limit
    # Each chunk's extract → evaluate → write is a dynamically mapped task, so many workers share a backfill.
    assert all(tasks[tid].is_mapped for tid in ("extract", "evaluate", "write_flags"))
    # Between them one barrier over every chunk: no chunk writes before the contract was judged on the whole run.
    barrier = tasks["check_contract"]
    assert not barrier.is_mapped
    assert (barrier.upstream_task_ids, barrier.downstream_task_ids) == ({"evaluate"}, {"write_flags"})


def test_patients_dag_is_one_task_triggered_with_patients_and_running_at_once(dags):
    dag = dags["leukopenia_patients"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # triggered by the receiver, never scheduled
    assert dag.is_paused_upon_creation is False  # runs from the receiver must not wait for someone to unpause it
    assert set(dag.params) == {"patients"}
    (task,) = dag.tasks  # one task: measured faster than the five-task chain (docs/near-real-time.md)
    assert task.task_id == "process_patients" and task.pool == "fhir_server"
    assert task.retries >= 2 and task.retry_exponential_backoff
    assert task.execution_timeout <= timedelta(minutes=30)


@pytest.mark.parametrize(
    "patients, valid",
    [
        (["Patient/p1", "p2", "Patient/a-b.c"], True),
        ([], False),  # a run for nobody
        (["Patient/a b"], False),  # not FHIR ids: refused when the run is triggered, not inside the task
        (["Patient/x?_id=y"], False),
        (["Patient/.."], False),  # dot-segments: `Patient/..` in a URL is the server's base
        (["."], False),
        (["Observation/o1"], False),
        ("Patient/p1", False),
    ],
)
def test_patients_dag_param_takes_fhir_patient_ids_only(dags, patients, valid):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    def validated():
        params = ParamsDict(dags["leukopenia_patients"].params)
        params["patients"] = patients  # checked against the Param's schema, as a triggered run's conf is
        return params.validate()["patients"]

    if valid:
        assert validated() == patients
    else:
        with pytest.raises(ParamValidationError):
            validated()
