"""Each Flag's evidence as a small series for the run report's trend pictures: its values over the episode."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Iterable

import pandas as pd

from leukofhir.config import Rules
from leukofhir.evaluate.rules import FlagSpec, default_threshold, iso_instant

__all__ = ["flag_trends", "merge_trends", "MAX_TRENDS", "MAX_POINTS"]

# report.json carries at most MAX_TRENDS pictures of MAX_POINTS values each (about 2 kB a picture): a big run's
# report stays small, and the Flags not pictured are all in Flag.ndjson.
MAX_TRENDS = 60
MAX_POINTS = 60
MAX_DRUGS = 4
# Around the episode: a quarter of its length on each side, at least two weeks and at most half a year.
MARGIN_MIN, MARGIN_MAX = timedelta(days=14), timedelta(days=182)
UNIT = "×10^9/L"
# The values each family is judged on (pancytopenia: its WBC, the count that opens and closes it).
_MEASURE = {
    "leukocytes": ("wbc", "WBC"),
    "pancytopenia": ("wbc", "WBC"),
    "granulocytes": ("anc", "ANC"),
    "lymphocytes": ("lymphocytes_abs", "lymphocytes"),
}
_STATUS_RANK = {"active": 0, "inactive": 1}


def _order(status: str, grade: int, start: str, identifier: str) -> tuple:
    """Which Flags a capped report pictures first: active ones, the worst grade, the latest episode."""
    moment = datetime.fromisoformat(start.replace("Z", "+00:00"))
    return _STATUS_RANK.get(status, 2), -grade, -moment.timestamp(), identifier


def _trend_order(trend: dict) -> tuple:
    return _order(trend["status"], trend["grade"], trend["start"], trend["flag"])


def merge_trends(parts: Iterable[list[dict]], limit: int = MAX_TRENDS) -> list[dict]:
    """The pictures of a run made of batches or partitions: the same ones a single pass over all of it would pick."""
    return sorted((t for part in parts for t in part or []), key=_trend_order)[:limit]


def flag_trends(
    specs: list[FlagSpec],
    kept: list[int],
    observations: pd.DataFrame,
    exposures: pd.DataFrame,
    patients: dict,
    rules: Rules,
    limit: int = MAX_TRENDS,
) -> list[dict]:
    """The series of up to `limit` of the Flags written (`kept`: their positions in `specs`), plain JSON: the Flag's
    identifier (no patient id), condition, grade, status and period; the values it rests on around the episode, each
    marked low or not as the rules judge it; the threshold and grade boundaries; the associated drugs' exposures."""
    chosen = sorted(
        (specs[i] for i in kept), key=lambda s: _order(s.status, s.grade, iso_instant(s.start), s.identifier)
    )[:limit]
    if not chosen or observations is None or observations.empty:
        return []
    wanted = (
        observations["patient_id"].isin({s.patient_id for s in chosen})
        & observations["concept"].isin({c for c, _ in _MEASURE.values()})
        & (observations["status"] != rules.observations.statuses.retracted)
        & observations["value"].notna()
        & observations["time"].notna()
    )
    rows = observations.loc[wanted, ["patient_id", "concept", "resource_id", "time", "value", "comparator", "lln"]]
    rows = rows.sort_values(["patient_id", "concept", "time", "resource_id"], kind="mergesort")
    series = {key: frame for key, frame in rows.groupby(["patient_id", "concept"], sort=False)}
    periods = {}
    if exposures is not None and not exposures.empty:
        for ref, start, end in zip(exposures["resource_id"], exposures["start"], exposures["end"]):
            periods[ref] = (
                None if pd.isna(start) else iso_instant(start.to_pydatetime()),
                None if pd.isna(end) else iso_instant(end.to_pydatetime()),
            )
    return [_trend(spec, series, periods, patients.get(spec.patient_id), rules) for spec in chosen]


