"""Latency of the near-real-time path: from a low blood count written to the FHIR server to its Flag on the server.

Usage: .venv/bin/python benchmarks/realtime_bench.py [--patients 50] [--interval 6] [--debounce S] [--max-wait S]
           [--airflow-defaults] [--set AIRFLOW__SECTION__KEY=VALUE ...] [--fhir-port 8695] [--airflow-port 8696]
           [--listen-port 8697] [--keep DIR]

Starts, all on loopback: HAPI with rest-hook subscriptions (scripts/fhir-server, a fresh data folder), Airflow
(api-server, scheduler, dag-processor; LocalExecutor, SQLite; the README's latency settings unless
--airflow-defaults) on the repository's dags/, `leukofhir listen` as its own process (the receiver's defaults unless
--debounce/--max-wait), then `leukofhir subscribe`. One warm-up CBC (not counted), then `--patients` CBC panels
(WBC low, ANC, lymphocytes, hemoglobin, platelets and their DiagnosticReport, one transaction each, as a lab
interface writes a report) for as many patients, arriving as a Poisson stream with a mean `--interval` seconds
apart (6 s: about 600 CBCs an hour, our estimate of the morning peak of a 1,000-bed hospital's laboratory; every
CBC touches the path, low or not, and these are all low so that each gives a Flag).

For each patient: the time from the WBC Observation's meta.lastUpdated to its Flag's meta.lastUpdated (both the
server's clock), and where it went:
  delivery   Observation written → the receiver logs the first notification for the patient (HAPI's matching,
             its submission interval and the HTTP delivery)
  debounce   → the receiver forms the batch holding the patient (its log)
  trigger    → the run exists in Airflow (the run's queued_at; the receiver's POST and token)
  queued     → the task instance starts (Airflow's scheduler loop, the executor, the task process fork)
  start-up   → the pipeline starts (DAG file parse, the FHIR connection, the capability check)
  evaluation → find + extract + evaluate (the run report's step seconds)
  write      → the Flag's meta.lastUpdated (the run report's write step, up to the server's commit)
`start-up` is what remains of the task's time before the pipeline's steps; the steps come from report.json of the
run folder. Prints median, p95 and max of the total and of each part. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import psutil  # noqa: E402  (Airflow's own dependency)
from pipeline_bench import start_server, stop_server  # noqa: E402

from leukofhir.config import load_config  # noqa: E402
from leukofhir.fhir.client import FhirClient  # noqa: E402
from leukofhir.realtime.subscribe import subscribe, unsubscribe  # noqa: E402
from support.airflow_server import LATENCY_SETTINGS, LocalAirflow  # noqa: E402
from support.fhir_builders import observation, patient, report  # noqa: E402
from support.listen_process import ListenProcess  # noqa: E402
from support.server_data import project_flags, put  # noqa: E402

SECRET = "realtime-bench-secret-" + uuid.uuid4().hex
DAG_ID = "leukopenia_patients"
PANEL = (("wbc", 1.8), ("anc", 1.0), ("lymphocytes_abs", 0.6), ("hemoglobin", 11.9), ("platelets", 160))
PARTS = ("delivery", "debounce", "trigger", "queued", "start-up", "evaluation", "write")
# The receiver's log (-v, TZ=UTC): one line per notification, per batch formed, per run created.
RECEIVED = re.compile(r"^(\S+ \S+) DEBUG \S+: PUT Observation/\S+: (Patient/\S+) queued$")
FORMED = re.compile(r"^(\S+ \S+) INFO \S+: batch (\S+) formed: ")


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def log_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=timezone.utc)


def cbc(pid: str, when: str) -> list[dict]:
    results = [
        observation(f"{pid}-{concept.replace('_', '-')}", concept, value, time=when, patient=f"Patient/{pid}")
        for concept, value in PANEL
    ]
    return [*results, report(f"{pid}-cbc", [o["id"] for o in results], time=when, patient_ref=f"Patient/{pid}")]


def wait_for_flags(client: FhirClient, pids: list[str], seconds: float) -> dict[str, dict]:
    deadline = time.monotonic() + seconds
    while True:
        flags = {f["subject"]["reference"][8:]: f for f in project_flags(client, pids)}
        if set(pids) <= set(flags) or time.monotonic() > deadline:
            return flags
        time.sleep(1)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def breakdown(
    pids: list[str], client: FhirClient, flags: dict[str, dict], airflow: LocalAirflow, listen_log: Path
) -> list[dict]:
    received: dict[str, datetime] = {}
    formed: dict[str, datetime] = {}
    for line in listen_log.read_text().splitlines():
        if m := RECEIVED.match(line):
            received.setdefault(m.group(2), log_time(m.group(1)))
        elif m := FORMED.match(line):
            formed[m.group(2)] = log_time(m.group(1))
    runs = {}
    for run in airflow.runs(DAG_ID):
        for ref in run["conf"]["patients"]:
            runs.setdefault(ref, run)  # a patient's first run is the one that wrote its Flag
    rows = []
    for pid in pids:
        ref = f"Patient/{pid}"
        written = instant(client.read("Observation", f"{pid}-wbc")["meta"]["lastUpdated"])
        flagged = instant(flags[pid]["meta"]["lastUpdated"])
        run = runs[ref]
        (task,) = airflow.task_instances(DAG_ID, run["dag_run_id"])
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", run["dag_run_id"])
        steps = json.loads((airflow.home / "leukofhir-runs" / DAG_ID / folder / "report.json").read_text())["seconds"]
        evaluation = steps["find"] + steps["extract"] + steps["evaluate"]
        task_start = instant(task["start_date"])
        pipeline_start = (flagged - task_start).total_seconds() - evaluation - steps["write"]
        rows.append(
            {
                "patient": pid,
                "total": (flagged - written).total_seconds(),
                "delivery": (received[ref] - written).total_seconds(),
                "debounce": (formed[run["dag_run_id"]] - received[ref]).total_seconds(),
                "trigger": (instant(run["queued_at"]) - formed[run["dag_run_id"]]).total_seconds(),
                "queued": (task_start - instant(run["queued_at"])).total_seconds(),
                "start-up": pipeline_start,
                "evaluation": evaluation,
                "write": steps["write"],
                "run": run["dag_run_id"],
                "run_patients": len(run["conf"]["patients"]),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=50)
    parser.add_argument("--interval", type=float, default=6.0, help="mean seconds between CBCs (Poisson; 6)")
    parser.add_argument("--seed", type=int, default=12, help="seed of the arrival times (the same stream each run)")
    parser.add_argument("--debounce", type=float, help="the receiver's --debounce (default: its own, 1 s)")
    parser.add_argument("--max-wait", type=float, help="the receiver's --max-wait (default: its own, 5 s)")
    parser.add_argument(
        "--airflow-defaults",
        action="store_true",
        help="Airflow's own settings instead of the README's latency settings",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="AIRFLOW__SECTION__KEY=VALUE",
        help="one more Airflow setting (repeatable), e.g. AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME=0.25",
    )
    parser.add_argument("--fhir-port", type=int, default=8695)
    parser.add_argument("--airflow-port", type=int, default=8696)
    parser.add_argument("--listen-port", type=int, default=8697)
    parser.add_argument("--keep", help="keep the work folder (logs, run folders) here")
    args = parser.parse_args()
    rules = load_config()
    work = Path(args.keep or tempfile.mkdtemp(prefix="leukofhir-realtime-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:6]
    pids = [f"rt{n:02d}-{tag}" for n in range(args.patients)]
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} ({os.cpu_count()} cores)", flush=True)
    base_url = start_server(args.fhir_port, work / "hapi")
    try:
        env = {
            "AIRFLOW_CONN_FHIR_DEFAULT": json.dumps({"conn_type": "fhir", "host": base_url}),
            **({} if args.airflow_defaults else LATENCY_SETTINGS),
            **dict(kv.split("=", 1) for kv in args.set),
        }
        receiver_args = [
            *(["--debounce", str(args.debounce)] if args.debounce is not None else []),
            *(["--max-wait", str(args.max_wait)] if args.max_wait is not None else []),
        ]
        with (
            LocalAirflow(work / "airflow", args.airflow_port, dags_folder=ROOT / "dags", extra_env=env) as airflow,
            FhirClient(base_url, timeout=120) as client,
        ):
            listen_env = dict(os.environ, TZ="UTC", LEUKOFHIR_HOOK_SECRET=SECRET, **airflow.receiver_environment())
            with ListenProcess(
                work / "listen", args.listen_port, listen_env, fhir_url=base_url, args=tuple(receiver_args)
            ) as listener:
                subscribe(client, f"{listener.url}/notify", SECRET, rules)
                try:
                    put(client, *(patient(p) for p in [*pids, f"warm-{tag}"]))
                    put(client, *cbc(f"warm-{tag}", "2024-03-01T08:00:00Z"))
                    if f"warm-{tag}" not in wait_for_flags(client, [f"warm-{tag}"], 300):
                        raise SystemExit(f"the warm-up CBC gave no Flag; see {work}")
                    before = set(r["dag_run_id"] for r in airflow.runs(DAG_ID))
                    arrivals = random.Random(args.seed)
                    scheduler = psutil.Process(airflow.processes["scheduler"].pid)
                    cpu_before = sum(scheduler.cpu_times()[:2])
                    began = time.monotonic()
                    print(f"posting {len(pids)} CBCs, a mean {args.interval:g} s apart ...", flush=True)
                    for n, pid in enumerate(pids):
                        put(client, *cbc(pid, f"2024-03-01T{8 + n // 60:02d}:{n % 60:02d}:00Z"))
                        time.sleep(arrivals.expovariate(1 / args.interval))
                    print(f"posted in {time.monotonic() - began:.0f} s; waiting for the Flags", flush=True)
                    flags = wait_for_flags(client, pids, 600)
                    # The scheduler loop's own CPU (its task processes are the forkserver's children, not its own).
                    scheduler_cpu = (sum(scheduler.cpu_times()[:2]) - cpu_before) / (time.monotonic() - began)
                    missing = [p for p in pids if p not in flags]
                    if missing:
                        raise SystemExit(f"{len(missing)} patient(s) got no Flag within 10 minutes: {missing[:5]}")
                    airflow.wait_for_runs(DAG_ID, len(before) + 1, seconds=300)  # their report.json written
                    rows = breakdown(pids, client, flags, airflow, listener.log)
                finally:
                    unsubscribe(client, rules)
    finally:
        stop_server(args.fhir_port)
    load = os.getloadavg()
    runs = {r["run"]: r["run_patients"] for r in rows}
    print(f"load average at end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(
        f"\n{len(rows)} patients, {len(runs)} runs of {DAG_ID} ({statistics.mean(runs.values()):.1f} patients a run "
        f"on average, at most {max(runs.values())}); receiver: {' '.join(receiver_args) or 'defaults'}; Airflow: "
        f"{'defaults' if args.airflow_defaults else 'latency settings'} {' '.join(args.set)}"
    )
    print(f"scheduler process CPU while the CBCs came: {scheduler_cpu:.0%} of a core")
    print(f"{'seconds':12} {'median':>7} {'p95':>7} {'max':>7}")
    for part in ("total", *PARTS):
        values = [r[part] for r in rows]
        print(f"{part:12} {statistics.median(values):7.1f} {percentile(values, 0.95):7.1f} {max(values):7.1f}")
    total = [r["total"] for r in rows]
    print(
        f"\nObservation → Flag: median {statistics.median(total):.1f} s, p95 {percentile(total, 0.95):.1f} s, "
        f"max {max(total):.1f} s (target p95 < 60 s, aim < 15 s)"
    )
    (work / "latency.json").write_text(json.dumps(rows, indent=1))
    print(f"per patient: {work / 'latency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
