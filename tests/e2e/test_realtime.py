"""The near-real-time path end to end: the real HAPI server with rest-hook Subscriptions made by `leukofhir subscribe`,
`leukofhir listen` as a process, and a real Airflow (scheduler, LocalExecutor) running the real `leukopenia_patients`
DAG. A low WBC written to the server becomes a Flag on it without any scheduled run; its recovery closes the Flag."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from support.fhir_builders import days_ago, observation, patient
from support.listen_process import ListenProcess
from support.ports import session_port
from support.server_data import project_flags, put

pytestmark = [pytest.mark.fhir, pytest.mark.airflow_server]

SECRET = "e2e-realtime-secret-0123456789"
CLI = [sys.executable, "-m", "leukofhir.cli"]


@pytest.fixture(scope="module")
def listener(airflow, fhir_base_url, tmp_path_factory):
    """The receiver with its defaults (debounce 1 s, max-wait 5 s), and the project's Subscriptions pointing at it."""
    # The hourly DAG is paused: whatever reaches the chart here came through the Subscription and the receiver.
    assert airflow.api("PATCH", "dags/leukopenia_surveillance", json={"is_paused": True}).ok
    env = dict(os.environ, LEUKOFHIR_HOOK_SECRET=SECRET, **airflow.receiver_environment())
    with ListenProcess(
        tmp_path_factory.mktemp("listen"), session_port(10), env, fhir_url=fhir_base_url, args=()
    ) as process:
        subscribe = [*CLI, "subscribe", "--fhir-url", fhir_base_url]
        done = subprocess.run(
            [*subscribe, "--endpoint", f"{process.url}/notify"], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        try:
            yield process
        finally:
            subprocess.run([*subscribe, "--remove"], env=env, capture_output=True, timeout=120)


def _wait_for_flag(fhir_client, pid: str, status: str, seconds: float = 240) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        flags = project_flags(fhir_client, [pid])
        if [f["status"] for f in flags] == [status]:
            return flags[0]
        assert time.monotonic() < deadline, f"no single {status} Flag for {pid} after {seconds:.0f} s: {flags}"
        time.sleep(0.5)


def test_a_low_wbc_becomes_a_flag_and_its_recovery_closes_it(airflow, listener, fhir_client, unique):
    pid = f"rt-{unique}"
    scheduled_before = {r["dag_run_id"] for r in airflow.runs("leukopenia_surveillance")}
    put(fhir_client, patient(pid))
    # Recent counts: the runs evaluate as of their own time, and a count older than 90 days would have lapsed.
    low, ok = days_ago(3), days_ago(1)
    put(fhir_client, observation(f"{pid}-low", "wbc", 1.6, time=low, patient=f"Patient/{pid}"))
    opened = _wait_for_flag(fhir_client, pid, "active")
    assert opened["code"]["coding"][0]["code"] == "84828003"  # leukopenia
    assert opened["period"] == {"start": low}

    put(fhir_client, observation(f"{pid}-ok", "wbc", 6.0, time=ok, patient=f"Patient/{pid}"))
    closed = _wait_for_flag(fhir_client, pid, "inactive")
    assert closed["id"] == opened["id"] and closed["identifier"] == opened["identifier"]
    assert closed["period"] == {"start": low, "end": ok}

    # Two runs of the near-real-time DAG, started by the receiver, did it; the hourly DAG ran nothing meanwhile.
    runs = [
        r
        for r in airflow.wait_for_runs("leukopenia_patients", 2, seconds=120)
        if f"Patient/{pid}" in r["conf"]["patients"]
    ]
    assert len(runs) == 2 and {r["state"] for r in runs} == {"success"}
    assert all(r["dag_run_id"].startswith("leukofhir_realtime__") and r["run_type"] == "manual" for r in runs)
    assert {r["dag_run_id"] for r in airflow.runs("leukopenia_surveillance")} == scheduled_before
