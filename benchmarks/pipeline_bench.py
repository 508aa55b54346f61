"""Benchmark `leukofhir run` against the local HAPI server, against a bare `requests` loop paging the same searches.

Usage: .venv/bin/python benchmarks/pipeline_bench.py [--observations 100000] [--small 10000] [--port 8790]
                                                      [--fhir-url URL] [--data DIR]

Starts its own HAPI server (scripts/fhir-server, a fresh data folder, port --port) unless --fhir-url is given; loads
two generated populations (Patients, CBC Observations in DiagnosticReports, MedicationStatements): a small one dated
2015 and a large one dated 2016-2019, so that a clinical-date window selects either. Then, in one run:
  `leukofhir run` over the small window (its peak RSS) → bare loop (the pipeline's own searches: touched patients,
  then each batch's whole-history searches, every page fetched and decoded with plain requests) → `leukofhir run`
  over the whole window (first run: writes its Flags) → bare loop → `leukofhir run` again (converged: reads
  everything, writes nothing). Prints Observations/s, the ratio bare / pipeline (target >= 0.8), Flag writes/s, where
  the time goes, and the peak RSS of the small and the large run (target: large within 1.5x of small). Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from evaluate_bench import generate  # noqa: E402  (the same generated CBCs as the evaluate benchmark)

from leukofhir.config import load_config  # noqa: E402
from leukofhir.extract.search import (  # noqa: E402
    PAGE_SIZE,
    Window,
    history_searches,
    patient_batches,
    touched_patients,
    window_searches,
)
from leukofhir.fhir.client import FhirClient  # noqa: E402
from leukofhir.run import BATCH_SIZE  # noqa: E402
from leukofhir.write.load import load_files  # noqa: E402

SMALL = ("s", datetime(2015, 1, 1, tzinfo=timezone.utc), 360, "2015-01-01", "2016-01-01")
LARGE = ("l", datetime(2016, 1, 1, tzinfo=timezone.utc), 4 * 360, "2015-01-01", "2020-01-01")


def start_server(port: int, data: Path) -> str:
    env = dict(os.environ, FHIR_PORT=str(port), FHIR_DATA_DIR=str(data))
    done = subprocess.run([str(ROOT / "scripts" / "fhir-server"), "start"], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the FHIR server did not start:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def stop_server(port: int) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "fhir-server"), "stop"], env=dict(os.environ, FHIR_PORT=str(port)), capture_output=True
    )


def bare_loop(base_url: str, window: Window, types: Counter | None = None) -> tuple[float, int, int]:
    """The pipeline's searches with plain requests: every page fetched (GET, or POST _search for long queries, as
    the client does) and decoded. Returns (seconds, pages, Observations); `types` counts every resource read."""
    rules = load_config()
    session = requests.Session()
    session.headers.update({"Accept": "application/fhir+json", "Cache-Control": "no-cache"})
    pages = observations = 0
    begin = time.perf_counter()

    def page_through(resource_type: str, params: dict) -> list[dict]:
        nonlocal pages, observations
        params = {**params, "_count": PAGE_SIZE}
        if len(requests.models.RequestEncodingMixin._encode_params(params)) > 2000:
            answer = session.post(f"{base_url}/{resource_type}/_search", data=params, timeout=300)
        else:
            answer = session.get(f"{base_url}/{resource_type}", params=params, timeout=300)
        resources = []
        while True:
            bundle = answer.json()
            pages += 1
            entries = [e["resource"] for e in bundle.get("entry") or [] if "resource" in e]
            observations += sum(1 for r in entries if r["resourceType"] == "Observation")
            if types is not None:
                types.update(r["resourceType"] for r in entries)
            resources += entries
            link = next((k["url"] for k in bundle.get("link") or [] if k["relation"] == "next"), None)
            if not link:
                return resources
            answer = session.get(link, timeout=300)

    patients: set[str] = set()
    for resource_type, params in window_searches(window, rules):
        for r in page_through(resource_type, {**params, "_elements": "subject"}):
            ref = (r.get("subject") or {}).get("reference", "")
            if ref.startswith("Patient/"):
                patients.add(ref[8:])
    for batch in patient_batches(sorted(patients), BATCH_SIZE):
        for resource_type, params in history_searches(rules, batch):
            page_through(resource_type, params)
    return time.perf_counter() - begin, pages, observations


def pipeline(base_url: str, since: str, until: str, out: Path) -> dict:
    """`leukofhir run` in a fresh process; returns its report, with its wall time and that process's own peak RSS
    (`peak_rss_mb`: from its rusage when it is reaped, so no other child of this script's counts)."""
    begin = time.perf_counter()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as errors:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "leukofhir.cli",
                "run",
                "--fhir-url",
                base_url,
                "--since",
                since,
                "--until",
                until,
                "--window-field",
                "effective",
                "--out",
                str(out),
                "--timeout",
                "300",
            ],
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        # wait4, not wait: the rusage of this one child (and what it reaped), where RUSAGE_CHILDREN would give the
        # largest of every child this script has waited for (a server's start-up script, say).
        _, status, usage = os.wait4(process.pid, 0)
        # Told to the Popen too: it would otherwise try to reap a child that is gone.
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - begin
        if process.returncode:
            errors.seek(0)
            sys.exit(f"leukofhir run failed ({process.returncode}):\n{errors.read()[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    report["wall_seconds"] = seconds
    report["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--observations", type=int, default=100_000, help="Observations in the whole window")
    parser.add_argument("--small", type=int, default=10_000, help="Observations in the small window")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--fhir-url", help="an already loaded server (skips starting and loading)")
    parser.add_argument("--data", help="folder for the generated NDJSON and the HAPI data (default: temporary)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.data or tmp)
        base_url = args.fhir_url
        started = base_url is None
        if started:
            base_url = start_server(args.port, work / "hapi")
        try:
            if started:
                sizes = ((SMALL, args.small), (LARGE, args.observations - args.small))
                for (prefix, start, days, _, _), count in sizes:
                    folder = work / f"data-{prefix}"
                    folder.mkdir(parents=True, exist_ok=True)
                    generate(folder, count, prefix=prefix, start=start, days=days)
                    begin = time.perf_counter()
                    with FhirClient(base_url, timeout=600) as client:
                        loaded = load_files(client, [str(folder)], batch_size=500)
                    total = sum(loaded.written.values())
                    seconds = time.perf_counter() - begin
                    print(
                        f"loaded {total:,} resources ({count:,} Observations) in {seconds:.0f} s "
                        f"({total / seconds:,.0f} resources/s)",
                        flush=True,
                    )
                    if not loaded.ok:
                        sys.exit(f"load refused {len(loaded.rejected)} resources: {loaded.rejected[:3]}")
            window = Window.parse(LARGE[3], LARGE[4], "effective")
            with FhirClient(base_url) as client:
                touched = len(touched_patients(client, window, load_config()))
            print(f"window {LARGE[3]} to {LARGE[4]} (effective): {touched:,} patients touched", flush=True)

            small = pipeline(base_url, SMALL[3], SMALL[4], work / "run-small")
            small_rss = small["peak_rss_mb"]
            small_obs = small["read"].get("Observation", 0)
            print(
                f"small window run: {small_obs:,} Observations in {small['wall_seconds']:.1f} s, peak RSS "
                f"{small_rss:,.0f} MB",
                flush=True,
            )
            bare1, pages, obs = bare_loop(base_url, window)
            print(f"bare requests loop: {pages:,} pages, {obs:,} Observations in {bare1:.1f} s", flush=True)
            first = pipeline(base_url, LARGE[3], LARGE[4], work / "run-first")
            bare2, _, _ = bare_loop(base_url, window)
            print(f"bare requests loop again: {bare2:.1f} s", flush=True)
            again = pipeline(base_url, LARGE[3], LARGE[4], work / "run-again")
            large_rss = max(first["peak_rss_mb"], again["peak_rss_mb"])
            for name, run, bare in (
                ("first run (writes the Flags)", first, bare1),
                ("converged re-run (writes nothing)", again, bare2),
            ):
                run_obs = run["read"].get("Observation", 0)
                steps = ", ".join(f"{k} {v:.1f} s" for k, v in run["seconds"].items() if k != "total")
                print(
                    f"leukofhir run, {name}: {run_obs:,} Observations in {run['wall_seconds']:.1f} s "
                    f"= {run_obs / run['wall_seconds']:,.0f} Observations/s; ratio bare / pipeline "
                    f"{bare / run['wall_seconds']:.2f} (target >= 0.8); steps: {steps}; writes {run['writes']}"
                )
            written = sum(first["writes"][k] for k in ("create", "update", "withdraw"))
            print(
                f"Flag writes: {written:,} in {first['seconds']['write']:.1f} s "
                f"= {written / max(first['seconds']['write'], 1e-9):,.0f} Flags/s"
            )
            print(
                f"peak RSS: {small_obs:,}-Observation window {small_rss:,.0f} MB; "
                f"{again['read'].get('Observation', 0):,}-Observation window {large_rss:,.0f} MB = "
                f"{large_rss / small_rss:.2f}x (target <= 1.5x)"
            )
        finally:
            if started:
                stop_server(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