def _trend(spec: FlagSpec, series: dict, periods: dict, info, rules: Rules) -> dict:
    family = spec.family
    concept, measure = _MEASURE[family]
    evidence = set(spec.evidence)
    frame = series.get((spec.patient_id, concept))
    if family == "granulocytes" and (frame is None or not frame["resource_id"].isin(evidence).any()):
        # An ANC derived from WBC and the differential (§2) has no Observation of its own: show the WBC it came from.
        family, concept, measure = "leukocytes", "wbc", "WBC (ANC derived from it and the differential)"
        frame = series.get((spec.patient_id, concept))
    points: list = []
    if frame is not None:
        shown = frame[frame["resource_id"].isin(evidence)]
        last = max([spec.end or spec.start] + ([shown["time"].max().to_pydatetime()] if len(shown) else []))
        margin = min(max((last - spec.start) / 4, MARGIN_MIN), MARGIN_MAX)
        around = frame[
            (frame["time"] >= pd.Timestamp(spec.start - margin)) & (frame["time"] <= pd.Timestamp(last + margin))
        ]
        for i in _sample(around["resource_id"].isin(evidence).tolist()):
            row = around.iloc[i]
            time = row["time"].to_pydatetime()
            comparator = row["comparator"] if isinstance(row["comparator"], str) else None
            threshold = _threshold(rules, info, family, time, row["lln"])
            value = round(float(row["value"]), 4)
            low = value < threshold or (comparator == "<" and value <= threshold)
            points.append([iso_instant(time), value, low, comparator])
    main = _threshold(rules, info, family, spec.start, _first_lln(frame, evidence))
    drugs = [[label, *periods.get(ref, (None, None))] for label, ref in spec.drugs[:MAX_DRUGS]]
    return {
        "flag": spec.identifier,
        "condition": spec.display,
        "grade": spec.grade,
        "status": spec.status,
        "start": iso_instant(spec.start),
        "end": iso_instant(spec.end) if spec.end else None,
        "measure": measure,
        "unit": UNIT,
        "lines": _lines(rules, family, main),
        "points": points,
        "drugs": [d for d in drugs if d[1]],
    }


def _sample(is_evidence: list[bool]) -> list[int]:
    """At most MAX_POINTS positions, time order kept: every evidence value when they fit, then others evenly."""
    n = len(is_evidence)
    if n <= MAX_POINTS:
        return list(range(n))
    chosen = [i for i in range(n) if is_evidence[i]]
    if len(chosen) >= MAX_POINTS:
        return _evenly(chosen, MAX_POINTS)
    others = [i for i in range(n) if not is_evidence[i]]
    return sorted(chosen + _evenly(others, MAX_POINTS - len(chosen)))


def _evenly(items: list[int], k: int) -> list[int]:
    if k <= 1:
        return items[:k]
    step = (len(items) - 1) / (k - 1)
    return sorted({items[round(j * step)] for j in range(k)})


def _first_lln(frame, evidence: set) -> float:
    if frame is None:
        return math.nan
    lln = frame.loc[frame["resource_id"].isin(evidence), "lln"].dropna()
    return float(lln.iloc[0]) if len(lln) else math.nan


def _threshold(rules: Rules, info, family: str, at: datetime, lln) -> float:
    """The lab's own LLN when the value carries one (§1.3; not ANC, judged on fixed thresholds), else the default."""
    if family != "granulocytes" and lln == lln and lln is not None:
        return float(lln)
    return default_threshold(rules, info, family, at)


def _lines(rules: Rules, family: str, main: float) -> list[list]:
    """The threshold first, then the CTCAE v5.0 grade boundaries below it."""
    grades = {"granulocytes": rules.neutropenia.grades, "lymphocytes": rules.lymphopenia.grades}.get(
        family, rules.leukopenia.grades
    )
    lines = [["threshold" if family == "granulocytes" else "LLN", main]]
    for label, value in (("G2 <", grades.g2_below), ("G3 <", grades.g3_below), ("G4 <", grades.g4_below)):
        if value is not None and value < main:
            lines.append([label, value])
    return lines
