"""`leukofhir listen` run as its own process on a loopback port, as it runs in production, for tests."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

from support.hostile import Target
from support.ports import is_listening
from support.processes import stop_group, wait_healthy


class ListenProcess:
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
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        # With `tls` (certificate, key), https: the certificate is also what the tests trust (self-signed).
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.verify = str(tls[0]) if tls else True
        if tls:
            args = (*args, "--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1]))
        self.queue = self.workdir / "queue.sqlite3"
        self.log = self.workdir / "listen.log"
        self.env = env
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
        ]
        self.nofile = nofile  # the process's descriptor limit (soft and hard), as `prlimit --nofile=N` sets it
        self.cwd = cwd  # `-m leukofhir.cli` imports the package found there first (another checkout's, say)
        self.proc: subprocess.Popen | None = None

    def _limit(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def start(self, timeout: float = 60.0) -> ListenProcess:
        if is_listening(self.port):  # another server there would answer the health check in its place
            raise RuntimeError(f"port {self.port} is in use: leukofhir listen cannot start there")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=self._limit if self.nofile else None,
                cwd=self.cwd,
            )
        wait_healthy(self.proc, f"{self.url}/healthz", timeout, self.log, "leukofhir listen", self.verify)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def __enter__(self) -> ListenProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

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
