"""A DAG run whose FHIR server vanishes while it writes (dag.test() against the real HAPI server, through the fault
proxy): the report task, which runs whatever happened before it, writes the run's report saying what was written,
what was not and why, and fails the run with the same words."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from test_pipeline_dags import _parse, dags  # noqa: F401 - `dags` is the fixture

from support.faultproxy import Fault, FaultProxy
from support.fhir_builders import at, observation, patient
from support.server_data import project_flags, put

pytestmark = [pytest.mark.fhir, pytest.mark.dag_run]

TRANSACTION = r"/fhir/?$"


def run_folder(dag_id: str, run_id: str) -> Path:
    return Path(os.environ["AIRFLOW_HOME"]) / "leukofhir-runs" / dag_id / re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)


@pytest.fixture
def connection_through(fhir_connection):
    """Point the `fhir_default` connection at another base URL (a proxy) for one test."""

    def through(base_url: str) -> None:
        os.environ["AIRFLOW_CONN_FHIR_DEFAULT"] = json.dumps({"conn_type": "fhir", "host": base_url})

    yield through
    through(fhir_connection)


def test_the_report_of_a_backfill_whose_server_vanishes_says_what_was_written(
    dags,  # noqa: F811 - `dags`, the fixture
    connection_through,
    monkeypatch,
    fhir_base_url,
    fhir_client,
    unique,
):
    pids = [f"vanish{n}-{unique}" for n in range(6)]
    put(
        fhir_client,
        *(patient(p) for p in pids),
        *(observation(f"{p}-w", "wbc", 2.0 + n / 10, time=at(), patient=f"Patient/{p}") for n, p in enumerate(pids)),
    )
    dag = _parse()["leukopenia_backfill"]
    for task in dag.tasks:
        monkeypatch.setattr(task, "retries", 0)  # the failure itself, not Airflow's retries minutes apart
    with FaultProxy(fhir_base_url) as proxy:
        # The first chunk's transaction goes through; every try of the second chunk's loses its connection.
        proxy.add(
            Fault("delay", method="POST", path_regex=TRANSACTION),
            *[Fault("reset", method="POST", path_regex=TRANSACTION) for _ in range(5)],
        )
        connection_through(proxy.base_url)
        run = dag.test(run_conf={"patients": pids, "chunks": 2})
    assert run.state == "failed"
    folder = run_folder(dag.dag_id, run.run_id)
    report = json.loads((folder / "report.json").read_text())
    assert report["status"] == "failed" and "no answer after 5 tries" in report["error"]
    assert (report["chunks"], report["chunks_written"], report["patients_not_written"]) == (2, 1, 3)
    assert report["writes"]["create"] == 3 == len(project_flags(fhir_client, pids))
    assert "This run stopped before the end" in (folder / "report.html").read_text()
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["report"] == "failed" and states["find_patients"] == "success"


def test_a_patients_run_whose_server_vanishes_leaves_its_report(
    dags,  # noqa: F811 - `dags`, the fixture
    connection_through,
    fhir_base_url,
    monkeypatch,
    fhir_client,
    unique,
):
    pid = f"vanish-p-{unique}"
    put(fhir_client, patient(pid), observation(f"{pid}-w", "wbc", 2.0, time=at(), patient=f"Patient/{pid}"))
    dag = _parse()["leukopenia_patients"]
    for task in dag.tasks:
        monkeypatch.setattr(task, "retries", 0)
    with FaultProxy(fhir_base_url) as proxy:
        proxy.add(*[Fault("reset", method="POST", path_regex=TRANSACTION) for _ in range(5)])
        connection_through(proxy.base_url)
        run = dag.test(run_conf={"patients": [pid]})
    assert run.state == "failed"
    folder = run_folder(dag.dag_id, run.run_id)
    report = json.loads((folder / "report.json").read_text())
    assert report["status"] == "failed" and "no answer after 5 tries" in report["error"]
    assert (report["writes"]["create"], report["patients_not_written"]) == (0, 1)
    assert project_flags(fhir_client, [pid]) == []
