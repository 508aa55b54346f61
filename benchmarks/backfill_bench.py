"""Benchmark the backfill DAG on the CeleryExecutor stack (scripts/airflow-stack) over generated data in a HAPI server:
the same backfill with one Celery worker and with two, and where the time goes.

Usage: .venv/bin/python benchmarks/backfill_bench.py [--observations 100000] [--extract export] [--chunks 4]
           [--fhir-port 8595] [--stack-port 8596] [--fhir-url URL --no-load] [--runs 1] [--keep]

Starts a HAPI server of its own (scripts/fhir-server, a fresh data folder under /tmp) unless --fhir-url is given (then
HAPI's CPU seconds are measured when that server was started by scripts/fhir-server on --fhir-port), and
loads N generated CBC Observations into it (benchmarks/evaluate_bench.py's generator: Patients, DiagnosticReports,
MedicationStatements; results dated 2016-2019); starts the stack with the repository's dags/ on that server (every DAG
paused but the backfill, so the hourly surveillance DAG does not run beside it); then,
for 1 worker (the second stopped) and for 2, deletes the project's Flags and runs the backfill over 2015-2020 (every
result: a ten-year-style backfill writing every Flag), timing the run, each task (from Airflow's REST API) and the
CPU seconds of HAPI and of the workers (their processes and the task processes they waited for). Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from evaluate_bench import generate  # noqa: E402
from pipeline_bench import start_server, stop_server  # noqa: E402  (the same HAPI server start and stop)

from leukofhir.config import load_config  # noqa: E402
from leukofhir.fhir.client import FhirClient  # noqa: E402
from leukofhir.write.load import load_files  # noqa: E402
from support.celery_stack import Api, admin_password, run_stack, stack_processes  # noqa: E402

DAG = "leukopenia_backfill"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids) -> float:
    """utime + stime of the processes and of their children they waited for (/proc/PID/stat fields 14-17)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])
    return total / TICKS


