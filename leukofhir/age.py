"""Calendar age (clinical-rules §1.3): when a person born on a date reaches an age; the one age rule of the project."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

__all__ = ["AgeSpan", "birth_instant", "age_reached", "age_reached_ns", "age_span_of_quantity"]

_SPAN = re.compile(r"^\s*(\d+)\s*(min|h|d|w|m|y)\s*$")
_NS_PER_S = 1_000_000_000


class AgeSpan:
    """An age or window such as `10min`, `24h`, `7d`, `1m`, `2y`: `m` is a calendar month (age bands, §1.3)."""

    __slots__ = ("amount", "unit")

    def __init__(self, text: str):
        match = _SPAN.match(str(text))
        if not match:
            raise ValueError(f"{text!r} is not a span like 10min, 72h, 7d, 2w, 1m or 18y")
        self.amount, self.unit = int(match.group(1)), match.group(2)

    def after(self, start: datetime) -> datetime:
        """The instant this span after `start`: calendar months and years, so a birthday, never 365.25 days.

        A day that the target month lacks (29 February, the 31st) falls on that month's last day: someone born on
        29 February 2004 is 18 on 28 February 2022 (docs/clinical-decisions.md)."""
        if self.unit in ("min", "h", "d", "w"):
            return start + self.timedelta()
        months = self.amount * (12 if self.unit == "y" else 1)
        year, month = divmod(start.month - 1 + months, 12)
        year += start.year
        month += 1
        for day in (start.day, 30, 29, 28):
            try:
                return start.replace(year=year, month=month, day=day)
            except ValueError:
                continue
        raise ValueError("unreachable")

    def timedelta(self) -> timedelta:
        if self.unit == "min":
            return timedelta(minutes=self.amount)
        if self.unit == "h":
            return timedelta(hours=self.amount)
        if self.unit == "d":
            return timedelta(days=self.amount)
        if self.unit == "w":
            return timedelta(weeks=self.amount)
        raise ValueError(f"{self} is a calendar span, not a fixed duration")

    def __eq__(self, other) -> bool:
        return isinstance(other, AgeSpan) and (self.amount, self.unit) == (other.amount, other.unit)

    def __hash__(self) -> int:
        return hash((self.amount, self.unit))

    def __str__(self) -> str:
        return f"{self.amount}{self.unit}"

    def __repr__(self) -> str:
        return f"AgeSpan({str(self)!r})"


def birth_instant(birth: date) -> datetime:
    """The first instant of the birth date, UTC: Patient.birthDate has no time or zone (§1.3)."""
    return datetime(birth.year, birth.month, birth.day, tzinfo=timezone.utc)


def age_reached(birth: date, age: AgeSpan) -> datetime:
    """The instant someone born on `birth` is `age` old (completed calendar units): every age rule goes through here."""
    return age.after(birth_instant(birth))


def age_reached_ns(birth: date, age: AgeSpan) -> int:
    """`age_reached` as int64 nanoseconds UTC, the time unit of the rows."""
    moment = age_reached(birth, age)
    return int(moment.timestamp()) * _NS_PER_S + moment.microsecond * 1000


# UCUM and common unit words of a FHIR Age (Range.low/high of referenceRange.age) -> AgeSpan unit.
_AGE_UNITS = {
    "a": "y",
    "yr": "y",
    "year": "y",
    "years": "y",
    "mo": "m",
    "month": "m",
    "months": "m",
    "wk": "w",
    "week": "w",
    "weeks": "w",
    "d": "d",
    "day": "d",
    "days": "d",
    "h": "h",
    "hour": "h",
    "hours": "h",
    "min": "min",
}


def age_span_of_quantity(quantity, extra_units: int = 0) -> AgeSpan | None:
    """A FHIR Age quantity (`{"value": 17, "code": "a"}`) as an AgeSpan, plus `extra_units` of its own unit; None when
    it cannot be read (no number, an unknown unit, a fraction that is no whole number of months or days).

    `extra_units=1` turns an inclusive upper limit into the exclusive age: "up to 17 years" holds until the 18th
    birthday, as a person is 17 until then (completed years, like the age bands)."""
    if not isinstance(quantity, dict):
        return None
    value = quantity.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        return None
    code = quantity.get("code") if isinstance(quantity.get("code"), str) else quantity.get("unit")
    unit = _AGE_UNITS.get(code) if isinstance(code, str) else None
    if unit is None:
        return None
    if value != int(value):
        # 1.5 a is 18 months; 0.5 mo has no calendar meaning: only whole months or smaller whole units.
        if unit == "y" and value * 12 == int(value * 12):
            value, unit = value * 12, "m"  # the limit's granularity is then the month
        else:
            return None
    try:
        return AgeSpan(f"{int(value) + extra_units}{unit}")
    except ValueError:
        return None
