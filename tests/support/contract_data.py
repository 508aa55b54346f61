"""Populations for the data contract's tests: a patient with broken results among normal ones, and a broken feed."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone

from support.fhir_builders import UCUM, days_ago, observation, patient
from support.server_data import project_flags, put, without_patient

HELD_OUT_SIZE = 13
BAD = 10  # the patient whose results include a unit nobody knows and a value sent as a string
# Histories within the last month: an online run evaluates as of its own time, and an episode without a count for
# more than 90 days has lapsed (clinical-rules v1.3 §4); these tests are about the contract, not the lapse.
NOW = datetime.now(timezone.utc)


def recent(days: float = 0) -> str:
    """`days` after the start of the populations' month (30 days ago), as FHIR dateTime text."""
    return days_ago(30 - days, now=NOW)


def held_out_ids(prefix: str) -> list[str]:
    return [f"{prefix}-p{n:02d}" for n in range(HELD_OUT_SIZE)]


def string_valued(oid: str, pid: str, text: str, days: float) -> dict:
    """A WBC sent as a string (valueString), as a feed that lost its numbers sends it."""
    result = observation(oid, "wbc", 0.0, time=recent(days=days), patient=f"Patient/{pid}")
    del result["valueQuantity"]
    result["valueString"] = text
    return result


def held_out(prefix: str) -> list[dict]:
    """13 patients like the issue's held-out population: low counts (active Flags), transient ones (inactive), a
    neutropenia beside a normal WBC, and patient 10, whose low WBC is valid but whose other two WBCs are one in a unit
    nobody knows and one sent as a string."""
    resources = []
    for n, pid in enumerate(held_out_ids(prefix)):
        ref = f"Patient/{pid}"
        resources.append(patient(pid))
        if n == BAD:
            resources += [
                observation(f"{pid}-low", "wbc", 2.2, time=recent(days=0), patient=ref),
                observation(f"{pid}-unit", "wbc", 3.0, unit="furlong", time=recent(days=1), patient=ref),
                string_valued(f"{pid}-text", pid, "1.9", days=2),
            ]
        elif n % 3 == 0:
            resources.append(observation(f"{pid}-w", "wbc", 2.0 + n / 10, time=recent(days=n), patient=ref))
        elif n % 3 == 1:
            resources += [
                observation(f"{pid}-w", "wbc", 2.5, time=recent(days=n), patient=ref),
                observation(f"{pid}-w2", "wbc", 6.0, time=recent(days=n + 2), patient=ref),
            ]
        else:
            resources += [
                observation(f"{pid}-w", "wbc", 5.0, time=recent(days=n), patient=ref),
                observation(f"{pid}-a", "anc", 0.8, time=recent(days=n), patient=ref),
            ]
    return resources


@contextmanager
def broken_feed_on(client, prefix: str, **options):
    """broken_feed written to the server, yielding (good, bad) ids; mended afterwards (a known unit), so that later
    tests whose windows take in every patient of the shared test server never meet a broken feed of this one."""
    resources, good, bad = broken_feed(prefix, **options)
    put(client, *resources)
    try:
        yield good, bad
    finally:
        broken = [r for r in resources if r["resourceType"] == "Observation" and r["valueQuantity"]["unit"] == NEW_UNIT]
        put(
            client,
            *(
                {**r, "valueQuantity": {**r["valueQuantity"], "unit": "10*9/L", "system": UCUM, "code": "10*9/L"}}
                for r in broken
            ),
        )


NEW_UNIT = "K/uL-new"


def broken_feed(prefix: str, bad_patients: int = 12, results_each: int = 5) -> tuple[list[dict], list[str], list[str]]:
    """A laboratory that changed its WBC unit: `bad_patients` patients whose counts all come in a unit nobody knows
    (60 rows from 12 by default: above the contract's 50 rows and 5 patients), and four patients with low counts in a
    known unit whose ids sort first (their batch would come first). Returns the resources, the good and the bad
    patients' ids."""
    good = [f"{prefix}-a-good{n}" for n in range(4)]
    bad = [f"{prefix}-b-bad{n:02d}" for n in range(bad_patients)]
    resources = [patient(p) for p in good + bad]
    resources += [
        observation(f"{p}-w", "wbc", 1.8, time=recent(days=n), patient=f"Patient/{p}") for n, p in enumerate(good)
    ]
    resources += [
        observation(f"{p}-w{k}", "wbc", 2.0 + k, unit=NEW_UNIT, time=recent(days=k), patient=f"Patient/{p}")
        for p in bad
        for k in range(results_each)
    ]
    return resources, good, bad


def flags_by_place(client, ids: list[str]) -> dict[int, list[tuple]]:
    """Each patient's Flags on the server (by the patient's place in `ids`), by clinical content: the same data
    under other ids compares equal."""
    out: dict[int, list[tuple]] = {n: [] for n in range(len(ids))}
    place = {f"Patient/{p}": n for n, p in enumerate(ids)}
    for flag in project_flags(client, ids):
        out[place[flag["subject"]["reference"]]].append(without_patient(flag))
    return {n: sorted(flags) for n, flags in out.items()}