def fhir_pid(port: int) -> int | None:
    """The pid of the HAPI server scripts/fhir-server started on `port` (this one's or, with --fhir-url, one started
    by hand on --fhir-port), or None."""
    try:
        return int((ROOT / "fhir-server" / "target" / f"fhir-server-{port}.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def delete_flags(client: FhirClient) -> int:
    """Every Flag of the project, deleted (100 per transaction): the next backfill writes them all again."""
    rules = load_config()
    tag = f"{rules.uris.tag_system}|{rules.uris.tag_code}"
    ids = [f["id"] for f in client.search("Flag", {"_tag": tag, "_elements": "id", "_count": 500})]
    for start in range(0, len(ids), 100):
        client.transaction([{"request": {"method": "DELETE", "url": f"Flag/{i}"}} for i in ids[start : start + 100]])
    return len(ids)


def set_workers(env: dict, count: int) -> None:
    """One worker: the second stopped (SIGTERM, as Celery's warm shutdown); two: `start` brings it back."""
    if count == 2:
        done = run_stack(env, "start")
        if done.returncode:
            sys.exit(f"the stack did not start its second worker:\n{done.stderr[-2000:]}")
        return
    pids = stack_processes(env).get("worker2", [])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 120
    while "worker2" in stack_processes(env) and time.monotonic() < deadline:
        time.sleep(1)


def unpause(api: Api, dag_id: str, timeout: float = 180) -> None:
    """Unpause `dag_id` once the dag-processor has parsed it (every DAG starts paused here)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = api.session.patch(f"{api.url}/api/v2/dags/{dag_id}", json={"is_paused": False}, timeout=30)
        if answer.status_code == 200:
            return
        if time.monotonic() > deadline:
            sys.exit(f"could not unpause {dag_id}: HTTP {answer.status_code} {answer.text[:500]}")
        time.sleep(2)


def task_times(api: Api, run_id: str) -> dict[str, dict]:
    """Per task: instances, the sum of their durations, and the wall time from the first start to the last end."""
    spans: dict[str, list] = defaultdict(list)
    for ti in api.task_instances(DAG, run_id):
        if ti.get("start_date") and ti.get("end_date"):
            spans[ti["task_id"]].append(
                (datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"]), ti.get("hostname"))
            )
    out = {}
    for task, items in spans.items():
        out[task] = {
            "instances": len(items),
            "task_seconds": sum((e - s).total_seconds() for s, e, _ in items),
            "wall_seconds": (max(e for _, e, _ in items) - min(s for s, _, _ in items)).total_seconds(),
            "hosts": sorted({h for *_, h in items if h}),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--observations", type=int, default=100_000)
    parser.add_argument("--extract", choices=["search", "export", "auto"], default="export")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--fhir-port", type=int, default=8595)
    parser.add_argument("--stack-port", type=int, default=8596)
    parser.add_argument("--fhir-url", help="use this server (its data already loaded with --no-load)")
    parser.add_argument("--no-load", action="store_true")
    parser.add_argument("--runs", type=int, default=1, help="runs per worker count")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure, in order (default 1,2)")
    parser.add_argument("--keep", action="store_true", help="leave the FHIR server and the stack running")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="leukofhir-backfill-bench-", dir="/tmp"))
    work.chmod(0o755)  # PostgreSQL's own user reaches its data under it
    base_url = args.fhir_url or start_server(args.fhir_port, work / "hapi")
    # DAGs paused at creation: the hourly surveillance DAG would otherwise run at once against the same server, beside
    # the backfill being measured; only the backfill DAG is unpaused.
    env = dict(
        os.environ,
        AIRFLOW_STACK_PORT=str(args.stack_port),
        AIRFLOW_STACK_DIR=str(work / "stack"),
        AIRFLOW_STACK_FHIR_URL=base_url,
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",
    )
    results = []
    try:
        with FhirClient(base_url, timeout=300) as client:
            if not args.no_load:
                data = work / "data"
                data.mkdir()
                generate(
                    data, args.observations, prefix="bb", start=datetime(2016, 1, 1, tzinfo=timezone.utc), days=4 * 360
                )
                begin = time.perf_counter()
                report = load_files(client, sorted(data.glob("*.ndjson")), batch_size=500)
                if not report.ok:
                    sys.exit(f"the load did not go through: {report.rejected[:3]} {report.stopped or ''}")
                print(
                    f"loaded {sum(report.written.values()):,} resources ({args.observations:,} Observations) in "
                    f"{time.perf_counter() - begin:.0f} s",
                    flush=True,
                )
                shutil.rmtree(data)
            begin = time.perf_counter()
            started = run_stack(env, "start")
            if started.returncode:
                sys.exit(f"the stack did not start:\n{started.stderr[-3000:]}")
            print(f"stack started in {time.perf_counter() - begin:.0f} s", flush=True)
            api = Api(started.stdout.strip().splitlines()[-1], admin_password(work / "stack"))
            unpause(api, DAG)
            hapi = fhir_pid(args.fhir_port)
            if hapi is None:
                print(
                    f"no pid file for a FHIR server on port {args.fhir_port}: HAPI's CPU seconds not measured",
                    flush=True,
                )
            for workers in [int(w) for w in args.workers.split(",")]:
                set_workers(env, workers)
                for run in range(args.runs):
                    deleted = delete_flags(client)
                    parts = stack_processes(env)
                    worker_pids = [p for part in ("worker1", "worker2") for p in parts.get(part, [])]
                    cpu_hapi, cpu_workers = cpu_seconds([hapi] if hapi else []), cpu_seconds(worker_pids)
                    begin = time.perf_counter()
                    run_id = api.trigger(
                        DAG,
                        conf={
                            "start": "2015-01-01",
                            "end": "2020-01-01",
                            "chunks": args.chunks,
                            "extract": args.extract,
                        },
                    )
                    state = api.wait_for_run(DAG, run_id, timeout=6 * 3600)
                    seconds = time.perf_counter() - begin
                    worker_pids = [p for part in ("worker1", "worker2") for p in stack_processes(env).get(part, [])]
                    folder = (
                        work / "stack" / "airflow" / "leukofhir-runs" / DAG / re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)
                    )
                    report = json.loads((folder / "report.json").read_text())
                    result = {
                        "workers": workers,
                        "run": run + 1,
                        "state": state,
                        "seconds": round(seconds, 1),
                        "flags_deleted_before": deleted,
                        "writes": report["writes"],
                        "observations_read": report["read"].get("Observation", 0),
                        "patients": report["patients_touched"],
                        "extract": report.get("extract"),
                        "cpu_hapi": round(cpu_seconds([hapi] if hapi else []) - cpu_hapi, 1),
                        "cpu_workers": round(cpu_seconds(worker_pids) - cpu_workers, 1),
                        "tasks": task_times(api, run_id),
                    }
                    results.append(result)
                    print(json.dumps(result), flush=True)
    finally:
        if not args.keep:
            run_stack(env, "stop", timeout=300)
            if not args.fhir_url:
                stop_server(args.fhir_port)
            shutil.rmtree(work, ignore_errors=True)
    for r in results:
        tasks = r["tasks"]
        order = ["bulk_export", "find_patients", "extract", "evaluate", "write_flags", "report"]
        shown = "; ".join(
            f"{t} {tasks[t]['wall_seconds']:.0f} s wall / {tasks[t]['task_seconds']:.0f} s in {tasks[t]['instances']}"
            for t in order
            if t in tasks
        )
        print(
            f"{r['workers']} worker(s), run {r['run']}: {r['state']} in {r['seconds']:.0f} s, "
            f"{r['observations_read']:,} Observations of {r['patients']:,} patients "
            f"({r['observations_read'] / r['seconds']:,.0f}/s), Flags created {r['writes']['create']}; "
            f"CPU: HAPI {r['cpu_hapi']:.0f} s, workers {r['cpu_workers']:.0f} s; {shown}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
