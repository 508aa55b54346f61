"""`leukofhir cds-hooks` answering patient-view with a complete prefetch: the latency an EHR sees, p50 and p95.

Usage: .venv/bin/python benchmarks/cds_bench.py [--port 8698] [--years 10] [--requests 200] [--fhir-url URL]

Starts the service as its own process (a JWKS file of a made-up EHR as its trusted issuer), builds one patient with
`--years` of weekly blood counts (WBC, ANC, lymphocytes, hemoglobin, platelets, each week's five in a
DiagnosticReport; a clozapine statement; an agranulocytosis last week, so there is a card to build), and sends
`--requests` patient-view requests one after the other, each with the whole history as prefetch and a fresh JWT (signed
before the clock starts), in two rounds: "same history" (the chart opened again with no new result: the service
remembers that the history passed validation, leukofhir/cds/evaluation.py PassedBatches) and "new result each time"
(the first count's value differs in every request: GX validates it all again). Prints, per round, the request size,
p50, p95 and the slowest, measured at the client (HTTP included). No FHIR server is read: the prefetch is complete.
Not a timed test."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import requests  # noqa: E402

from leukofhir.cds.fetch import prefetch_templates  # noqa: E402
from leukofhir.config import load_config  # noqa: E402
from support.cds_process import PATIENT_VIEW, CdsProcess, EhrKeys, patient_view_request  # noqa: E402
from support.fhir_builders import observation, report, statement  # noqa: E402

CONCEPTS = [("wbc", 6.0), ("anc", 3.5), ("lymphocytes_abs", 1.8), ("hemoglobin", 13.5), ("platelets", 250)]


def history(pid: str, years: int, now: datetime) -> tuple[dict, int]:
    """The prefetch of one patient with `years` of weekly counts, and its number of Observations."""
    ref = f"Patient/{pid}"
    observations, reports = [], []
    weeks = years * 52
    for week in range(weeks):
        when = (now - timedelta(weeks=weeks - week)).strftime("%Y-%m-%dT%H:%M:%SZ")
        ids = []
        for concept, value in CONCEPTS:
            if week == weeks - 1 and concept == "anc":
                value = 0.3  # last week: agranulocytosis
            oid = f"{pid}-{week}-{concept}"
            observations.append(observation(oid, concept, value, time=when, patient=ref))
            ids.append(oid)
        reports.append(report(f"{pid}-r{week}", ids, when, ref))
    medication = statement(
        f"{pid}-cloz", "clozapine 200 mg", start=(now - timedelta(days=400)).strftime("%Y-%m-%d"), patient_ref=ref
    )

    def bundle(resources):
        return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}

    prefetch = {key: bundle([]) for key in prefetch_templates(load_config())}
    prefetch["observations"] = bundle(observations + reports)
    prefetch["medicationStatements"] = bundle([medication])
    prefetch["patient"] = {"resourceType": "Patient", "id": pid, "birthDate": "1970-05-05", "gender": "female"}
    return prefetch, len(observations)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8698)
    parser.add_argument("--years", type=int, default=10)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--fhir-url", default="http://127.0.0.1:9/fhir", help="never read: the prefetch is complete")
    args = parser.parse_args()
    prefetch, count = history("bench", args.years, datetime.now(timezone.utc))
    with tempfile.TemporaryDirectory() as folder:
        keys = EhrKeys(Path(folder))
        with CdsProcess(Path(folder), args.port, args.fhir_url, keys) as service:
            url = service.url + PATIENT_VIEW
            for name, vary in (("same history", False), ("new result each time", True)):
                times = []
                with requests.Session() as session:
                    for number in range(args.requests + 5):
                        if vary:  # another value of the first count: another batch for GX
                            first = prefetch["observations"]["entry"][0]["resource"]["valueQuantity"]
                            first["value"] = round(6.0 + number / 1000, 3)
                        body = json.dumps(patient_view_request("bench", prefetch)).encode()
                        header = dict(service.auth(), **{"Content-Type": "application/json"})
                        started = time.perf_counter()
                        answer = session.post(url, data=body, headers=header, timeout=60)
                        elapsed = time.perf_counter() - started
                        if answer.status_code != 200 or len(answer.json()["cards"]) != 1:
                            raise SystemExit(f"unexpected answer {answer.status_code}: {answer.text[:300]}")
                        if number >= 5:  # the first few warm the process and its connection
                            times.append(elapsed * 1000)
                times.sort()
                p95 = times[int(round(0.95 * (len(times) - 1)))]
                print(
                    f"| {name} | {args.years} years, {count:,} Observations | {len(body) / 1e6:.1f} MB | "
                    f"{len(times)} | {statistics.median(times):.0f} ms | {p95:.0f} ms | {times[-1]:.0f} ms |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
