"""The near-real-time DAG's shape: one task calling the pipeline, against the five-task chain, in a real Airflow.

Usage: .venv/bin/python benchmarks/patients_dag_bench.py [--runs 6] [--fhir-port 8695] [--airflow-port 8696]
                                                          [--fhir-url URL] [--configs default,preload]

Starts HAPI (unless --fhir-url) and, for each Airflow configuration, a LocalAirflow (api-server, scheduler,
dag-processor; LocalExecutor) on the repository's dags/. Then, one run at a time (nothing else running), alternately:
  chain: `leukopenia_backfill` with conf {"patients": [p], "chunks": 1}: find_patients → extract → evaluate →
         write_flags → report, the five tasks of the scheduled DAGs;
  one:   `leukopenia_patients` with conf {"patients": [p]}: process_patients, one task around run.run_pipeline;
each for a new patient with one low WBC, so each run creates one Flag. For each run: the time from the trigger
(the run's queued_at) to the Flag's meta.lastUpdated, the run's queue wait (queued_at → start_date), the tasks'
own seconds and the gaps between them (scheduler rounds and task start-up). Configurations: `default` (Airflow's
defaults: workers forked from the scheduler, each task imports the pipeline), `preload` (support.airflow_server's
LATENCY_SETTINGS: forkserver with leukofhir.airflow.preload). Prints medians per shape and configuration.
Not a timed test."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline_bench import start_server, stop_server  # noqa: E402

from leukofhir.fhir.client import FhirClient  # noqa: E402
from support.airflow_server import LATENCY_SETTINGS, LocalAirflow  # noqa: E402
from support.fhir_builders import observation, patient  # noqa: E402
from support.server_data import project_flags, put  # noqa: E402

SHAPES = {"chain": "leukopenia_backfill", "one": "leukopenia_patients"}
CONFIGS = {"default": {}, "preload": LATENCY_SETTINGS}


def instant(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def measure_run(airflow: LocalAirflow, client: FhirClient, shape: str, tag: str) -> dict:
    pid = f"shape-{tag}"
    put(client, patient(pid), observation(f"{pid}-w", "wbc", 1.5, patient=f"Patient/{pid}"))
    dag_id = SHAPES[shape]
    conf = {"patients": [f"Patient/{pid}"], **({"chunks": 1} if shape == "chain" else {})}
    run_id = f"bench-{tag}"
    answer = airflow.api(
        "POST", f"dags/{dag_id}/dagRuns", json={"dag_run_id": run_id, "logical_date": None, "conf": conf}
    )
    answer.raise_for_status()
    (run,) = airflow.wait_for_runs(dag_id, 1, seconds=600, dag_run_id=run_id)
    if run["state"] != "success":
        raise SystemExit(f"{dag_id} run {run_id} ended {run['state']}; see {airflow.home}")
    (flag,) = project_flags(client, [pid])
    tasks = sorted(airflow.task_instances(dag_id, run_id), key=lambda t: t["start_date"])
    queued, started = instant(run["queued_at"]), instant(run["start_date"])
    own = sum((instant(t["end_date"]) - instant(t["start_date"])).total_seconds() for t in tasks)
    written = instant(flag["meta"]["lastUpdated"])
    return {
        "shape": shape,
        "to_flag": (written - queued).total_seconds(),
        "queue_wait": (started - queued).total_seconds(),
        "tasks": len(tasks),
        "task_seconds": own,
        "run_seconds": (instant(run["end_date"]) - queued).total_seconds(),
        "between_tasks": (instant(tasks[-1]["end_date"]) - instant(tasks[0]["start_date"])).total_seconds() - own,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6, help="runs of each shape per configuration (6)")
    parser.add_argument("--fhir-port", type=int, default=8695)
    parser.add_argument("--airflow-port", type=int, default=8696)
    parser.add_argument("--fhir-url", help="a running FHIR server (skips starting one)")
    parser.add_argument("--configs", default="default,preload", help="Airflow configurations, in order")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="leukofhir-shape-bench-") as tmp:
        work = Path(tmp)
        base_url = args.fhir_url or start_server(args.fhir_port, work / "hapi")
        try:
            for config in args.configs.split(","):
                env = {
                    "AIRFLOW_CONN_FHIR_DEFAULT": json.dumps({"conn_type": "fhir", "host": base_url}),
                    **CONFIGS[config],
                }
                with (
                    LocalAirflow(
                        work / f"airflow-{config}", args.airflow_port, dags_folder=ROOT / "dags", extra_env=env
                    ) as airflow,
                    FhirClient(base_url, timeout=120) as client,
                ):
                    for dag_id in SHAPES.values():
                        airflow.unpause(dag_id)
                    # One warm-up run of each (the first task of a fresh Airflow also pays for cold disk caches).
                    for shape in SHAPES:
                        measure_run(airflow, client, shape, f"warm-{config}-{shape}-{uuid.uuid4().hex[:8]}")
                    for n in range(args.runs):
                        for shape in SHAPES if n % 2 == 0 else reversed(list(SHAPES)):
                            m = measure_run(airflow, client, shape, f"{config}-{shape}-{n}-{uuid.uuid4().hex[:8]}")
                            results.setdefault(f"{config}/{shape}", []).append(m)
                            print(
                                f"{config:8} {shape:6} trigger→Flag {m['to_flag']:5.1f} s  queued "
                                f"{m['queue_wait']:4.1f} s  {m['tasks']} task(s) {m['task_seconds']:5.1f} s  "
                                f"between tasks {m['between_tasks']:5.1f} s  run {m['run_seconds']:5.1f} s",
                                flush=True,
                            )
                        time.sleep(1)
        finally:
            if not args.fhir_url:
                stop_server(args.fhir_port)
    print("\nmedians (seconds)      trigger→Flag  queued  tasks' own  between tasks  whole run")
    for key, runs in results.items():
        med = {
            k: statistics.median(r[k] for r in runs)
            for k in ("to_flag", "queue_wait", "task_seconds", "between_tasks", "run_seconds")
        }
        print(
            f"{key:22} {med['to_flag']:12.1f} {med['queue_wait']:7.1f} {med['task_seconds']:11.1f} "
            f"{med['between_tasks']:14.1f} {med['run_seconds']:10.1f}   (runs: {len(runs)}; trigger→Flag "
            f"{min(r['to_flag'] for r in runs):.1f}-{max(r['to_flag'] for r in runs):.1f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
