"""Benchmark `leukofhir evaluate`: N realistic Observations (default 1,000,000) vs a plain json.loads loop.

Usage: .venv/bin/python benchmarks/evaluate_bench.py [--observations N] [--dir DIR] [--memory-budget SIZE]
                                                      [--workers N] [--skip-loads]
Prints Observations/s (wall and per CPU second), the ratio to json.loads over the same files in the same run, peak RSS
of the evaluate process (and of its largest partition process), the peak of the sum of RSS and of PSS over all its
processes at one instant (sampled), whether and how the input was partitioned (leukofhir.evaluate.partition),
and the time spent in Great Expectations validation vs the rest. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

# A CBC with differential as a lab reports it: (LOINC, unit, reference low, reference high). About 2 % of WBC
# results are low, as in a hospital population; ANC and lymphocytes are fractions of the same WBC.
PANEL = [
    ("6690-2", "10*3/uL", 4.0, 11.0),
    ("751-8", "10*3/uL", 1.8, 7.7),
    ("731-0", "10*3/uL", 1.0, 4.8),
    ("718-7", "g/dL", 12.0, 17.5),
    ("777-3", "10*3/uL", 150, 400),
]


def _panel_values(rng: random.Random) -> list[float]:
    wbc = max(0.1, rng.gauss(7.2, 1.6))
    return [
        wbc,
        wbc * rng.uniform(0.45, 0.7),
        wbc * rng.uniform(0.22, 0.38),
        rng.gauss(14.2, 1.3),
        max(5.0, rng.gauss(260, 55)),
    ]


DRUGS = [
    "Clozapine 100 MG Oral Tablet",
    "Valproic Acid 250 MG",
    "Cisplatin 50 MG Injection",
    "Simvastatin 20 MG",
    "Amoxicillin 500 MG",
]


def generate(
    folder: Path,
    observations: int,
    seed: int = 7,
    *,
    prefix: str = "",
    start: datetime = datetime(2020, 1, 1, tzinfo=timezone.utc),
    days: int = 1500,
) -> None:
    """Patients, CBC Observations grouped in DiagnosticReports, and MedicationStatements, as NDJSON: ids start with
    `prefix`, results are dated in the `days` after `start` (benchmarks/pipeline_bench.py loads two such sets)."""
    rng = random.Random(seed)
    panels = observations // len(PANEL)
    patients = max(1, panels // 10)
    with open(folder / "Patient.ndjson", "w") as fh:
        for p in range(patients):
            fh.write(
                json.dumps(
                    {
                        "resourceType": "Patient",
                        "id": f"{prefix}p{p}",
                        "gender": rng.choice(["male", "female"]),
                        "birthDate": f"{rng.randint(1930, 2020)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
                    }
                )
            )
            fh.write("\n")
    with open(folder / "MedicationStatement.ndjson", "w") as fh:
        for m in range(patients // 4):
            begin = start + timedelta(days=rng.randint(0, days * 2 // 3))
            fh.write(
                json.dumps(
                    {
                        "resourceType": "MedicationStatement",
                        "id": f"{prefix}m{m}",
                        "status": "active",
                        "medicationCodeableConcept": {"text": rng.choice(DRUGS)},
                        "subject": {"reference": f"Patient/{prefix}p{rng.randrange(patients)}"},
                        "effectivePeriod": {
                            "start": begin.isoformat(),
                            "end": (begin + timedelta(days=120)).isoformat(),
                        },
                    }
                )
            )
            fh.write("\n")
    obs_count = 0
    with open(folder / "Observation.ndjson", "w") as obs, open(folder / "DiagnosticReport.ndjson", "w") as reports:
        for panel in range(panels):
            patient = f"Patient/{prefix}p{panel % patients}"
            when = (start + timedelta(minutes=rng.randint(0, 60 * 24 * days))).strftime("%Y-%m-%dT%H:%M:%SZ")
            ids = []
            for (code, unit, low, high), value in zip(PANEL, _panel_values(rng)):
                oid = f"{prefix}o{obs_count}"
                obs_count += 1
                ids.append(oid)
                value = round(value, 2)
                obs.write(
                    json.dumps(
                        {
                            "resourceType": "Observation",
                            "id": oid,
                            "meta": {"versionId": "1"},
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
                            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                            "subject": {"reference": patient},
                            "effectiveDateTime": when,
                            "issued": when,
                            "valueQuantity": {
                                "value": value,
                                "unit": unit,
                                "system": "http://unitsofmeasure.org",
                                "code": unit,
                            },
                            "referenceRange": [
                                {
                                    "low": {
                                        "value": low,
                                        "unit": unit,
                                        "system": "http://unitsofmeasure.org",
                                        "code": unit,
                                    },
                                    "high": {
                                        "value": high,
                                        "unit": unit,
                                        "system": "http://unitsofmeasure.org",
                                        "code": unit,
                                    },
                                }
                            ],
                        }
                    )
                )
                obs.write("\n")
            reports.write(
                json.dumps(
                    {
                        "resourceType": "DiagnosticReport",
                        "id": f"{prefix}r{panel}",
                        "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
                        "subject": {"reference": patient},
                        "effectiveDateTime": when,
                        "result": [{"reference": f"Observation/{i}"} for i in ids],
                    }
                )
            )
            reports.write("\n")


def generate_compact(
    folder: Path,
    observations: int,
    seed: int = 7,
    start: datetime = datetime(2020, 1, 1, tzinfo=timezone.utc),
    days: int = 1500,
) -> None:
    """The same patients and CBC values as `generate`, as compact NDJSON (about 340 bytes an Observation, as some
    exports are): each Observation only what the rules read (LOINC code, subject, effectiveDateTime, valueQuantity
    with its UCUM code, status), no DiagnosticReports, no MedicationStatements. Many rows in few bytes."""
    rng = random.Random(seed)
    panels = observations // len(PANEL)
    patients = max(1, panels // 10)
    with open(folder / "Patient.ndjson", "w") as fh:
        for p in range(patients):
            fh.write(
                json.dumps(
                    {
                        "resourceType": "Patient",
                        "id": f"p{p}",
                        "gender": rng.choice(["male", "female"]),
                        "birthDate": f"{rng.randint(1930, 2020)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
                    }
                )
            )
            fh.write("\n")
    obs_count = 0
    with open(folder / "Observation.ndjson", "w") as obs:
        for panel in range(panels):
            patient = f"Patient/p{panel % patients}"
            when = (start + timedelta(minutes=rng.randint(0, 60 * 24 * days))).strftime("%Y-%m-%dT%H:%M:%SZ")
            for (code, unit, _, _), value in zip(PANEL, _panel_values(rng)):
                obs.write(
                    json.dumps(
                        {
                            "resourceType": "Observation",
                            "id": f"o{obs_count}",
                            "status": "final",
                            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                            "subject": {"reference": patient},
                            "effectiveDateTime": when,
                            "valueQuantity": {
                                "value": round(value, 2),
                                "unit": unit,
                                "system": "http://unitsofmeasure.org",
                                "code": unit,
                            },
                        }
                    )
                )
                obs.write("\n")
                obs_count += 1


SHAPES = {"synthea": generate, "compact": generate_compact}


def _tree(root: int) -> list[int]:
    """`root` and every process descended from it, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def sample_tree(root: int, stop: threading.Event, peak: dict) -> None:
    """Every 0.25 s, the sum of RSS and of PSS (/proc/PID/smaps_rollup) over `root`'s process tree at that instant:
    the memory the run holds at once (the evaluate process and its partition processes together), kept at its max."""
    while not stop.wait(0.25):
        rss = pss = 0
        pids = _tree(root)
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            except OSError:
                continue
        if rss > peak["rss_kb"]:
            peak.update(rss_kb=rss, processes=len(pids))
        peak["pss_kb"] = max(peak["pss_kb"], pss)


