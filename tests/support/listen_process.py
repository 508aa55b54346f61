"""`leukofhir listen` run as its own process on a loopback port, as it runs in production, for tests."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

from support.hostile import Target
from support.processes import ServiceProcess


class ListenProcess(ServiceProcess):
    name = "leukofhir listen"

    def __init__(
        self,
        workdir: Path,
        port: int,
        env: dict[str, str],
        *,
        fhir_url: str = "http://127.0.0.1:9/fhir",
        args: tuple[str, ...] = ("--debounce", "1", "--max-wait", "4", "--retry-max", "1"),
        nofile: int | None = None,
        tls: tuple[Path, Path] | None = None,
        cwd: Path | None = None,
    ):
        super().__init__(workdir, port, "listen.log", env, nofile=nofile, tls=tls, cwd=cwd)
        self.queue = self.workdir / "queue.sqlite3"
        self.cmd = [
            sys.executable,
            "-m",
            "leukofhir.cli",
            "-v",
            "listen",
            "--port",
            str(port),
            "--queue",
            str(self.queue),
            "--fhir-url",
            fhir_url,
            *args,
            *self.tls_args,
        ]

    def health(self) -> dict:
        return requests.get(f"{self.url}/healthz", timeout=5, verify=self.verify).json()

    def wait_drained(self, timeout: float = 90.0) -> dict:
        """Until nothing waits: every patient (and window request) is in a run Airflow accepted."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health["pending_patients"] == health["unaccepted_batches"] == health["pending_window_requests"] == 0:
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"not drained after {timeout} s: {health}\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def wait_until(self, predicate, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if predicate(health):
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met after {timeout} s: {health}")
            time.sleep(0.3)


HOSTILE_SECRET = "hostile-test-secret-0123456789"


@contextmanager
def listen_service(
    workdir: Path,
    port: int,
    *,
    nofile: int | None = None,
    args: tuple[str, ...] = (),
    fhir_url: str = "http://127.0.0.1:9/fhir",
    tls: tuple[Path, Path] | None = None,
    cwd: Path | None = None,
) -> Iterator[Target]:
    """The receiver as the hostile-client tests see it (tests/support/hostile.py). No Airflow: a notification it
    accepts waits in its queue, which is all these tests look at."""
    env = dict(
        os.environ,
        LEUKOFHIR_HOOK_SECRET=HOSTILE_SECRET,
        LEUKOFHIR_AIRFLOW_URL="http://127.0.0.1:9",
        LEUKOFHIR_AIRFLOW_USER="nobody",
        LEUKOFHIR_AIRFLOW_PASSWORD="nothing",
    )

    def valid() -> tuple[str, str, bytes]:
        oid = f"hostile-{uuid.uuid4().hex[:12]}"
        body = {
            "resourceType": "Observation",
            "id": oid,
            "status": "final",
            "code": {"text": "WBC"},
            "subject": {"reference": f"Patient/p-{oid}"},
        }
        return "PUT", f"/notify/Observation/{oid}", json.dumps(body).encode()

    with ListenProcess(
        workdir, port, env, fhir_url=fhir_url, nofile=nofile, tls=tls, cwd=cwd, args=("--retry-max", "30", *args)
    ) as listener:
        yield Target(
            port=port,
            pid=listener.proc.pid,
            log=listener.log,
            scheme="https" if tls else "http",
            verify=listener.verify,
            auth=lambda: {"Authorization": f"Bearer {HOSTILE_SECRET}"},
            valid=valid,
            json_target=("PUT", "/notify/Observation/deep"),
        )
