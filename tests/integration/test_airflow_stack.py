"""`scripts/airflow-stack`: a real CeleryExecutor stack runs mapped tasks on both workers and survives a killed one."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from support.celery_stack import (
    HEARTBEAT_TIMEOUT,
    WORKER1,
    WORKER2,
    alive,
    kill_worker,
    reachable_folder,
    run_stack,
    stack_env,
    stack_processes,
    start_stack,
)

pytestmark = pytest.mark.stack


DAGS = '''
"""Test DAGs of test_airflow_stack.py: mapped tasks in the fhir_server pool."""
import time
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import dag, task

RELEASE = Path({release!r})
START = pendulum.datetime(2026, 1, 1, tz="UTC")


@dag(schedule=None, start_date=START, catchup=False)
def stack_spread():
    @task(pool="fhir_server")
    def work(i: int) -> int:
        time.sleep(4)
        return i

    @task
    def total(values) -> int:
        return sum(values)

    total(work.expand(i=list(range(8))))


@dag(schedule=None, start_date=START, catchup=False)
def stack_kill():
    @task(pool="fhir_server", retries=2, retry_delay=timedelta(seconds=2))
    def hold(i: int) -> int:
        # Runs until the test releases it (bounded, so a broken test cannot hold a worker for ever).
        deadline = time.monotonic() + 300
        while not RELEASE.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        return i

    @task
    def total(values) -> int:
        return sum(values)

    total(hold.expand(i=[0, 1, 2, 3]))


stack_spread()
stack_kill()
'''


@pytest.fixture(scope="module")
def stack():
    """The stack on FHIR_TEST_PORT + 1..4, state and DAGs in a temporary folder; stopped and removed after."""
    folder = reachable_folder()
    (folder / "dags").mkdir()
    (folder / "dags" / "stack_test_dags.py").write_text(DAGS.format(release=str(folder / "release")))
    env = stack_env(1, folder, AIRFLOW_STACK_DAGS_FOLDER=str(folder / "dags"))
    try:
        yield start_stack(env, folder)
    finally:
        run_stack(env, "stop", timeout=300)
        shutil.rmtree(folder, ignore_errors=True)


def _pid(stack, part: str) -> int:
    return int((stack["folder"] / "stack" / "run" / f"{part}.pid").read_text().split()[0])


@pytest.fixture
def instance():
    """The environment of a stack instance that is not started, on FHIR_TEST_PORT + 5 ... + 8."""
    folder = reachable_folder()
    env = dict(
        os.environ,
        AIRFLOW_STACK_PORT=str(int(os.environ.get("FHIR_TEST_PORT", "8181")) + 5),
        AIRFLOW_STACK_DIR=str(folder / "stack"),
        AIRFLOW_STACK_DAGS_FOLDER=str(folder),
    )
    try:
        yield env
    finally:
        run_stack(env, "stop", timeout=300)
        shutil.rmtree(folder, ignore_errors=True)


def _processes_of(folder: str) -> list[int]:
    """Live processes whose command line or environment names the instance folder (data dirs, AIRFLOW_HOME)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if folder.encode() in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return alive(found)


def test_status_of_an_instance_never_started_exits_3(instance):
    env = instance
    status = run_stack(env, "status")
    assert status.returncode == 3 and status.stdout.strip().splitlines()[-1].startswith("stopped http://127.0.0.1:")
    stop = run_stack(env, "stop")
    assert stop.returncode == 0 and stop.stdout.strip() == "not running"


def test_a_port_in_use_is_refused_before_anything_starts(instance):
    env = instance
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", int(env["AIRFLOW_STACK_PORT"]) + 2))  # Redis's port
        busy.listen()
        started = run_stack(env, "start")
    assert started.returncode == 1 and "already in use" in started.stderr and "for redis" in started.stderr
    assert _processes_of(env["AIRFLOW_STACK_DIR"]) == []


