"""A real Airflow 3 api-server for tests: its own AIRFLOW_HOME, SQLite database, DAGs folder and a
SimpleAuthManager user; started, stopped and started again on a fixed loopback port."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from support.processes import stop_group, wait_healthy

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
USER = "leukofhir"

# Phase 1 stand-in for dags/leukopenia_patients.py: same dag_id and Param, no work. The runs it is given are
# what the receiver's tests read back.
STAND_IN_DAG = '''"""Test stand-in for leukopenia_patients: takes the patients Param and only counts them."""
from airflow.sdk import Param, dag, task


@dag(dag_id="leukopenia_patients", schedule=None,
     params={"patients": Param([], type="array", items={"type": "string"})})
def leukopenia_patients():
    @task
    def count(params=None):
        return len(params["patients"])

    count()


leukopenia_patients()
'''


class AirflowApiServer:
    """`airflow api-server --apps core` (the public REST API and /auth; no scheduler: runs stay queued)."""

    def __init__(self, home: Path, port: int, dag_files: dict[str, str]):
        self.home = Path(home)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.password = secrets.token_urlsafe(16)
        self.proc: subprocess.Popen | None = None
        dags = self.home / "dags"
        dags.mkdir(parents=True, exist_ok=True)
        for name, text in dag_files.items():
            (dags / name).write_text(text, encoding="utf-8")
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({USER: self.password}), encoding="utf-8")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
        self.env.update(
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__CORE__DAGS_FOLDER=str(dags),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{self.home / 'airflow.db'}",
            AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            # Role "user" may trigger runs (SimpleAuthManager: DAG runs need USER for writes); not admin.
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{USER}:user",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
            AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(64),
        )

    def prepare(self) -> None:
        """Create the database and put the DAGs in it (what the dag-processor would do)."""
        for args in (["db", "migrate"], ["dags", "reserialize"]):
            done = subprocess.run([AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"airflow {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def start(self, timeout: float = 180.0) -> None:
        log = open(self.home / "api-server.log", "ab")
        self.proc = subprocess.Popen(
            [AIRFLOW, "api-server", "-H", "127.0.0.1", "-p", str(self.port), "--apps", "core"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_healthy(self.proc, f"{self.url}/api/v2/monitor/health", timeout, self.home / "api-server.log",
                     "airflow api-server")

    def stop(self) -> None:
        """Stop the api-server and its workers."""
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def rotate_jwt_secret(self) -> None:
        """Tokens signed before the next start are refused (Airflow 3.3: 403 "Invalid JWT token"), as after a key rotation."""
        self.env["AIRFLOW__API_AUTH__JWT_SECRET"] = secrets.token_urlsafe(64)

    def client_environment(self) -> dict[str, str]:
        """What `leukofhir listen` reads to reach this Airflow."""
        return {"LEUKOFHIR_AIRFLOW_URL": self.url, "LEUKOFHIR_AIRFLOW_USER": USER,
                "LEUKOFHIR_AIRFLOW_PASSWORD": self.password}
