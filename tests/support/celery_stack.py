"""The CeleryExecutor stack of scripts/airflow-stack for tests: start and stop it, its REST API, its processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
STACK = str(ROOT / "scripts" / "airflow-stack")
NODE = os.uname().nodename
WORKER1, WORKER2 = f"{NODE}-worker1", f"{NODE}-worker2"
# A task whose worker died is failed by the scheduler once its heartbeats stop for this long ([scheduler]
# task_instance_heartbeat_timeout, 300 s by default; the task supervisor heartbeats every 5 s).
HEARTBEAT_TIMEOUT = 30


def run_stack(env, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([STACK, *args], env=env, capture_output=True, text=True, timeout=timeout)


def stack_env(port_offset: int, folder: Path, **extra) -> dict:
    """The environment of a stack instance on FHIR_TEST_PORT + offset ... + offset + 3, its state under `folder`,
    tasks of a killed worker failed after HEARTBEAT_TIMEOUT. DAGs start paused and `Api.trigger` unpauses the one it
    runs: a scheduled DAG (the hourly surveillance) running at an hour's turn would otherwise write the Flags a test
    has just deleted, and the run under test would find them there already."""
    return dict(
        os.environ,
        AIRFLOW_STACK_PORT=str(int(os.environ.get("FHIR_TEST_PORT", "8181")) + port_offset),
        AIRFLOW_STACK_DIR=str(folder / "stack"),
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT),
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="5",
        **extra,
    )


def start_stack(env: dict, folder: Path) -> dict:
    """Start the stack; {"env", "url", "folder", "api"}. Fails the test with the script's output when it does not."""
    started = run_stack(env, "start")
    if started.returncode != 0:
        pytest.fail(f"the stack did not start:\n{started.stdout[-3000:]}\n{started.stderr[-5000:]}")
    url = started.stdout.strip().splitlines()[-1]
    return {"env": env, "url": url, "folder": folder, "api": Api(url, admin_password(Path(env["AIRFLOW_STACK_DIR"])))}


class Api:
    """The stack's Airflow REST API (v2) as its admin user."""

    def __init__(self, url: str, password: str):
        self.url = url
        token = requests.post(f"{url}/auth/token", json={"username": "admin", "password": password}, timeout=30)
        token.raise_for_status()
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token.json()['access_token']}"

    def get(self, path: str) -> dict:
        response = self.session.get(f"{self.url}/api/v2/{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def trigger(self, dag_id: str, timeout: float = 180, conf: dict | None = None) -> str:
        deadline = time.monotonic() + timeout
        while self.session.get(f"{self.url}/api/v2/dags/{dag_id}", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, f"{dag_id} was not parsed in {timeout} s"
            time.sleep(2)
        self.session.patch(f"{self.url}/api/v2/dags/{dag_id}", json={"is_paused": False}, timeout=30).raise_for_status()
        response = self.session.post(
            f"{self.url}/api/v2/dags/{dag_id}/dagRuns",
            json={"logical_date": None, **({"conf": conf} if conf else {})},
            timeout=30,
        )
        response.raise_for_status()
        return response.json()["dag_run_id"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int) -> list[dict]:
        return self.get(f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/tries")["task_instances"]

    def running_on_both_workers(self, dag_id: str, run_id: str, task_id: str, timeout: float) -> dict[int, str]:
        """Wait until both workers run instances of a mapped task; map index -> host name of those running."""
        deadline = time.monotonic() + timeout
        while True:
            running = {
                ti["map_index"]: ti["hostname"]
                for ti in self.task_instances(dag_id, run_id)
                if ti["task_id"] == task_id and ti["state"] == "running"
            }
            if {WORKER1, WORKER2} <= set(running.values()):
                return running
            assert time.monotonic() < deadline, f"{task_id} did not run on both workers: {running}"
            time.sleep(1)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.get(f"dags/{dag_id}/dagRuns/{run_id}")["state"]) not in ("success", "failed"):
            if time.monotonic() > deadline:
                states = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in self.task_instances(dag_id, run_id)}
                pytest.fail(f"{dag_id} run still {state} after {timeout} s: {states}")
            time.sleep(2)
        return state

    def result(self, dag_id: str, run_id: str, task_id: str):
        return self.get(f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")["value"]


def admin_password(stack_dir: Path) -> str:
    return json.loads((stack_dir / "airflow" / "simple_auth_manager_passwords.json").read_text())["admin"]


def stack_processes(env: dict) -> dict[str, list[int]]:
    """Each running part's processes (the part and all it started: Celery pool, task processes), as the script
    lists them."""
    listed = run_stack(env, "pids")
    assert listed.returncode == 0, listed.stderr
    return {line.split()[0]: [int(pid) for pid in line.split()[1:]] for line in listed.stdout.splitlines()}


def alive(pids) -> list[int]:
    """Those of the pids that are live processes (a zombie is not)."""
    found = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(pid)
    return found


def reachable_folder() -> Path:
    """A new temporary folder that PostgreSQL's own user can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="leukofhir-stack-"))
    folder.chmod(0o755)
    return folder


def kill_worker(env: dict, part: str = "worker2") -> list[int]:
    """kill -9 of a worker and of everything it started (its helper, pool processes, task supervisors and the task
    processes they run), as a machine that dies would; their pids."""
    pids = stack_processes(env)[part]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids
