"""A real Airflow 3 for tests and benchmarks: its api-server and, unless `scheduler=False`, a scheduler and a
dag-processor running tasks with the LocalExecutor; SQLite in a private AIRFLOW_HOME, on one loopback port.

Two SimpleAuthManager users: `admin` for the tests' own REST calls (unpausing, reading runs and task instances) and
`leukofhir` with the role `user`, the rights a receiver is given (it may trigger runs). REST calls go through the
package's own Airflow client (token from /auth/token, renewed when refused). Each process runs in a session of its
own and is stopped with all its children (task processes, API workers)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import requests

from leukofhir.realtime.airflow_api import AirflowClient, AirflowSettings
from support.processes import stop_group, wait_healthy

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
ADMIN, USER = "admin", "leukofhir"
FHIR_POOL = "fhir_server"


class LocalAirflow:
    """`with LocalAirflow(home, port, dags_folder=..., extra_env={...}) as airflow:` then `airflow.api(...)`,
    `airflow.runs(...)`, `airflow.cli(...)`; `stop()` and `start()` again for an outage."""

    def __init__(
        self,
        home: Path,
        port: int,
        *,
        dags_folder: Path,
        scheduler: bool = True,
        extra_env: dict[str, str] | None = None,
        pool_slots: int = 2,
    ):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.components = ("api-server", "scheduler", "dag-processor") if scheduler else ("api-server",)
        self.pool_slots = pool_slots
        self.passwords = {ADMIN: secrets.token_urlsafe(16), USER: secrets.token_urlsafe(16)}
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps(self.passwords), encoding="utf-8")
        # Nothing of the test session's own Airflow settings, connections or variables leaks in: only what is here.
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_"))
        }
        self.env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                # SQLite takes one writer at a time: a process waits its turn behind the scheduler instead of failing on
                # "database is locked" after the default 5 s.
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home}/airflow.db?timeout=60",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                # Two cores: a handful of task processes, not Airflow's default 32.
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__CORE__AUTH_MANAGER": (
                    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
                ),
                # SimpleAuthManager: role `user` may trigger DAG runs, not administer Airflow.
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin,{USER}:user",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(port),
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
                **(extra_env or {}),
            }
        )
        self.processes: dict[str, subprocess.Popen] = {}
        self._clients: dict[str, AirflowClient] = {}
        self._prepared = False

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def prepare(self) -> None:
        """The database, the pool, and the DAGs serialized into it (at once, not at the dag-processor's first pass)."""
        for args in (
            ("db", "migrate"),
            ("pools", "set", FHIR_POOL, str(self.pool_slots), "FHIR server requests"),
            ("dags", "reserialize"),
        ):
            done = self.cli(*args)
            if done.returncode != 0:
                raise RuntimeError(f"airflow {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        self._prepared = True

    def start(self, timeout: float = 180.0) -> LocalAirflow:
        if not self._prepared:
            self.prepare()
        for component in self.components:
            with open(self.home / f"{component}.log", "ab") as log:
                self.processes[component] = subprocess.Popen(
                    [AIRFLOW, component], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        wait_healthy(
            self.processes["api-server"],
            f"{self.url}/api/v2/monitor/health",
            timeout,
            self.home / "api-server.log",
            "airflow api-server",
        )
        for component, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"airflow {component} exited ({process.returncode}); see {self.home}/{component}.log"
                )
        return self

    def stop(self) -> None:
        for process in self.processes.values():
            stop_group(process)
        self.processes = {}

    def __enter__(self) -> LocalAirflow:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        for client in self._clients.values():
            client.close()

    def rotate_jwt_secret(self) -> None:
        """Tokens signed before the next start are refused (Airflow 3.3: 403 "Invalid JWT token"), as after a key
        rotation."""
        self.env["AIRFLOW__API_AUTH__JWT_SECRET"] = secrets.token_urlsafe(64)

    def receiver_environment(self) -> dict[str, str]:
        """What `leukofhir listen` reads to reach this Airflow, as the user `leukofhir`."""
        return {
            "LEUKOFHIR_AIRFLOW_URL": self.url,
            "LEUKOFHIR_AIRFLOW_USER": USER,
            "LEUKOFHIR_AIRFLOW_PASSWORD": self.passwords[USER],
        }

    def client(self, user: str = ADMIN) -> AirflowClient:
        """The package's Airflow REST client as `user` (one per user, closed with this Airflow)."""
        if user not in self._clients:
            self._clients[user] = AirflowClient(AirflowSettings(self.url, user, self.passwords[user]), timeout=60)
        return self._clients[user]

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        """`method` on /api/v2/`path` as admin."""
        return self.client().request(method, f"/api/v2/{path.lstrip('/')}", **kwargs)

    def unpause(self, dag_id: str) -> None:
        answer = self.api("PATCH", f"dags/{dag_id}", json={"is_paused": False})
        assert answer.ok, answer.text

    def runs(self, dag_id: str) -> list[dict]:
        """Every run of `dag_id`, oldest first."""
        return self.client().dag_runs(dag_id)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        answer = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        answer.raise_for_status()
        return answer.json()["task_instances"]

    def wait_for_runs(self, dag_id: str, count: int, seconds: float = 600, **match) -> list[dict]:
        """Until `count` runs matching `match` (e.g. run_type="backfill") have ended; returns them."""
        deadline = time.monotonic() + seconds
        while True:
            found = [r for r in self.runs(dag_id) if all(r.get(k) == v for k, v in match.items())]
            if len(found) >= count and all(r["state"] in ("success", "failed") for r in found):
                return found
            for component, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"airflow {component} exited; see {self.home}/{component}.log")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{count} {dag_id} run(s) {match} not ended after {seconds:.0f} s: "
                    f"{[(r['dag_run_id'], r['state']) for r in found]}; see {self.home}/*.log"
                )
            time.sleep(1)


# The Airflow settings that matter for the near-real-time path's latency (docs/near-real-time.md; measured by
# benchmarks/patients_dag_bench.py and benchmarks/realtime_bench.py): the LocalExecutor's workers come from a
# forkserver that has imported the pipeline once, so a task process does not import it again.
LATENCY_SETTINGS = {
    "AIRFLOW__SCHEDULER__MP_START_METHOD": "forkserver",
    "AIRFLOW__CORE__MP_FORKSERVER_PRELOAD": "airflow,airflow.executors.local_executor,leukofhir.airflow.preload",
}
