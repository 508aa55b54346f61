"""Benchmark the report's trend pictures and the board: what they add to a run, and what a big board costs.

Usage: .venv/bin/python benchmarks/pictures_bench.py [--observations N] [--flags N]
Evaluates N generated Observations (default 300,000; benchmarks/evaluate_bench.py's data) once, then times the
report's last stage with and without the trend series, interleaved, in the same run (a ratio: the machine is noisy);
prints the size of the pictures in report.json and report.html. Then counts N generated Flags (default 100,000) into
a Board and renders board.html: Flags/s and the page's size. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_bench import generate  # noqa: E402

from leukofhir.config import load_config  # noqa: E402
from leukofhir.evaluate.stages import build_flags, build_report, evaluate_rows, read_and_normalise, validate_rows  # noqa: E402
from leukofhir.evaluate.validate import suite_parameters  # noqa: E402
from leukofhir.report.board import Board, render_board  # noqa: E402
from leukofhir.report.html import render_report  # noqa: E402


def _best(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def pictures(observations: int) -> None:
    rules = load_config()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), observations)
        t0 = time.perf_counter()
        read = read_and_normalise([tmp], rules, progress=False)
        parameters = suite_parameters(rules)
        validated = validate_rows(read.normalised, parameters)
        evaluation = evaluate_rows(validated.observations, validated.exposures, read.normalised.patients, rules)
        checked = build_flags(evaluation.specs, rules, parameters)
        stages = time.perf_counter() - t0
    without = with_trends = float("inf")
    for _ in range(3):  # interleaved, best of each
        without = min(without, _best(lambda: build_report([], read, validated, evaluation, checked), 1))
        with_trends = min(with_trends, _best(lambda: build_report([], read, validated, evaluation, checked, rules), 1))
    report, _ = build_report([], read, validated, evaluation, checked, rules)
    plain, _ = build_report([], read, validated, evaluation, checked)
    trends_json = len(json.dumps(report["trends"]))
    html_with, html_without = len(render_report(report)), len(render_report(plain))
    print(f"{observations:,} Observations, {len(checked.flags):,} Flags; read..build_flags {stages:.1f} s")
    print(
        f"trend series: +{with_trends - without:.3f} s ({with_trends - without:.3f} / {stages:.1f} s of the stages, "
        f"{(with_trends - without) / stages:.2%}); {len(report['trends'])} pictures, {trends_json / 1024:.0f} kB "
        f"in report.json, report.html {html_without / 1024:.0f} kB -> {html_with / 1024:.0f} kB"
    )


def board(flags: int) -> None:
    rng = random.Random(7)
    base = "http://127.0.0.1:8080/fhir"
    as_of = datetime(2025, 3, 1, tzinfo=timezone.utc)
    conditions = [
        "Leukopenia",
        "Neutropenia",
        "Agranulocytosis",
        "Lymphocyte count below reference range",
        "Pancytopenia",
    ]
    made = []
    for i in range(flags):
        start = as_of - timedelta(days=rng.uniform(0, 3650))
        status = rng.choices(["active", "inactive", "entered-in-error"], [0.1, 0.85, 0.05])[0]
        grade = rng.randint(1, 4)
        ext = [{"url": "https://leukofhir.org/fhir/StructureDefinition/ctcae-grade", "valueInteger": grade}]
        if rng.random() < 0.3:
            ext.append(
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/flag-detail",
                    "valueReference": {"reference": f"MedicationStatement/m{i}", "display": "clozapine"},
                }
            )
        display = rng.choice(conditions)
        made.append(
            {
                "resourceType": "Flag",
                "status": status,
                "subject": {"reference": f"Patient/p{i}"},
                "code": {
                    "coding": [{"display": display}],
                    "text": f"{display} — WBC 2.1 ×10^9/L on {start:%Y-%m-%d}, CTCAE v5.0 grade {grade}",
                },
                "period": {"start": start.strftime("%Y-%m-%dT%H:%M:%SZ")},
                "extension": ext,
            }
        )
    t0 = time.perf_counter()
    counted = Board(as_of=as_of, server=base)
    for flag in made:
        counted.add(flag, base)
    counted._trim()
    t1 = time.perf_counter()
    page = render_board(counted)
    t2 = time.perf_counter()
    print(
        f"board: {flags:,} Flags counted in {t1 - t0:.2f} s ({flags / (t1 - t0):,.0f} Flags/s), rendered in "
        f"{t2 - t1:.3f} s; board.html {len(page) / 1024:.0f} kB ({len(counted.rows):,} table rows)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--observations", type=int, default=300_000)
    parser.add_argument("--flags", type=int, default=100_000)
    args = parser.parse_args()
    pictures(args.observations)
    board(args.flags)


if __name__ == "__main__":
    main()