def json_loads_seconds(folder: Path) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, lines) of a plain json.loads loop over the input."""
    count = 0
    begin, cpu = time.perf_counter(), time.process_time()
    for path in sorted(folder.glob("*.ndjson")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                json.loads(line)
                count += 1
    return time.perf_counter() - begin, time.process_time() - cpu, count


def child(folder: Path, out: Path, memory_budget: str | None = None, workers: int = 1) -> None:
    """Run evaluate in this (fresh) process, timing validation separately; print one JSON line."""
    import leukofhir.evaluate.pipeline as pipeline
    import leukofhir.evaluate.validate as validate

    # leukofhir is imported outside the timed run; Great Expectations is not: validate.py imports it on the first
    # validation, inside the run, and that cost is counted as validation (and reported apart as "GX setup").
    spent = {"validate": 0.0, "gx_setup": 0.0}
    real = pipeline.validate_batch
    real_context = validate._context

    def timed_context():
        begin = time.perf_counter()
        try:
            return real_context()
        finally:
            spent["gx_setup"] += time.perf_counter() - begin

    validate._context = timed_context

    def timed(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent["validate"] += time.perf_counter() - begin

    pipeline.validate_batch = timed
    begin = time.perf_counter()
    report = pipeline.evaluate_files([str(folder)], out, progress=False, memory_budget=memory_budget, workers=workers)
    total = time.perf_counter() - begin
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # A partitioned run evaluates each partition in a process of its own: the largest of them.
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": total,
                "validate_seconds": spent["validate"],
                "gx_setup_seconds": spent["gx_setup"],
                "peak_rss_mb": peak_kb / 1024,
                "worker_peak_rss_mb": workers_kb / 1024,
                "partitions": report.get("partitions"),
                "observations": report["read"].get("Observation", 0),
                "read_total": report["read_total"],
                "flags": report["flags"]["total"],
                "reconciled": report["reconciled"],
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--observations", type=int, default=1_000_000)
    parser.add_argument("--dir", help="folder for the generated NDJSON (default: a temporary one)")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="synthea",
        help="synthea: verbose CBCs with DiagnosticReports and MedicationStatements (default); "
        "compact: only what the rules read, about 340 bytes an Observation",
    )
    parser.add_argument("--memory-budget", help="evaluate's --memory-budget (default: evaluate's own)")
    parser.add_argument("--workers", type=int, default=1, help="evaluate's --workers (default 1)")
    parser.add_argument("--skip-loads", action="store_true", help="skip the json.loads loop (a 10M input: minutes)")
    parser.add_argument("--child", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.memory_budget, args.workers)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir) if args.dir else Path(tmp) / "in"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "Observation.ndjson").exists():
            begin = time.perf_counter()
            SHAPES[args.shape](folder, args.observations)
            print(f"generated {args.observations:,} Observations in {time.perf_counter() - begin:.1f} s: {folder}")
        loads_s, loads_cpu, lines = json_loads_seconds(folder) if not args.skip_loads else (math.nan, math.nan, 0)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        options = ["--workers", str(args.workers)] + (
            ["--memory-budget", args.memory_budget] if args.memory_budget else []
        )
        # The output next to the input: the partitions' files go there too (a 10M input is about 8 GB of NDJSON).
        out = folder.parent / f"{folder.name}-out"
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(folder), str(out), *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stop, tree_peak = threading.Event(), {"rss_kb": 0, "pss_kb": 0, "processes": 0}
        sampler = threading.Thread(target=sample_tree, args=(proc.pid, stop, tree_peak), daemon=True)
        sampler.start()
        stdout, stderr = proc.communicate()
        stop.set()
        sampler.join()
        if proc.returncode:
            sys.exit(f"evaluate failed ({proc.returncode}):\n{stderr[-3000:]}")
        run = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds of the evaluate process (imports included): on a shared machine the wall-clock ratio moves with
        # the other users' load; CPU time much less, so it is printed beside it as a check.
        child_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        obs = result["observations"]
        evaluate_rate = obs / result["seconds"]
        print(f"json.loads loop: {lines:,} lines in {loads_s:.1f} s ({lines / loads_s:,.0f} lines/s)")
        print(
            f"evaluate: {result['read_total']:,} resources ({obs:,} Observations) in {result['seconds']:.1f} s "
            f"= {evaluate_rate:,.0f} Observations/s; {result['flags']:,} Flags; reconciled={result['reconciled']}"
        )
        ratio = loads_s / result["seconds"]
        print(f"ratio evaluate / json.loads (whole input, same run): {ratio:.2f}  (target >= 0.3)")
        print(
            f"same ratio in CPU time: json.loads {loads_cpu:.1f} s, evaluate process {child_cpu:.1f} s (with its "
            f"imports) = {loads_cpu / child_cpu:.2f}"
        )
        gx, setup = result["validate_seconds"], result["gx_setup_seconds"]
        rest = result["seconds"] - gx
        parts = result["partitions"]
        if parts:
            print(
                f"validation (Great Expectations): in the partitions' processes, not timed here; importing GX and "
                f"building its context, once before they fork: {setup:.1f} s"
            )
        else:
            # "Adds at most 25 % to the run time": GX's time over the time of everything else, shown with and
            # without GX's one-time import (a fixed cost per process, whatever the input size).
            print(
                f"validation (Great Expectations): {gx:.1f} s = {gx / result['seconds']:.0%} of the run; adds "
                f"{gx / rest:.0%} to the rest ({rest:.1f} s) (target <= 25%); of it, importing GX and building its "
                f"context {setup:.1f} s, validating {gx - setup:.1f} s (adds {(gx - setup) / rest:.0%})"
            )
        peak = max(result["peak_rss_mb"], result["worker_peak_rss_mb"])
        print(
            f"peak RSS: {peak:,.0f} MB  (target < 1536 MB)"
            + (
                f"; the evaluate process {result['peak_rss_mb']:,.0f} MB, its largest partition process "
                f"{result['worker_peak_rss_mb']:,.0f} MB"
                if parts
                else ""
            )
        )
        print(
            f"at once (sampled every 0.25 s, the evaluate process and its partition processes together): RSS sum "
            f"{tree_peak['rss_kb'] / 1024:,.0f} MB over {tree_peak['processes']} process(es), PSS sum "
            f"{tree_peak['pss_kb'] / 1024:,.0f} MB (forked pages shared between them counted once)"
        )
        print(
            f"CPU seconds of the evaluate process and its children: {child_cpu:.1f} s = "
            f"{obs / child_cpu:,.0f} Observations per CPU second"
        )
        print(
            "in memory (the input fits the memory budget)"
            if not parts
            else f"partitioned: input rows ({parts['estimated_rows']:,}) estimated "
            f"{parts['estimated'] / 2**20:,.0f} MB "
            f"over the budget {parts['memory_budget'] / 2**20:,.0f} MB: spilled to {parts['spilled']} files, "
            f"evaluated as {parts['evaluated']} partitions, {parts['workers']} worker(s); largest "
            f"{parts['largest_bytes'] / 2**20:,.0f} MB of JSON, its rows estimated at "
            f"{parts['largest_estimated'] / 2**20:,.0f} MB; largest peak RSS of a partition's process "
            f"{parts['largest_peak_rss'] / 2**20:,.0f} MB (report.json)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
