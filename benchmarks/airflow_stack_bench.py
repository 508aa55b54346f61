"""Time `scripts/airflow-stack start` to all healthy (new and existing instance) and sum the stack's memory."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STACK = str(ROOT / "scripts" / "airflow-stack")
PARTS = ("postgres", "redis", "api-server", "scheduler", "dag-processor", "worker1", "worker2")


def memory(pids: list[int]) -> tuple[int, int, int]:
    """(processes, RSS kB, PSS kB) of the pids. PSS shares each page among the processes mapping it: the
    forked Celery pool and PostgreSQL's children share most of theirs, so the RSS sum counts them twice."""
    count = rss = pss = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:]}
        count, rss, pss = count + 1, rss + fields["Rss"], pss + fields["Pss"]
    return count, rss, pss


def run(env: dict, command: str) -> float:
    t0 = time.monotonic()
    done = subprocess.run([STACK, command], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"airflow-stack {command} failed:\n{done.stderr[-3000:]}")
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8280, help="AIRFLOW_STACK_PORT (it and the next 3 ports)")
    parser.add_argument("--settle", type=float, default=60, help="seconds idle before measuring memory")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="leukofhir-stack-bench-"))
    os.chmod(folder, 0o755)  # PostgreSQL's own user must reach its data folder
    (folder / "dags").mkdir()
    env = dict(
        os.environ,
        AIRFLOW_STACK_PORT=str(args.port),
        AIRFLOW_STACK_DIR=str(folder / "stack"),
        AIRFLOW_STACK_DAGS_FOLDER=str(ROOT / "dags"),
    )
    try:
        first = run(env, "start")
        print(f"start, new instance (initdb, migrate): {first:.1f} s")
        time.sleep(args.settle)
        total = [0, 0, 0]
        print(f"memory after {args.settle:.0f} s idle:")
        print(f"{'part':<14} {'processes':>9} {'RSS MB':>8} {'PSS MB':>8}")
        listed = subprocess.run([STACK, "pids"], env=env, capture_output=True, text=True, check=True).stdout
        processes = {line.split()[0]: [int(pid) for pid in line.split()[1:]] for line in listed.splitlines()}
        for part in PARTS:
            count, rss, pss = memory(processes[part])
            total = [total[0] + count, total[1] + rss, total[2] + pss]
            print(f"{part:<14} {count:>9} {rss / 1024:>8.0f} {pss / 1024:>8.0f}")
        print(f"{'all':<14} {total[0]:>9} {total[1] / 1024:>8.0f} {total[2] / 1024:>8.0f}")
        print(f"stop: {run(env, 'stop'):.1f} s")
        print(f"start, existing instance: {run(env, 'start'):.1f} s")
        print(f"second start while running: {run(env, 'start'):.1f} s")
    finally:
        subprocess.run([STACK, "stop"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
