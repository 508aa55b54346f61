"""What a local HAPI server (scripts/fhir-server, H2 or PostgreSQL) costs: its processes' CPU seconds, and the machine's
load, for the benchmarks that measure the server (load_bench.py, server_bench.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = str(ROOT / "scripts" / "fhir-server")
TICKS = os.sysconf("SC_CLK_TCK")


def start_server(port: int, data: Path, db: str = "h2", heap: str | None = None) -> str:
    """scripts/fhir-server start on `port` with its data under `data` (FHIR_DB=`db`); returns the base URL."""
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o755)  # PostgreSQL's own user (`postgres` when root) reaches its cluster under it
    env = dict(os.environ, FHIR_PORT=str(port), FHIR_DATA_DIR=str(data), FHIR_DB=db)
    if heap:
        env["FHIR_SERVER_HEAP"] = heap
    done = subprocess.run([LAUNCHER, "start"], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the FHIR server did not start:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def stop_server(port: int) -> None:
    subprocess.run([LAUNCHER, "stop"], env=dict(os.environ, FHIR_PORT=str(port)), capture_output=True)


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def java_pid(port: int) -> int | None:
    """The HAPI server scripts/fhir-server started on `port`."""
    try:
        return int((ROOT / "fhir-server" / "target" / f"fhir-server-{port}.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def postmaster_pid(port: int) -> int | None:
    """The PostgreSQL postmaster of the instance on `port` (its cluster from fhir-server-PORT.db), or None (H2)."""
    try:
        db, home, _ = (ROOT / "fhir-server" / "target" / f"fhir-server-{port}.db").read_text().split()
        return int((Path(home) / "data" / "postmaster.pid").read_text().split()[0]) if db == "postgres" else None
    except (OSError, ValueError, IndexError):
        return None


def cpu(port: int) -> dict[str, float]:
    """CPU seconds so far of the server on `port`: `java` (utime + stime + children waited for) and `postgres` (the
    postmaster with the backends it reaped, plus every live backend: a backend's time moves to the postmaster when it
    ends, so differences of this sum are right across backends that come and go)."""
    out = {"java": 0.0, "postgres": 0.0}
    pid = java_pid(port)
    fields = _stat(pid) if pid else None
    if fields:
        out["java"] = sum(int(v) for v in fields[11:15]) / TICKS
    master = postmaster_pid(port)
    if master:
        total = 0
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _stat(int(entry.name))
                if fields and int(entry.name) == master:
                    total += sum(int(v) for v in fields[11:15])
                elif fields and int(fields[1]) == master:
                    total += int(fields[11]) + int(fields[12])
        out["postgres"] = total / TICKS
    return out


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 1) for k in before}


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rss_mb(port: int) -> dict[str, float]:
    """Resident memory of the JVM, and of PostgreSQL's processes together (shared buffers counted once per process
    that touched them: an upper bound)."""

    def rss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    out = {"java": rss(java_pid(port) or 0) / 1024, "postgres": 0.0}
    master = postmaster_pid(port)
    if master:
        pids = [master] + [
            int(e.name)
            for e in Path("/proc").iterdir()
            if e.name.isdigit() and (_stat(int(e.name)) or ["", "0"])[1] == str(master)
        ]
        out["postgres"] = sum(rss(p) for p in pids) / 1024
    return out
