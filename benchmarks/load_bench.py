"""Benchmark loading generated data into HAPI through its FHIR API: `leukofhir load` with N workers and B resources per
transaction, and HAPI's Bulk Data `$import`, on H2 or PostgreSQL.

Usage: .venv/bin/python benchmarks/load_bench.py [--db h2|postgres] [--port 8510] [--observations 10000]
           [--trials 1x200,2x200,4x200] [--import] [--data DIR] [--fhir-url URL --prefix P]

Starts its own server (scripts/fhir-server, FHIR_DB=--db, a fresh data folder under --data) unless --fhir-url is given;
then, for each trial `WxB`, loads a new population of --observations CBC Observations (benchmarks/evaluate_bench.py's
generator: Patients, DiagnosticReports, MedicationStatements; ids prefixed per trial, so every trial writes new
resources into the same, growing database) with `load_files(..., batch_size=B, workers=W)`; `--import` adds a trial of
`$import` (the NDJSON files served to HAPI over HTTP on loopback, one import job per resource type, types in load
order). Prints resources/s, the server's CPU seconds per resource (HAPI's JVM and PostgreSQL's processes, /proc) and
the load average before and after. Not a timed test.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from evaluate_bench import generate  # noqa: E402
from server_costs import cpu, cpu_used, load_average, postmaster_pid, start_server, stop_server  # noqa: E402

from leukofhir.fhir.client import FhirClient  # noqa: E402
from leukofhir.write.load import TYPE_ORDER, load_files  # noqa: E402


def population(data: Path, name: str, observations: int) -> Path:
    """The generated NDJSON of one trial (kept in `data` and reused by a later run)."""
    folder = data / f"{name}-{observations}"
    if not (folder / "Observation.ndjson").exists():
        folder.mkdir(parents=True, exist_ok=True)
        generate(folder, observations, prefix=f"{name}-")
    return folder


def count_lines(folder: Path) -> int:
    return sum(sum(1 for _ in open(f)) for f in folder.glob("*.ndjson"))


def bulk_import(base_url: str, folder: Path, port: int) -> None:
    """`$import` of the folder's NDJSON, one job per type in load order (a job runs its files' chunks in parallel, so
    Observations in the same job as their Patients could be written first); the files served on 127.0.0.1:`port`."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    session = requests.Session()
    try:
        for rtype in sorted((f.stem for f in folder.glob("*.ndjson")), key=TYPE_ORDER.index):
            body = {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "inputFormat", "valueCode": "application/fhir+ndjson"},
                    {"name": "inputSource", "valueUri": f"http://127.0.0.1:{port}/"},
                    {
                        "name": "storageDetail",
                        "part": [
                            {"name": "type", "valueCode": "https"},
                            {"name": "maxBatchResourceCount", "valueString": "500"},
                        ],
                    },
                    {
                        "name": "input",
                        "part": [
                            {"name": "type", "valueCode": rtype},
                            {"name": "url", "valueUri": f"http://127.0.0.1:{port}/{rtype}.ndjson"},
                        ],
                    },
                ],
            }
            answer = session.post(
                f"{base_url}/$import",
                json=body,
                timeout=300,
                headers={"Prefer": "respond-async", "Content-Type": "application/fhir+json"},
            )
            if answer.status_code != 202:
                sys.exit(f"$import of {rtype}: HTTP {answer.status_code} {answer.text[:1000]}")
            poll = answer.headers["Content-Location"]
            while True:
                status = session.get(poll, timeout=300)
                if status.status_code == 200:
                    break
                if status.status_code != 202:
                    sys.exit(f"$import of {rtype}: HTTP {status.status_code} {status.text[:2000]}")
                time.sleep(1)
            print(f"  $import {rtype}: {status.text[:300]!r}", flush=True)
    finally:
        server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {".ndjson": "application/fhir+ndjson"}  # HAPI checks the files' Content-Type

    def log_message(self, *args) -> None:  # no line per request on stderr
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["h2", "postgres"], default="h2")
    parser.add_argument("--port", type=int, default=8510)
    parser.add_argument("--observations", type=int, default=10_000, help="Observations per trial")
    parser.add_argument("--trials", default="1x200,2x200,4x200", help="WORKERSxBATCH, comma-separated, in order")
    parser.add_argument("--import", dest="bulk_import", action="store_true", help="also a trial of $import")
    parser.add_argument("--data", help="folder for the generated NDJSON and the server's data (default: temporary)")
    parser.add_argument(
        "--fhir-url", help="a running server (its CPU measured if scripts/fhir-server runs it on --port)"
    )
    parser.add_argument("--prefix", default="t", help="id prefix of the trials' populations (new ones per run)")
    args = parser.parse_args()
    work = Path(args.data or tempfile.mkdtemp(prefix="leukofhir-load-bench-", dir="/tmp"))
    base_url = args.fhir_url or start_server(args.port, work / "server", args.db)
    db = "postgres" if postmaster_pid(args.port) else "h2"  # a server given by --fhir-url: what it runs on
    trials = [tuple(int(v) for v in t.split("x")) for t in args.trials.split(",") if t]
    if args.bulk_import:
        trials.append(("import", 0))
    try:
        with FhirClient(base_url, timeout=600) as client:
            for number, (workers, batch) in enumerate(trials, 1):
                folder = population(work / "input", f"{args.prefix}{number}", args.observations)
                resources = count_lines(folder)
                before, load_before, begin = cpu(args.port), load_average(), time.perf_counter()
                if workers == "import":
                    bulk_import(base_url, folder, args.port + 2)
                    written = resources
                else:
                    report = load_files(client, sorted(folder.glob("*.ndjson")), batch_size=batch, workers=workers)
                    if not report.ok:
                        sys.exit(f"the load did not go through: {report.rejected[:3]} {report.stopped or ''}")
                    written = sum(report.written.values())
                seconds = time.perf_counter() - begin
                used = cpu_used(before, cpu(args.port))
                per = {k: round(v / written * 1000, 2) for k, v in used.items()}
                label = "$import" if workers == "import" else f"{workers} worker(s) x {batch}"
                print(
                    json.dumps(
                        {
                            "db": db,
                            "trial": number,
                            "how": label,
                            "resources": written,
                            "seconds": round(seconds, 1),
                            "per_second": round(written / seconds),
                            "cpu_seconds": used,
                            "cpu_ms_per_resource": per,
                            "load_average": [load_before, load_average()],
                        }
                    ),
                    flush=True,
                )
    finally:
        if not args.fhir_url:
            stop_server(args.port)
        if not args.data:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
