"""Time validate_batch on synthetic tidy Observation rows (default 1,000,000): seconds and rows per second; and the
data contract's counts of the same rows (contract_counts), measured beside it."""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from leukofhir.config import load_config
from leukofhir.evaluate.validate import _context, contract_counts, suite_parameters, validate_batch

# One blood count with its differential, as a lab reports it: (concept, LOINC, unit, low, high) in canonical units.
PANEL = [
    ("wbc", "6690-2", "10*3/uL", 6.0, 12.0),
    ("anc", "751-8", "10*3/uL", 1.0, 5.0),
    ("lymphocytes_abs", "731-0", "10*3/uL", 0.5, 2.5),
    ("monocytes_abs", "742-7", "10*3/uL", 0.1, 0.8),
    ("neutrophils_pct", "770-8", "%", 40.0, 70.0),
    ("lymphocytes_pct", "736-9", "%", 20.0, 40.0),
    ("hemoglobin", "718-7", "g/dL", 9.0, 16.0),
    ("platelets", "777-3", "10*3/uL", 100.0, 400.0),
]


def synthetic_observations(n: int, seed: int = 0) -> pd.DataFrame:
    """`n` rows in panels of eight; about 0.1 % carry an unknown unit so the quarantine path is exercised too."""
    rng = np.random.default_rng(seed)
    slot = np.arange(n) % len(PANEL)
    concept, code, unit, low, high = (np.array([p[i] for p in PANEL])[slot] for i in range(5))
    ids = pd.Series(np.arange(n)).astype(str)
    panel = np.arange(n) // len(PANEL)
    frame = pd.DataFrame(
        {
            "row_id": ids,
            "resource_id": "Observation/" + ids,
            "version": "1",
            "patient_id": "Patient/" + pd.Series(panel // 20).astype(str),
            "concept": concept,
            "code": code,
            "value": rng.uniform(low.astype(float), high.astype(float)),
            "comparator": None,
            "unit": unit,
            "status": "final",
            "time": pd.Timestamp("2020-01-01", tz="UTC") + pd.to_timedelta(panel * 600, unit="s"),
            "lln": np.nan,
            "panel": "DiagnosticReport/" + pd.Series(panel).astype(str),
        }
    )
    frame.loc[frame.index[::997], "unit"] = "10*12/L"
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    args = parser.parse_args()

    rows = synthetic_observations(args.rows)
    parameters = suite_parameters(load_config(), now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    started = time.perf_counter()
    _context()  # once per process: GX import, context and suites
    setup = time.perf_counter() - started

    timings, counting = [], []
    for _ in range(args.repeat):
        started = time.perf_counter()
        result = validate_batch("observations", rows, parameters)
        timings.append(time.perf_counter() - started)
        started = time.perf_counter()
        contract_counts("observations", (rows, result.reasons))
        counting.append(time.perf_counter() - started)
    best = min(timings)
    print(f"GX setup (once per process): {setup:.2f} s")
    print(
        f"validate_batch on {args.rows:,} Observation rows: {best:.2f} s ({args.rows / best:,.0f} rows/s); "
        f"runs: {', '.join(f'{t:.2f}' for t in timings)} s"
    )
    print(f"valid {len(result.valid):,}, quarantined {len(result.reasons):,}")
    print(
        f"contract_counts on the same rows: {min(counting):.2f} s ({min(counting) / best:.0%} of validate_batch); "
        f"runs: {', '.join(f'{t:.2f}' for t in counting)} s"
    )


if __name__ == "__main__":
    main()
