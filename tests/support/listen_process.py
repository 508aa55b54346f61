"""`leukofhir listen` run as its own process on a loopback port, as it runs in production, for tests."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from support.ports import is_listening
from support.processes import stop_group, wait_healthy


class ListenProcess:
    def __init__(self, workdir: Path, port: int, env: dict[str, str], *, fhir_url: str = "http://127.0.0.1:9/fhir",
                 args: tuple[str, ...] = ("--debounce", "1", "--max-wait", "4", "--retry-max", "1")):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.queue = self.workdir / "queue.sqlite3"
        self.log = self.workdir / "listen.log"
        self.env = env
        self.cmd = [sys.executable, "-m", "leukofhir.cli", "-v", "listen", "--port", str(port),
                    "--queue", str(self.queue), "--fhir-url", fhir_url, *args]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "ListenProcess":
        if is_listening(self.port):  # another server there would answer the health check in its place
            raise RuntimeError(f"port {self.port} is in use: leukofhir listen cannot start there")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_healthy(self.proc, f"{self.url}/healthz", timeout, self.log, "leukofhir listen")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def __enter__(self) -> "ListenProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def health(self) -> dict:
        return requests.get(f"{self.url}/healthz", timeout=5).json()

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