def test_a_start_that_is_not_healthy_in_time_stops_what_it_started(instance):
    env = dict(instance, AIRFLOW_STACK_START_TIMEOUT="3")
    started = run_stack(env, "start")
    assert started.returncode == 1
    assert "Airflow not healthy after 3s" in started.stderr and "stopped what this start had started" in started.stderr
    assert _processes_of(env["AIRFLOW_STACK_DIR"]) == []
    assert run_stack(env, "status").returncode == 3


def test_status_and_a_second_start_are_harmless(stack):
    status = run_stack(stack["env"], "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.strip().splitlines()[-1] == f"running {stack['url']}"
    for part in ("postgres", "redis", "api-server", "scheduler", "dag-processor", "worker1", "worker2"):
        assert f"{part}: running, healthy" in status.stdout
    pids = {part: _pid(stack, part) for part in ("postgres", "api-server", "worker1")}
    again = run_stack(stack["env"], "start")
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == stack["url"]
    assert "already running" in again.stderr
    assert {part: _pid(stack, part) for part in pids} == pids


def test_the_fhir_connection_and_pool_are_configured(stack):
    pools = {pool["name"]: pool["slots"] for pool in stack["api"].get("pools")["pools"]}
    assert pools.get("fhir_server") == 4
    env_file = (stack["folder"] / "stack" / "airflow.env").read_text()
    assert "AIRFLOW_CONN_FHIR_DEFAULT=" in env_file and '\\"conn_type\\":\\ \\"fhir\\"' in env_file
    assert oct((stack["folder"] / "stack" / "secrets.env").stat().st_mode & 0o777) == "0o600"


def test_mapped_tasks_run_on_both_workers(stack):
    api = stack["api"]
    run_id = api.trigger("stack_spread")
    assert api.wait_for_run("stack_spread", run_id, timeout=300) == "success"
    mapped = [ti for ti in api.task_instances("stack_spread", run_id) if ti["task_id"] == "work"]
    assert len(mapped) == 8 and all(ti["state"] == "success" for ti in mapped)
    assert {ti["hostname"] for ti in mapped} == {WORKER1, WORKER2}
    assert api.result("stack_spread", run_id, "total") == sum(range(8))


def test_a_killed_worker_s_tasks_are_retried_on_the_other_worker(stack):
    api = stack["api"]
    run_id = api.trigger("stack_kill")
    running = api.running_on_both_workers("stack_kill", run_id, "hold", timeout=240)
    on_killed = sorted(index for index, host in running.items() if host == WORKER2)

    # The worker dies with everything it started: its helper process, its 2 pool processes (task supervisors) and
    # the task processes they run.
    worker2 = kill_worker(stack["env"])
    assert len(worker2) >= 5
    (stack["folder"] / "release").touch()

    assert api.wait_for_run("stack_kill", run_id, timeout=HEARTBEAT_TIMEOUT + 240) == "success"
    assert api.result("stack_kill", run_id, "total") == sum([0, 1, 2, 3])
    final = {ti["map_index"]: ti for ti in api.task_instances("stack_kill", run_id) if ti["task_id"] == "hold"}
    assert all(ti["state"] == "success" for ti in final.values())
    for index in on_killed:
        assert final[index]["hostname"] == WORKER1 and final[index]["try_number"] >= 2
        tries = api.tries("stack_kill", run_id, "hold", index)
        first = min(tries, key=lambda t: t["try_number"])
        assert first["hostname"] == WORKER2 and first["state"] != "success"

    assert alive(worker2) == []
    status = run_stack(stack["env"], "status")
    assert (
        status.returncode == 1 and "worker2: stopped" in status.stdout and "worker1: running, healthy" in status.stdout
    )


def test_stop_stops_every_process_it_started(stack):
    processes = stack_processes(stack["env"])
    assert set(processes) == {"postgres", "redis", "api-server", "scheduler", "dag-processor", "worker1"}
    assert len(processes["postgres"]) > 1  # PostgreSQL's own children (they call setsid) are counted too
    stopped = run_stack(stack["env"], "stop", timeout=300)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped"
    assert {part: alive(pids) for part, pids in processes.items()} == {part: [] for part in processes}
    status = run_stack(stack["env"], "status")
    assert status.returncode == 3 and status.stdout.strip().splitlines()[-1] == f"stopped {stack['url']}"
