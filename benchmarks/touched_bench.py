"""Memory of the steps that hold every touched patient of a window: `find_patients` (the searches' subjects, cut into
chunks) and the export's split into chunks (`split_export`), each measured in a process of its own.

Usage: .venv/bin/python benchmarks/touched_bench.py --fhir-url URL --data DIR [--load 200000]
           [--window 2021-01-01/2022-01-01] [--steps find,export,split] [--chunks 8]

--load N first loads N new Patients with one WBC Observation each (ids `t<N>-p<i>`, results dated in 2021, every
tenth low), so that the window 2021 touches N patients; without it the window is read as the server holds it (the
1,000,000-Observation server of server_bench.py touches 20,000 patients in 2015-2020). Steps, each a child process:
  find    leukofhir.run.find_patients over the window (searching), into DIR/run-find-<window>;
  export  leukofhir.extract.bulk.run_exports over the window into DIR/export-<window> (the server's `$export`; kept);
  split   leukofhir.extract.bulk.split_export of that export into DIR/run-split-<window> (the export kept).
Each prints one JSON line: patients touched, seconds, the process's peak RSS, and its RSS just before the step (the
imports and the rules), so the step's own share is the difference. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def generate(folder: Path, patients: int, prefix: str) -> None:
    """One Patient and one WBC Observation each, dated in 2021; every tenth count low (2.1 10*3/uL)."""
    rng = random.Random(11)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "Patient.ndjson", "w") as pf, open(folder / "Observation.ndjson", "w") as of:
        for i in range(patients):
            pid = f"{prefix}p{i}"
            pf.write(json.dumps({"resourceType": "Patient", "id": pid, "gender": rng.choice(["male", "female"])}))
            pf.write("\n")
            when = f"2021-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00Z"
            value = 2.1 if i % 10 == 0 else round(rng.uniform(4.5, 10.5), 1)
            observation = {
                "resourceType": "Observation",
                "id": f"{prefix}o{i}",
                "status": "final",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                "code": "laboratory",
                            }
                        ]
                    }
                ],
                "code": {"coding": [{"system": "http://loinc.org", "code": "6690-2"}]},
                "subject": {"reference": f"Patient/{pid}"},
                "effectiveDateTime": when,
                "valueQuantity": {
                    "value": value,
                    "unit": "10*3/uL",
                    "system": "http://unitsofmeasure.org",
                    "code": "10*3/uL",
                },
            }
            of.write(json.dumps(observation))
            of.write("\n")


def load(base_url: str, data: Path, patients: int) -> None:
    from leukofhir.fhir.client import FhirClient
    from leukofhir.write.load import load_files

    folder = data / f"input-t{patients}"
    if not (folder / "Observation.ndjson").exists():
        generate(folder, patients, prefix=f"t{patients}-")
    begin = time.perf_counter()
    with FhirClient(base_url, timeout=600) as client:
        report = load_files(client, [str(folder)], batch_size=500, workers=4)
    if not report.ok:
        sys.exit(f"the load did not go through: {report.rejected[:3]} {report.stopped or ''}")
    written = sum(report.written.values())
    seconds = time.perf_counter() - begin
    print(
        json.dumps(
            {"step": "load", "resources": written, "seconds": round(seconds, 1), "per_second": round(written / seconds)}
        )
    )


def child(step: str, base_url: str, data: Path, since: str, until: str, chunks: int) -> None:
    """One step in this process: its peak RSS is the step's (with the imports, measured before it)."""
    from leukofhir.config import load_config
    from leukofhir.extract.bulk import run_exports, split_export
    from leukofhir.extract.search import Window
    from leukofhir.fhir.client import FhirClient
    from leukofhir.run import find_patients

    rules = load_config()
    window = Window.parse(since, until, "effective")
    export_dir = data / f"export-{since}-{until}"
    find_dir, split_dir = data / f"run-find-{since}-{until}", data / f"run-split-{since}-{until}"
    before = rss_now_mb()
    begin = time.perf_counter()
    with FhirClient(base_url, timeout=600) as client:
        if step == "find":
            made = find_patients(client, rules, find_dir, window=window, chunks=chunks)
            touched = json.loads((find_dir / "run.json").read_text())["patients_touched"]
            extra = {"chunks": len(made)}
        elif step == "export":
            counts = run_exports(client, rules, export_dir, window)
            touched = None
            extra = {"exported": counts}
        else:
            made = split_export(
                export_dir,
                split_dir,
                client.base_url,
                rules,
                window,
                chunks=chunks,
                client=client,
                keep_export=True,
            )
            touched = json.loads((split_dir / "run.json").read_text())["patients_touched"]
            extra = {"chunks": len(made)}
    print(
        json.dumps(
            {
                "step": step,
                "window": f"{since}/{until}",
                "patients_touched": touched,
                "seconds": round(time.perf_counter() - begin, 1),
                "rss_before_mb": round(before),
                "peak_rss_mb": round(peak_mb()),
                "step_mb": round(peak_mb() - before),
                **extra,
            }
        ),
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fhir-url", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--load", type=int, default=0, help="load N one-result patients dated 2021 first")
    parser.add_argument("--window", default="2021-01-01/2022-01-01")
    parser.add_argument("--steps", default="find,export,split")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    since, until = args.window.split("/")
    if args.child:
        child(args.child, args.fhir_url, data, since, until, args.chunks)
        return 0
    if args.load:
        load(args.fhir_url, data, args.load)
    for step in args.steps.split(","):
        command = [sys.executable, __file__, "--fhir-url", args.fhir_url, "--data", str(data), "--window", args.window]
        subprocess.run([*command, "--chunks", str(args.chunks), "--child", step], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
