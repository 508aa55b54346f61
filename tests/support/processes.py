"""Servers the tests start as processes: wait until they answer, and stop them with their children."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path
from typing import Self

import requests

from support.ports import is_listening


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log: Path, name: str, verify=True) -> None:
    """Until GET `url` answers 200 (TLS checked against `verify`, as requests takes it); the process exiting first,
    or the timeout, raises with its log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if requests.get(url, timeout=2, verify=verify).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    stop_group(proc)
    raise RuntimeError(f"{name} not healthy after {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    """TERM the process group of a process started with start_new_session=True; KILL it if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


class ServiceProcess:
    """A leukofhir HTTP service (`leukofhir listen`, `leukofhir cds-hooks`) as a process of its own on 127.0.0.1,
    started by `start()` or `with`, stopped with its children. A subclass sets `name` and `self.cmd`."""

    name = "a leukofhir service"

    def __init__(
        self,
        workdir: Path,
        port: int,
        log_name: str,
        env: dict,
        *,
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
        self.tls_args = ("--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1])) if tls else ()
        self.log = self.workdir / log_name
        self.env = env
        self.nofile = nofile  # the process's descriptor limit (soft and hard), as `prlimit --nofile=N` sets it
        self.cwd = cwd  # `-m leukofhir.cli` imports the package found there first (another checkout's, say)
        self.cmd: list[str] = []
        self.proc: subprocess.Popen | None = None

    def _limit(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def start(self, timeout: float = 60.0) -> Self:
        if is_listening(self.port):  # another server there would answer the health check in its place
            raise RuntimeError(f"port {self.port} is in use: {self.name} cannot start there")
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
        wait_healthy(self.proc, f"{self.url}/healthz", timeout, self.log, self.name, self.verify)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
