"""Servers the tests start as processes: wait until they answer, and stop them with their children."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import requests


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
