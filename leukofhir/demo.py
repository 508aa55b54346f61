"""`leukofhir demo`: start the local HAPI server, load the sample patients, print what the server now holds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from leukofhir.errors import UsageError
from leukofhir.fhir.client import FhirClient
from leukofhir.load import load_files, print_report
from leukofhir.pipeline import evaluate_files
from leukofhir.reader import iter_resources

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_BUNDLES = ROOT / "tests" / "data" / "external" / "smart-generated-sample-data-R4-synthea" / "bundles"
SUMMARY_TYPES = ["Patient", "Encounter", "Observation", "DiagnosticReport", "MedicationRequest", "Flag"]
WBC = "http://loinc.org|6690-2"


def start_local_server() -> str:
    """Start (or reuse) the project's HAPI server; its launcher prints the base URL last."""
    script = ROOT / "scripts" / "fhir-server"
    if not script.exists():
        raise UsageError(f"{script} not found: the demo runs from a checkout of the repository")
    done = subprocess.run([str(script), "start"], capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"the local FHIR server did not start:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def summarise(client: FhirClient, patient_ids: list[str]) -> list[str]:
    lines = [f"FHIR server {client.base_url} (FHIR {client.capabilities().get('fhirVersion')})"]
    for rtype in SUMMARY_TYPES:
        lines.append(f"  {rtype:<20} {client.count(rtype):>7}")
    subjects = ",".join(f"Patient/{p}" for p in patient_ids)
    low = client.count("Observation", {"code": WBC, "subject": subjects, "value-quantity": "lt4"})
    total = client.count("Observation", {"code": WBC, "subject": subjects})
    lines.append(f"  sample patients' WBC results: {total}, of which below 4.0 ×10^9/L: {low}")
    return lines


def demo_command(args) -> int:
    base_url = args.fhir_url or start_local_server()
    bundles = sorted(SAMPLE_BUNDLES.glob("*.json.gz"))
    with FhirClient(base_url, timeout=300) as client:
        print(f"loading {len(bundles)} Synthea patient bundles into {base_url} ...", flush=True)
        report = load_files(client, [str(b) for b in bundles], batch_size=250)
        print_report(report)
        patient_ids = _patient_ids(bundles)
        print("\n".join(summarise(client, patient_ids)))
    # The rules on the same patients, offline (reading them back from the server is the pipeline's job).
    out_dir = Path(args.out)
    run = evaluate_files(bundles, out_dir, progress=False)
    print(f"\nleukopenia rules on the same patients ({out_dir}/Flag.ndjson, report: {out_dir}/report.html):")
    for line in flag_lines(out_dir / "Flag.ndjson"):
        print(f"  {line}")
    print(f"  counts: read {run['read_total']}, evaluated {run['evaluated']}, "
          f"skipped {sum(run['skipped'].values())}, quarantined {sum(run['quarantined'].values())}")
    return 0 if report.ok else 1


def flag_lines(path: Path) -> list[str]:
    """One line per Flag: status and text (no names or birth dates: the text holds values, dates and grades)."""
    lines = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            flag = json.loads(line)
            lines.append(f"{flag['status']:<9} {flag['subject']['reference']}: {flag['code']['text']}")
    return lines


def _patient_ids(bundles: list[Path]) -> list[str]:
    return [i.resource["id"] for i in iter_resources(bundles) if i.resource["resourceType"] == "Patient"]
