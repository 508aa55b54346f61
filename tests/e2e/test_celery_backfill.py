"""The repository's backfill DAG on the CeleryExecutor stack of scripts/airflow-stack (Redis, PostgreSQL, two Celery
workers), against the real HAPI server behind the fault proxy: with chunks=4 its mapped tasks run on both workers, and
a worker killed with kill -9 in the middle of a run ends with its tasks retried on the other and the Flags of a clean
run on the server, none twice."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import EXTERNAL

from leukofhir.evaluate.pipeline import evaluate_files
from leukofhir.fhir.client import FhirClient
from leukofhir.write.load import load_files
from support.celery_stack import (
    HEARTBEAT_TIMEOUT,
    WORKER1,
    WORKER2,
    alive,
    kill_worker,
    reachable_folder,
    run_stack,
    stack_env,
    start_stack,
)
from support.faultproxy import Fault, FaultProxy
from support.fhir_builders import at, observation, patient
from support.server_data import flags_by_identifier, project_flags, put, server_now

pytestmark = [pytest.mark.stack, pytest.mark.fhir]

SYNTHEA_BUNDLES = sorted((EXTERNAL / "smart-generated-sample-data-R4-synthea" / "bundles").glob("*.json.gz"))
DAG = "leukopenia_backfill"
CHUNKS = 4
MAPPED = ("extract", "evaluate", "write_flags")
# extract's search of a chunk's Patients (GET, or POST _search when the id list is long): held back by the proxy, so
# that the four chunks' extracts overlap (each worker runs two tasks at a time) and a worker dies while it runs some.
PATIENT_SEARCH = r"/Patient(\?|/_search)"
# DEFAULT_ARGS of the DAGs: the first retry comes a minute after the scheduler has failed the dead worker's tasks.
RETRY_DELAY = 60


@pytest.fixture(scope="module")
def fhir_proxy(fhir_base_url):
    with FaultProxy(fhir_base_url) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def sample(fhir_base_url, tmp_path_factory):
    """The Synthea sample on the server; its patients' ids and the Flags `leukofhir evaluate --as-of T` gives on its
    files, T a run's time (clinical-rules v1.3 §4: a run evaluates as of its own time). Four more patients, so that the
    window holds enough patients for four chunks even when this module runs alone."""
    token = uuid.uuid4().hex[:8]
    with FhirClient(fhir_base_url, timeout=120) as client:
        assert load_files(client, SYNTHEA_BUNDLES, batch_size=250).ok
        for n in range(4):
            pid = f"celery-{token}-{n}"
            put(client, patient(pid), observation(f"{pid}-w", "wbc", 2.5, time=at(days=n), patient=f"Patient/{pid}"))
    ids = sorted(json.load(gzip.open(p, "rt"))["entry"][0]["resource"]["id"] for p in SYNTHEA_BUNDLES)

    def expected(as_of: str) -> dict:
        out = tmp_path_factory.mktemp("offline")
        evaluate_files(SYNTHEA_BUNDLES, out, as_of=as_of, progress=False)
        flags = flags_by_identifier([json.loads(line) for line in (out / "Flag.ndjson").read_text().splitlines()])
        assert len(flags) > 5
        return flags

    return ids, expected


@pytest.fixture(scope="module")
def stack(fhir_proxy):
    """The stack on FHIR_TEST_PORT + 11..14 (the e2e Airflow has +9 for the whole package, the receiver +10) with the
    repository's dags/ and `fhir_default` on the proxy."""
    folder = reachable_folder()
    conn = json.dumps({"conn_type": "fhir", "host": fhir_proxy.base_url, "extra": {"timeout": 120}})
    env = stack_env(11, folder, AIRFLOW_CONN_FHIR_DEFAULT=conn)
    try:
        yield start_stack(env, folder)
    finally:
        run_stack(env, "stop", timeout=300)
        shutil.rmtree(folder, ignore_errors=True)


def _backfill(stack, fhir_client) -> str:
    """A backfill over every clinical date up to tomorrow, in four chunks; its run id."""
    end = (server_now(fhir_client) + timedelta(days=1)).date().isoformat()
    return stack["api"].trigger(DAG, conf={"start": "1900-01-01", "end": end, "chunks": CHUNKS})


def _report(stack, run_id: str) -> dict:
    home = Path(stack["env"]["AIRFLOW_STACK_DIR"]) / "airflow"
    folder = home / "leukofhir-runs" / DAG / re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)
    return json.loads((folder / "report.json").read_text())


def _hold_extracts(proxy: FaultProxy, seconds: float) -> None:
    proxy.add(*[Fault("delay", seconds=seconds, path_regex=PATIENT_SEARCH) for _ in range(CHUNKS)])


def test_the_backfill_runs_its_chunks_on_both_workers(stack, fhir_proxy, fhir_client, sample):
    ids, expected = sample
    api = stack["api"]
    _hold_extracts(fhir_proxy, 8)
    run_id = _backfill(stack, fhir_client)
    assert api.wait_for_run(DAG, run_id, timeout=600) == "success"
    instances = api.task_instances(DAG, run_id)
    mapped = [ti for ti in instances if ti["task_id"] in MAPPED]
    assert len(mapped) == CHUNKS * len(MAPPED) and all(ti["state"] == "success" for ti in mapped)
    assert {ti["hostname"] for ti in mapped if ti["task_id"] == "extract"} == {WORKER1, WORKER2}
    report = _report(stack, run_id)
    assert report["chunks"] == CHUNKS and report["chunks_written"] == CHUNKS and report["reconciled"]
    assert flags_by_identifier(project_flags(fhir_client, ids)) == expected(report["as_of"])


def test_a_worker_killed_in_the_middle_of_a_backfill_leaves_the_flags_of_a_clean_run(
    stack, fhir_proxy, fhir_client, sample
):
    ids, expected = sample
    api = stack["api"]
    # The run must write the sample's Flags again: those of the clean run above are deleted first.
    for flag in project_flags(fhir_client, ids):
        fhir_client.request("DELETE", f"Flag/{flag['id']}").close()
    assert project_flags(fhir_client, ids) == []
    _hold_extracts(fhir_proxy, 60)
    run_id = _backfill(stack, fhir_client)
    running = api.running_on_both_workers(DAG, run_id, "extract", timeout=300)
    on_killed = sorted(index for index, host in running.items() if host == WORKER2)
    worker2 = kill_worker(stack["env"])

    assert api.wait_for_run(DAG, run_id, timeout=60 + HEARTBEAT_TIMEOUT + RETRY_DELAY + 480) == "success"
    final = {(ti["task_id"], ti["map_index"]): ti for ti in api.task_instances(DAG, run_id)}
    assert all(ti["state"] == "success" for key, ti in final.items() if key[0] in MAPPED)
    for index in on_killed:
        retried = final[("extract", index)]
        assert retried["hostname"] == WORKER1 and retried["try_number"] >= 2
        first = min(api.tries(DAG, run_id, "extract", index), key=lambda t: t["try_number"])
        assert first["hostname"] == WORKER2 and first["state"] != "success"
    assert alive(worker2) == []

    # The Flags of the clean run, each once (flags_by_identifier fails on two Flags with one identifier).
    flags = project_flags(fhir_client, ids)
    report = _report(stack, run_id)
    wanted = expected(report["as_of"])
    assert flags_by_identifier(flags) == wanted and len(flags) == len(wanted)
    assert report["writes"]["create"] >= len(wanted) and report["writes"]["refused"] == 0
