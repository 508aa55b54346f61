"""What the check of changed data costs a run: `leukofhir run` of new patients who all get a Flag, with the check
(write.flags.write_plan's `changed`, extract.search.changed_patients) or without it.

Usage: .venv/bin/python benchmarks/write_check_bench.py --fhir-url URL [--no-check], in alternating pairs, each timed
as a whole process (e.g. /usr/bin/time -v): the ratio of the pairs is the figure.

Each run puts `--patients` new patients (a low WBC each, every other one recovered) on the server, then runs the
pipeline on them (batches of 100, so one check per batch), and prints the step times of the run. Not a timed test."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import leukofhir.run as run  # noqa: E402
from leukofhir.config import load_config  # noqa: E402
from leukofhir.fhir.client import FhirClient  # noqa: E402
from support.fhir_builders import at, observation, patient  # noqa: E402
from support.server_data import put  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fhir-url", required=True)
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--no-check", action="store_true", help="skip the check of changed data")
    args = parser.parse_args(argv)
    if args.no_check:
        run._changed_since = lambda *a, **k: None  # write_plan then checks nothing
    tag = uuid.uuid4().hex[:10]
    pids = [f"wcb{n}-{tag}" for n in range(args.patients)]
    resources = [patient(p) for p in pids]
    for n, pid in enumerate(pids):
        resources.append(observation(f"{pid}-w", "wbc", 2.5, time=at(), patient=f"Patient/{pid}"))
        if n % 2:
            resources.append(observation(f"{pid}-ok", "wbc", 6.0, time=at(days=5), patient=f"Patient/{pid}"))
    with FhirClient(args.fhir_url) as client, tempfile.TemporaryDirectory() as out:
        put(client, *resources)
        report = run.run_pipeline(client, load_config(), Path(out), patients=pids)
    assert report["writes"]["create"] == args.patients, report["writes"]
    print(json.dumps({"check": not args.no_check, "seconds": report["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
