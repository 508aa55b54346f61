"""`leukofhir demo`: the local HAPI server, the sample patients loaded, the backfill DAG run by Airflow, the Flags
read back from the server. From an installed package (no checkout, so no local server) it runs on `--fhir-url`: the
sample patients and the DAGs travel in the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from leukofhir.airflow.install_dags import install_dags
from leukofhir.config import load_config
from leukofhir.conformance.publish import publish
from leukofhir.errors import UsageError
from leukofhir.extract.reader import iter_resources
from leukofhir.fhir.client import FhirClient
from leukofhir.write.load import load_files, print_report

ROOT = Path(__file__).resolve().parents[1]  # the checkout, when the package runs from one
# Five Synthea patients (their README says where from); links into tests/data/external in a checkout.
SAMPLE_BUNDLES = Path(__file__).resolve().parent / "sample_data"
SUMMARY_TYPES = ["Patient", "Encounter", "Observation", "DiagnosticReport", "MedicationRequest", "Flag"]
WBC = "http://loinc.org|6690-2"
DAG_ID = "leukopenia_backfill"


def start_local_server() -> str:
    """Start (or reuse) the project's HAPI server; its launcher prints the base URL last."""
    script = ROOT / "scripts" / "fhir-server"
    if not script.exists():
        raise UsageError(
            "no FHIR server to run the demo on: give --fhir-url of a running FHIR R4 server (the demo "
            "loads 5 sample patients into it and writes their Flags), or run it from a source checkout "
            "of leukofhir, whose scripts/fhir-server builds and starts a local HAPI server (`make demo`)"
        )
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


def run_backfill_dag(base_url: str, out_dir: Path, until: datetime) -> Path:
    """`airflow dags test leukopenia_backfill` over all the sample data's dates, with a project-local AIRFLOW_HOME
    (SQLite), its dags folder holding the file `leukofhir install-dags` writes, and the `fhir_default` connection
    from the environment; returns the run folder."""
    home = (out_dir / "airflow").resolve()  # Airflow refuses a relative path to its SQLite database
    runs = (out_dir / "runs").resolve()
    dags = home / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    install_dags(dags, force=True)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_FHIR_DEFAULT": json.dumps({"conn_type": "fhir", "host": base_url}),
        "AIRFLOW_VAR_LEUKOFHIR_RUNS": f"file://{runs}",
    }
    airflow = str(Path(sys.executable).with_name("airflow"))
    conf = {"start": "1900-01-01", "end": until.date().isoformat(), "window_field": "effective", "chunks": 2}
    log_path = out_dir / "airflow-dags-test.log"
    with open(log_path, "w") as log:
        for args in (["db", "migrate"], ["dags", "test", DAG_ID, "--conf", json.dumps(conf)]):
            done = subprocess.run([airflow, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise UsageError(f"airflow {args[0]} {args[1]} failed (exit {done.returncode}); see {log_path}")
    folders = sorted((runs / DAG_ID).iterdir(), key=lambda p: p.stat().st_mtime)
    if not folders or not (folders[-1] / "report.json").exists():
        raise UsageError(f"the DAG run wrote no report; see {log_path}")
    return folders[-1]


def demo_command(args) -> int:
    base_url = args.fhir_url or start_local_server()
    bundles = sorted(SAMPLE_BUNDLES.glob("*.json.gz"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    patient_ids = _patient_ids(bundles)
    with FhirClient(base_url, timeout=300) as client:
        print(f"loading {len(bundles)} Synthea patient bundles into {base_url} ...", flush=True)
        report = load_files(client, [str(b) for b in bundles], batch_size=250)
        print_report(report)
        print("\n".join(summarise(client, patient_ids)))
        # The Flag profile and what it names, so that the server's own $validate checks the Flags it is about to get.
        published = publish(client, load_config())
        names = ", ".join(f"{p.resource_type}/{p.id} {p.action}" for p in published)
        print(f"conformance resources (leukofhir conformance): {names}")
        print(
            f"\nrunning the Airflow DAG {DAG_ID} (airflow dags test; log: {out_dir / 'airflow-dags-test.log'}) ...",
            flush=True,
        )
        run_dir = run_backfill_dag(base_url, out_dir, datetime.now(timezone.utc) + timedelta(days=1))
        run = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
        writes = run["writes"]
        print(
            f"  {run['patients_touched']} patients evaluated; Flags created {writes['create']}, updated "
            f"{writes['update']}, withdrawn {writes['withdraw']}, unchanged {writes['unchanged']}"
        )
        flags = _server_flags(client, patient_ids)
    print(f"\nthe sample patients' Flags, read back from {base_url}:")
    for line in flag_lines(flags):
        print(f"  {line}")
    print(f"\nrun report: {run_dir / 'report.html'}")
    return 0 if report.ok else 1


def _server_flags(client: FhirClient, patient_ids: list[str]) -> list[dict]:
    uris = load_config().uris
    refs = ",".join(f"Patient/{p}" for p in patient_ids)
    flags = client.search("Flag", {"subject": refs, "_tag": f"{uris.tag_system}|{uris.tag_code}", "_count": 500})
    return sorted(flags, key=lambda f: (f["subject"]["reference"], f["period"]["start"]))


def flag_lines(flags: list[dict]) -> list[str]:
    """One line per Flag: its id, status, patient and text (the text holds values, dates and grades, no names)."""
    return [
        f"{flag['status']:<9} {flag['subject']['reference']}: {flag['code']['text']}  (Flag/{flag['id']})"
        for flag in flags
    ]


def _patient_ids(bundles: list[Path]) -> list[str]:
    return [i.resource["id"] for i in iter_resources(bundles) if i.resource["resourceType"] == "Patient"]
