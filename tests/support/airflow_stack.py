"""A real Airflow for end-to-end tests: api-server, scheduler and dag-processor (LocalExecutor, SQLite) on loopback.

Started from the venv's `airflow` command with a private AIRFLOW_HOME, the repository's dags/ folder, the `fhir`
connection from the environment and the `fhir_server` pool; every process is stopped with its children."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalAirflow:
    """`with LocalAirflow(home, dags, extra_env) as airflow:` then `airflow.api(...)`, `airflow.cli(...)`."""

    def __init__(self, home: Path, dags_folder: Path, extra_env: dict | None = None, pool_slots: int = 2):
        self.home = Path(home)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pool_slots = pool_slots
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # SQLite takes one writer at a time: the CLI waits its turn behind the scheduler instead of failing on
            # "database is locked" after the default 5 s.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home}/airflow.db?timeout=60",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # Two cores: a handful of task processes, not Airflow's default 32.
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(16).hex(),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
            **(extra_env or {}),
        }
        self.processes: list[subprocess.Popen] = []
        self._token: str | None = None

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self) -> "LocalAirflow":
        self.home.mkdir(parents=True, exist_ok=True)
        for args in (("db", "migrate"), ("pools", "set", "fhir_server", str(self.pool_slots), "FHIR server requests")):
            done = self.cli(*args)
            if done.returncode != 0:
                raise RuntimeError(f"airflow {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        for component in ("api-server", "scheduler", "dag-processor"):
            log = open(self.home / f"{component}.log", "w")
            # A session of its own per component: stop() ends it with every child (task processes, API workers).
            self.processes.append(subprocess.Popen([AIRFLOW, component], env=self.env, stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
        self._wait(lambda: requests.get(f"{self.url}/api/v2/monitor/health", timeout=5).ok, 180, "api-server")
        return self

    def _wait(self, ready, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"an Airflow component exited ({process.args}); see {self.home}/*.log")
            try:
                if ready():
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"{what} not ready after {seconds:.0f} s; see {self.home}/*.log")

    def token(self) -> str:
        if self._token is None:
            answer = requests.get(f"{self.url}/auth/token", timeout=30)
            answer.raise_for_status()
            self._token = answer.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token()}"}
        return requests.request(method, f"{self.url}/api/v2/{path.lstrip('/')}", headers=headers, timeout=60, **kwargs)

    def wait_for_dag(self, dag_id: str, seconds: float = 180) -> None:
        self._wait(lambda: self.api("GET", f"dags/{dag_id}").ok, seconds, f"DAG {dag_id}")

    def runs(self, dag_id: str) -> list[dict]:
        answer = self.api("GET", f"dags/{dag_id}/dagRuns", params={"limit": 100})
        answer.raise_for_status()
        return answer.json()["dag_runs"]

    def wait_for_runs(self, dag_id: str, count: int, seconds: float = 600, **match) -> list[dict]:
        """Wait until `count` runs matching `match` (e.g. run_type="backfill") have ended; return them."""
        found: list[dict] = []

        def ended() -> bool:
            nonlocal found
            found = [r for r in self.runs(dag_id) if all(r.get(k) == v for k, v in match.items())]
            return len(found) >= count and all(r["state"] in ("success", "failed") for r in found)

        self._wait(ended, seconds, f"{count} {dag_id} run(s) {match}")
        return found

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        self.processes = []

    def __enter__(self) -> "LocalAirflow":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
