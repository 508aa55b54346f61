"""Measure what a row costs in memory when `leukofhir evaluate` holds it: peak RSS per row, by kind of row.

Usage: .venv/bin/python benchmarks/row_cost_bench.py [--small N] [--large N] [--dir DIR]
Evaluates, in memory and each in a fresh process, inputs of two sizes of three shapes (benchmarks/evaluate_bench.py's
generators): compact Observations (only what the rules read), MedicationStatements, and the verbose Synthea-like CBCs
with their DiagnosticReports. The slope of peak RSS between the two sizes, over the rows added, is the cost of a row;
the intercept is the process's fixed base. Prints the costs that leukofhir.evaluate.partition's ROW_COST_* constants
hold. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_bench import DRUGS, generate, generate_compact  # noqa: E402

from leukofhir.normalise.exposures import MEDICATION_KINDS  # noqa: E402


def generate_medications(folder: Path, statements: int, seed: int = 7) -> None:
    """`statements` MedicationStatements (as evaluate_bench.generate writes them) over statements/10 Patients."""
    rng = random.Random(seed)
    start = datetime(2020, 1, 1, tzinfo=timezone.utc)
    patients = max(1, statements // 10)
    with open(folder / "Patient.ndjson", "w") as fh:
        for p in range(patients):
            fh.write(
                json.dumps({"resourceType": "Patient", "id": f"p{p}", "gender": "female", "birthDate": "1960-01-01"})
                + "\n"
            )
    with open(folder / "MedicationStatement.ndjson", "w") as fh:
        for m in range(statements):
            begin = start + timedelta(days=rng.randint(0, 1000))
            fh.write(
                json.dumps(
                    {
                        "resourceType": "MedicationStatement",
                        "id": f"m{m}",
                        "status": "active",
                        "medicationCodeableConcept": {"text": rng.choice(DRUGS)},
                        "subject": {"reference": f"Patient/p{rng.randrange(patients)}"},
                        "effectivePeriod": {
                            "start": begin.isoformat(),
                            "end": (begin + timedelta(days=120)).isoformat(),
                        },
                    }
                )
            )
            fh.write("\n")


SHAPES = {"compact": generate_compact, "medications": generate_medications, "synthea": generate}


def child(folder: Path, out: Path) -> None:
    """Evaluate in memory in this fresh process; print the rows read by kind and the peak RSS."""
    import resource

    from leukofhir.evaluate.pipeline import evaluate_files

    report = evaluate_files([str(folder)], out, progress=False, memory_budget="1TB")
    assert "partitions" not in report
    print(json.dumps({"read": report["read"], "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def measure(root: Path, shape: str, size: int) -> dict:
    folder = root / f"{shape}-{size}"
    if not folder.exists():
        folder.mkdir(parents=True)
        SHAPES[shape](folder, size)
    run = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), str(root / f"{shape}-{size}-out")],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    read = result["read"]
    result["rows"] = {
        "Observation": read.get("Observation", 0),
        "medication": sum(read.get(k, 0) for k in MEDICATION_KINDS),
        "other": sum(v for k, v in read.items() if k != "Observation" and k not in MEDICATION_KINDS),
    }
    result["bytes"] = sum(p.stat().st_size for p in folder.iterdir())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=100_000, help="rows of the smaller input of each shape")
    parser.add_argument("--large", type=int, default=400_000, help="rows of the larger input of each shape")
    parser.add_argument("--dir", help="folder for the generated inputs (default: a temporary one)")
    parser.add_argument("--child", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir) if args.dir else Path(tmp)
        slopes, bases = {}, []
        for shape in SHAPES:
            small, large = measure(root, shape, args.small), measure(root, shape, args.large)
            rows = {k: large["rows"][k] - small["rows"][k] for k in large["rows"]}
            delta = (large["peak_kb"] - small["peak_kb"]) * 1024
            slopes[shape] = (delta, rows)
            total = sum(rows.values())
            bases.append(small["peak_kb"] * 1024 - delta / total * sum(small["rows"].values()))
            print(
                f"{shape}: {small['rows']} rows ({small['bytes'] / 2**20:,.0f} MB) peak "
                f"{small['peak_kb'] / 1024:,.0f} MB; {large['rows']} rows ({large['bytes'] / 2**20:,.0f} MB) peak "
                f"{large['peak_kb'] / 1024:,.0f} MB; {delta / total:,.0f} bytes per row, "
                f"{delta / (large['bytes'] - small['bytes']):.2f} per byte"
            )
        # Compact: Observations (and their Patients, a tenth as many: charged to the Observations, a margin).
        delta, rows = slopes["compact"]
        observation = delta / (rows["Observation"] + rows["other"])
        delta, rows = slopes["medications"]
        medication = delta / (rows["medication"] + rows["other"])
        # Synthea-like: what its Observations and MedicationStatements do not explain goes to its other rows (the
        # DiagnosticReports listing them; their verbose Observations' extra strings too).
        delta, rows = slopes["synthea"]
        other = max(0.0, delta - observation * rows["Observation"] - medication * rows["medication"]) / rows["other"]
        print(
            f"bytes per row: Observation {observation:,.0f}, medication {medication:,.0f}, other {other:,.0f}; "
            f"fixed base (intercept) {min(bases) / 2**20:,.0f}-{max(bases) / 2**20:,.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
