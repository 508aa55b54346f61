"""Benchmark what the FHIR server costs the pipeline, on H2 or PostgreSQL, at a given size: the load, a bare `requests`
pager over the pipeline's searches, and the server's `$export` of the backfill's resources, each with the server's CPU
seconds per resource served.

Usage: .venv/bin/python benchmarks/server_bench.py --db postgres --observations 100000 --data /tmp/i19/pg100k
           [--port 8510] [--workers 4] [--batch-size 500] [--steps load,pager,run,export] [--keep]

Starts its own server (scripts/fhir-server, FHIR_DB=--db, data under --data/server, kept across runs: a later run
with `--steps pager,export` measures the loaded server again). Steps:
  load    generates --observations CBC Observations as benchmarks/pipeline_bench.py does (a tenth dated 2015, the
          rest 2016-2019; with their DiagnosticReports, Patients, MedicationStatements: 1.225 resources per
          Observation) and loads them with `leukofhir load`'s loader (--workers, --batch-size);
  pager   pipeline_bench.py's bare `requests` loop over the pipeline's searches for the window 2015-2020 (the
          window's touched patients, then each batch of 100 patients' whole-history searches);
  run     `leukofhir run` over the same window (pipeline_bench.py's, in a process of its own: the touched patients,
          every history read, evaluated and its Flags written; a later run writes nothing), its ratio to the pager
          when both ran, and the run's peak RSS;
  export  `leukofhir.extract.bulk.run_exports` over the same window: the window's `$export` and the histories', both
          jobs at once (as the backfill DAG runs them);
  export-serial  the same, one job after the other (as before 2026-12-07).
Each step prints one JSON line: seconds, resources, resources/s, CPU seconds of HAPI's JVM and of PostgreSQL's
processes (/proc), their CPU milliseconds per resource, the load average before and after, and memory. Not a timed
test.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from evaluate_bench import generate  # noqa: E402
from pipeline_bench import LARGE, SMALL, bare_loop, pipeline  # noqa: E402
from server_costs import cpu, cpu_used, load_average, rss_mb, start_server, stop_server  # noqa: E402

from leukofhir.extract.search import Window  # noqa: E402
from leukofhir.fhir.client import FhirClient  # noqa: E402
from leukofhir.write.load import load_files  # noqa: E402


def measured(step: str, port: int, action, db: str) -> dict:
    """Run `action()` (returns (resources, extra dict)) and report its time and the server's CPU."""
    before, load_before, begin = cpu(port), load_average(), time.perf_counter()
    resources, extra = action()
    seconds = time.perf_counter() - begin
    used = cpu_used(before, cpu(port))
    result = {
        "db": db,
        "step": step,
        "resources": resources,
        "seconds": round(seconds, 1),
        "per_second": round(resources / seconds) if seconds else None,
        "cpu_seconds": used,
        "cpu_ms_per_resource": {k: round(v / max(resources, 1) * 1000, 3) for k, v in used.items()},
        "load_average": [load_before, load_average()],
        "rss_mb": rss_mb(port),
        **extra,
    }
    print(json.dumps(result), flush=True)
    return result


def load_step(base_url: str, data: Path, observations: int, workers: int, batch_size: int) -> tuple[int, dict]:
    small = observations // 10
    total, parts = 0, {}
    with FhirClient(base_url, timeout=600) as client:
        for (prefix, start, days, _, _), count in ((SMALL, small), (LARGE, observations - small)):
            folder = data / f"input-{prefix}-{count}"
            if not (folder / "Observation.ndjson").exists():
                folder.mkdir(parents=True, exist_ok=True)
                generate(folder, count, prefix=prefix, start=start, days=days)
            begin = time.perf_counter()
            report = load_files(client, [str(folder)], batch_size=batch_size, workers=workers)
            if not report.ok:
                sys.exit(f"the load did not go through: {report.rejected[:3]} {report.stopped or ''}")
            written = sum(report.written.values())
            parts[prefix] = {"resources": written, "seconds": round(time.perf_counter() - begin, 1)}
            total += written
    return total, {"workers": workers, "batch_size": batch_size, "parts": parts}


def pager_step(base_url: str) -> tuple[int, dict]:
    window = Window.parse(LARGE[3], LARGE[4], "effective")
    types: Counter = Counter()
    _, pages, observations = bare_loop(base_url, window, types)
    return sum(types.values()), {"pages": pages, "observations": observations, "types": dict(types)}


def run_step(base_url: str, out: Path) -> tuple[int, dict]:
    report = pipeline(base_url, LARGE[3], LARGE[4], out)
    read = report["read"]
    return sum(read.values()), {
        "read": read,
        "writes": report["writes"],
        "steps_seconds": report["seconds"],
        "peak_rss_mb": round(report["peak_rss_mb"]),  # the run's own process (pipeline_bench.pipeline)
    }


def export_step(base_url: str, out: Path, concurrent: bool = True) -> tuple[int, dict]:
    from leukofhir.config import load_config
    from leukofhir.extract.bulk import run_exports

    window = Window.parse(LARGE[3], LARGE[4], "effective")
    with FhirClient(base_url, timeout=600) as client:
        counts = run_exports(client, load_config(), out, window, concurrent=concurrent)
    return sum(n for export in counts.values() for n in export.values()), {"exported": counts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["h2", "postgres"], default="postgres")
    parser.add_argument("--observations", type=int, default=100_000)
    parser.add_argument("--data", required=True, help="folder for the generated NDJSON and the server's data")
    parser.add_argument("--port", type=int, default=8510)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--steps", default="load,pager,export")
    parser.add_argument("--heap", help="FHIR_SERVER_HEAP (default: the launcher's 2g)")
    parser.add_argument("--keep", action="store_true", help="leave the server running")
    args = parser.parse_args()
    data = Path(args.data)
    steps = args.steps.split(",")
    base_url = start_server(args.port, data / "server", args.db, args.heap)
    pager = None
    try:
        if "load" in steps:
            measured(
                "load",
                args.port,
                lambda: load_step(base_url, data, args.observations, args.workers, args.batch_size),
                args.db,
            )
        if "pager" in steps:
            pager = measured("pager", args.port, lambda: pager_step(base_url), args.db)
        if "run" in steps:
            result = measured("run", args.port, lambda: run_step(base_url, data / f"run-{int(time.time())}"), args.db)
            if pager:
                print(json.dumps({"ratio_pager_to_run": round(pager["seconds"] / result["seconds"], 2)}), flush=True)
        for step in ("export", "export-serial"):
            if step in steps:
                out = data / f"{step}-{int(time.time())}"
                measured(step, args.port, functools.partial(export_step, base_url, out, step == "export"), args.db)
    finally:
        if not args.keep:
            stop_server(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
