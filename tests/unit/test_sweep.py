"""The lapse sweep's pure part: which active Flags' patients are evaluated again, and which run sweeps."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from leukofhir.config import load_config
from leukofhir.errors import UsageError
from leukofhir.extract.sweep import candidates, evidence_ids, evidence_time, sweep_due, sweep_hour
from leukofhir.fhir.references import DETAIL_URL
from leukofhir.normalise.context import parse_time_ns

RULES = load_config()
BASE = "http://fhir.example/fhir"
AS_OF = datetime(2026, 6, 1, 0, 0, tzinfo=timezone.utc)
LAPSE = RULES.windows.episode_gap  # 90 days


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def flag(pid: str, *refs: str, status: str = "active", subject: str | None = None) -> dict:
    details = [{"url": DETAIL_URL, "valueReference": {"reference": r}} for r in refs]
    return {
        "resourceType": "Flag",
        "status": status,
        "subject": {"reference": subject or f"Patient/{pid}"},
        "extension": [*details, {"url": RULES.uris.ctcae_grade_extension, "valueInteger": 2}],
    }


def ns(moment: datetime) -> int:
    return parse_time_ns(moment.isoformat())


def before(days: float = 0, seconds: float = 0) -> int:
    return ns(AS_OF - timedelta(days=days, seconds=seconds))


def test_evidence_ids_are_the_flag_detail_observations_each_once():
    f = flag(
        "p",
        "Observation/a",
        "MedicationStatement/m",
        "Observation/b",
        "Observation/a",
        f"{BASE}/Observation/c/_history/2",
        "Observation/bad id",
    )
    f["extension"].append({"url": "http://other/ext", "valueReference": {"reference": "Observation/z"}})
    assert evidence_ids(f) == ["a", "b", "c"]


@pytest.mark.parametrize(
    "observation, expected",
    [
        ({"status": "final", "effectiveDateTime": "2026-01-02T03:04:05Z"}, utc(2026, 1, 2, 3, 4, 5)),
        ({"status": "amended", "effectiveInstant": "2026-01-02T03:04:05.5+02:00"}, utc(2026, 1, 2, 1, 4, 5, 500000)),
        ({"status": "final", "effectivePeriod": {"start": "2026-01-02", "end": "2026-01-09"}}, utc(2026, 1, 2)),
        ({"status": "final"}, None),  # its time is its report's or panel's: not looked up, so it rests on nothing
        ({"status": "final", "effectiveDateTime": "not a time"}, None),
        ({"status": "entered-in-error", "effectiveDateTime": "2026-01-02T03:04:05Z"}, None),  # no value (§1.1)
    ],
)
def test_evidence_time_is_the_time_the_rules_read(observation, expected):
    assert evidence_time(observation) == (ns(expected) if expected else None)


@pytest.mark.parametrize(
    "times, candidate",
    [
        ({"a": before(days=91)}, True),  # a single count 91 days before: lapses
        ({"a": before(days=89)}, False),
        ({"a": before(days=90)}, False),  # exactly the lapse: still followed (strictly more lapses, as in the rules)
        ({"a": before(days=90, seconds=1)}, True),
        ({"a": before(days=200), "b": before(days=30)}, False),  # the newest evidence counts
        ({"a": before(days=200), "b": before(days=120)}, True),
        ({}, True),  # evidence deleted: nothing to rest on
        ({"a": None}, True),  # evidence without a time of its own, or entered-in-error
        ({"a": None, "b": before(days=10)}, False),
    ],
)
def test_a_flag_whose_newest_evidence_is_older_than_the_lapse_is_a_candidate(times, candidate):
    found = candidates([flag("p", "Observation/a", "Observation/b")], times, AS_OF, LAPSE, BASE)
    assert found == ({"p"} if candidate else set())


def test_a_flag_without_evidence_is_a_candidate_and_only_active_local_flags_count():
    flags = [
        flag("none"),
        flag("closed", "Observation/old", status="inactive"),
        flag("withdrawn", "Observation/old", status="entered-in-error"),
        flag("absolute", "Observation/old", subject=f"{BASE}/Patient/absolute"),
        flag("foreign", "Observation/old", subject="http://elsewhere.example/fhir/Patient/foreign"),
        flag("urn", "Observation/old", subject="urn:uuid:1234"),
    ]
    found = candidates(flags, {"old": before(days=400)}, AS_OF, LAPSE, BASE)
    assert found == {"none", "absolute"}


def test_one_lapsed_flag_makes_its_patient_a_candidate_whatever_their_other_flags():
    # Leukopenia followed by monthly WBCs, pancytopenia lapsed: the patient is evaluated again, whole.
    flags = [flag("p", "Observation/wbc"), flag("p", "Observation/cbc"), flag("q", "Observation/wbc2")]
    times = {"wbc": before(days=20), "cbc": before(days=120), "wbc2": before(days=20)}
    assert candidates(flags, times, AS_OF, LAPSE, BASE) == {"p"}


def test_the_lapse_is_the_sites_setting():
    flags = [flag("p", "Observation/a")]
    times = {"a": before(days=40)}
    assert candidates(flags, times, AS_OF, timedelta(days=30), BASE) == {"p"}
    assert candidates(flags, times, AS_OF, timedelta(days=60), BASE) == set()


@pytest.mark.parametrize(
    "since, until, hour, due",
    [
        (utc(2026, 1, 2, 0), utc(2026, 1, 2, 1), 0, True),  # the hourly run of 00:00-01:00
        (utc(2026, 1, 1, 23), utc(2026, 1, 2, 0), 0, False),  # the interval ends at midnight: the next one holds it
        (utc(2026, 1, 2, 1), utc(2026, 1, 2, 2), 0, False),
        (utc(2026, 1, 2, 6), utc(2026, 1, 2, 7), 6, True),
        (utc(2026, 1, 2, 5, 59, 59), utc(2026, 1, 2, 6, 0, 1), 6, True),
        (utc(2026, 1, 2, 0, 0, 1), utc(2026, 1, 3, 0), 0, False),  # a day-long interval just after it
        (utc(2026, 1, 2, 1), utc(2026, 1, 3, 1), 0, True),  # a day-long interval holds every hour once
        (utc(2026, 1, 2, 7), utc(2026, 1, 2, 7, 5), 7, True),  # five-minute runs: the first of the hour
        (utc(2026, 1, 2, 7, 5), utc(2026, 1, 2, 7, 10), 7, False),
        (
            datetime(2026, 1, 2, 1, 0, tzinfo=timezone(timedelta(hours=1))),  # 00:00 UTC, given in another zone
            datetime(2026, 1, 2, 2, 0, tzinfo=timezone(timedelta(hours=1))),
            0,
            True,
        ),
    ],
)
def test_the_run_whose_interval_holds_the_sweep_hour_sweeps(since, until, hour, due):
    assert sweep_due(since, until, hour) is due


def test_each_hour_of_a_day_of_hourly_runs_sweeps_exactly_once():
    for hour in range(24):
        starts = [utc(2026, 3, 29) + timedelta(hours=h) for h in range(24)]
        assert sum(sweep_due(s, s + timedelta(hours=1), hour) for s in starts) == 1


@pytest.mark.parametrize("text, hour", [(None, 0), ("", 0), (" 6 ", 6), ("23", 23), ("0", 0)])
def test_the_sweep_hour_setting(text, hour):
    assert sweep_hour(text) == hour


@pytest.mark.parametrize("text", ["24", "-1", "6am", "6.5"])
def test_a_sweep_hour_that_is_no_hour_of_the_day_is_refused_naming_it(text):
    with pytest.raises(UsageError, match=repr(text).replace(".", r"\.")):
        sweep_hour(text)
