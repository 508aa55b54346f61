"""The one calendar-age function (leukofhir.age): birthdays, month ends, 29 February, FHIR Age quantities."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from leukofhir.age import AgeSpan, age_reached, age_reached_ns, age_span_of_quantity
from leukofhir.config import AgeSpan as ConfigAgeSpan


def utc(*parts) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "birth, age, reached",
    [
        (date(2024, 3, 1), "7d", utc(2024, 3, 8)),
        (date(2024, 2, 22), "14d", utc(2024, 3, 7)),  # across 29 February: 14 days are 14 days
        (date(2024, 1, 31), "1m", utc(2024, 2, 29)),  # the 31st: the last day of the shorter month
        (date(2023, 1, 31), "1m", utc(2023, 2, 28)),
        (date(2024, 3, 31), "1m", utc(2024, 4, 30)),
        (date(2022, 3, 15), "2y", utc(2024, 3, 15)),
        (date(2020, 2, 29), "1y", utc(2021, 2, 28)),  # born on 29 February: 28 February in common years
        (date(2020, 2, 29), "4y", utc(2024, 2, 29)),  # and 29 February in leap years
        (date(2004, 2, 29), "18y", utc(2022, 2, 28)),
        (date(2000, 3, 1), "18y", utc(2018, 3, 1)),
        (date(2023, 12, 31), "2m", utc(2024, 2, 29)),
    ],
)
def test_age_reached_is_the_calendar_birthday_at_midnight_utc(birth, age, reached):
    assert age_reached(birth, AgeSpan(age)) == reached
    assert age_reached_ns(birth, AgeSpan(age)) == int(reached.timestamp()) * 1_000_000_000


def test_config_uses_the_same_age_span():
    assert ConfigAgeSpan is AgeSpan and AgeSpan("18y") == AgeSpan(" 18 y ") and str(AgeSpan("7d")) == "7d"


@pytest.mark.parametrize(
    "quantity, extra, expected",
    [
        ({"value": 17, "code": "a"}, 0, "17y"),
        ({"value": 17, "code": "a"}, 1, "18y"),  # an inclusive high of 17 years ends at the 18th birthday
        ({"value": 6, "unit": "mo"}, 0, "6m"),
        ({"value": 1.5, "code": "a"}, 0, "18m"),  # a whole number of months
        ({"value": 1.5, "code": "a"}, 1, "19m"),  # the limit's own granularity is then the month
        ({"value": 28, "unit": "days"}, 1, "29d"),
        ({"value": 2, "code": "wk"}, 0, "2w"),
        ({"value": 1.2, "code": "a"}, 0, None),  # 14.4 months: no calendar meaning
        ({"value": 17, "unit": "lunar cycles"}, 0, None),
        ({"value": -1, "code": "a"}, 0, None),
        ({"value": True, "code": "a"}, 0, None),
        ({"code": "a"}, 0, None),
        ("17 a", 0, None),
    ],
)
def test_age_span_of_a_fhir_age_quantity(quantity, extra, expected):
    span = age_span_of_quantity(quantity, extra_units=extra)
    assert (str(span) if span else None) == expected
