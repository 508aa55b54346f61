"""The leukopenia rules (clinical-rules §2-§4) as pure functions: tidy rows in, desired Flags out as plain data."""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pandas as pd

from leukofhir.age import age_reached_ns
from leukofhir.config import AgeBand, Grades, Rules
from leukofhir.normalise import PatientInfo

__all__ = [
    "FlagSpec",
    "Point",
    "evaluate",
    "episode_identifier",
    "iso_instant",
    "lapse_horizon",
    "FAMILIES",
    "default_threshold",
]

FAMILIES = ("leukocytes", "granulocytes", "lymphocytes", "pancytopenia")
# Low-count findings that may be drug-associated (§3); lymphopenia is not among them.
_DRUG_FAMILIES = {"leukocytes", "granulocytes", "pancytopenia"}
_NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Point:
    """One judged blood value (or blood count for pancytopenia) of a patient in one family."""

    time: int  # ns UTC
    low: bool
    grade: int  # CTCAE v5.0 grade, 0 when not low
    condition: str  # leukopenia | neutropenia | agranulocytosis | lymphopenia | pancytopenia | normal
    # What `summary` shows: (label, value, comparator, unit) per value; text only for the few Points a Flag quotes.
    shown: tuple[tuple, ...]
    refs: tuple[str, ...]  # evidence: "Observation/id"
    retracted: bool = False  # made (partly) of entered-in-error Observations
    derived: bool = False  # ANC computed from WBC and the differential (§2)

    @property
    def summary(self) -> str:
        """ "ANC 0.9 ×10^9/L" for the Flag text."""
        text = ", ".join(_shown(*value) for value in self.shown)
        return text + _DERIVED if self.derived else text


@dataclass
class FlagSpec:
    """A desired Flag as plain data; flag_resource.py turns it into FHIR JSON (§5)."""

    identifier: str
    patient_id: str
    family: str
    condition: str
    code: str
    display: str
    grade: int
    status: str  # active | inactive | entered-in-error
    start: datetime
    end: datetime | None
    text: str
    evidence: list[str]
    drugs: list[tuple[str, str]] = field(default_factory=list)  # (drug label, "MedicationStatement/id")
    # The episode's last low value: an open episode lapses once the time of evaluation is more than the episode gap
    # after it (v1.3 §4), since its family has had no value since.
    last_low: datetime | None = None


def episode_identifier(patient_id: str, family: str, start: datetime) -> str:
    """Stable digest of patient, family and episode start (§4 identity): the same in any run and input order."""
    text = f"{patient_id}|{family}|{iso_instant(start)}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


def iso_instant(moment: datetime) -> str:
    moment = moment.astimezone(timezone.utc)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def _to_datetime(ns: int) -> datetime:
    seconds, rest = divmod(ns, _NS_PER_S)
    return datetime.fromtimestamp(seconds, tz=timezone.utc).replace(microsecond=rest // 1000)


def _below(value: float, comparator: str | None, threshold: float) -> bool:
    """Strictly below (§2); `<x` means below x so `<x` counts when x <= threshold; `>` values are never low."""
    if comparator == "<":
        return value <= threshold
    if comparator in (">", ">="):
        return False
    return value < threshold


def _grade(value: float, comparator: str | None, grades: Grades) -> int:
    """CTCAE v5.0 grade of a value already known to be below the LLN/threshold."""
    if grades.g4_below is not None and _below(value, comparator, grades.g4_below):
        return 4
    if _below(value, comparator, grades.g3_below):
        return 3
    if _below(value, comparator, grades.g2_below):
        return 2
    return 1


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _shown(label: str, value: float, comparator: str | None, unit: str) -> str:
    return f"{label} {comparator if comparator == '<' else ''}{_number(value)} {unit}"


class _Bands:
    """Age-band lookup for one patient: the band boundaries as instants, computed once (§1.3)."""

    __slots__ = ("limits", "values")

    def __init__(self, bands: list[AgeBand], birth: date | None, attribute: str):
        self.values = [getattr(b, attribute) for b in bands]
        if birth is None:
            self.limits: list[int] = []
            self.values = self.values[-1:]
            return
        self.limits = [age_reached_ns(birth, b.below) for b in bands[:-1]]

    def at(self, time_ns: int) -> float:
        return self.values[bisect_right(self.limits, time_ns)]


@dataclass(slots=True)
class _Value:
    time: int
    value: float
    comparator: str | None
    lln: float
    panel: str | None
    ref: str
    retracted: bool


_UNIT = "×10^9/L"
_DERIVED = " (derived: WBC × (neutrophils % + bands %) / 100)"


class _PatientRules:
    """Turns one patient's values into Points per family; holds the rules and the patient's age bands."""

    def __init__(self, rules: Rules, info: PatientInfo | None, ages: dict | None = None):
        self.rules = rules
        birth = info.birth_date if info else None
        self.gender = info.gender if info else None
        self.ben = bool(info and info.ben)
        # What depends on the birth date only, shared by the patients born that day (`ages`: one run's cache).
        known = ages.get(birth) if ages is not None else None
        if known is None:
            known = self._ages(rules, birth)
            if ages is not None:
                ages[birth] = known
        (self.age_known, self.wbc_lln, self.anc_threshold, self.lymph_lln, self.lab_only_until, self.adult_from) = known

    @staticmethod
    def _ages(rules: Rules, birth: date | None) -> tuple:
        wbc_lln = _Bands(rules.wbc_lln, birth, "lln")
        anc_threshold = _Bands(rules.neutropenia.thresholds, birth, "threshold")
        lymph_lln = _Bands(rules.lymphopenia.lln, birth, "lln")
        if birth is None:
            return False, wbc_lln, anc_threshold, lymph_lln, None, None
        lab_only_until = age_reached_ns(birth, rules.neutropenia.lab_range_only_below)
        adult_from = age_reached_ns(birth, rules.pancytopenia.hemoglobin_lln.adult_from)
        return True, wbc_lln, anc_threshold, lymph_lln, lab_only_until, adult_from

    def _below_lln_point(self, v: _Value, default_lln, label: str, grades, condition: str) -> Point:
        """A count judged against its LLN: the lab's own range when the value carries one, else the age default."""
        lln = v.lln if v.lln == v.lln else default_lln.at(v.time)
        summary = ((label, v.value, v.comparator, _UNIT),)
        if not _below(v.value, v.comparator, lln):
            return Point(v.time, False, 0, "normal", summary, (v.ref,), v.retracted)
        return Point(v.time, True, _grade(v.value, v.comparator, grades), condition, summary, (v.ref,), v.retracted)

    # leukocytes (§2 leukopenia, §1.3 LLN)
    def wbc_point(self, v: _Value) -> Point:
        return self._below_lln_point(v, self.wbc_lln, "WBC", self.rules.leukopenia.grades, "leukopenia")

    # granulocytes (§2 neutropenia / agranulocytosis, BEN)
    def anc_point(self, v: _Value, refs: tuple[str, ...], derived: bool) -> Point | None:
        if self.lab_only_until is not None and v.time < self.lab_only_until:
            if v.lln != v.lln:
                return None  # under 14 days only the lab's own range can call it (§2)
            threshold = v.lln
        else:
            threshold = self.anc_threshold.at(v.time)
            if self.ben:
                threshold = min(threshold, self.rules.ben.threshold)
        summary = (("ANC", v.value, v.comparator, _UNIT),)
        if not _below(v.value, v.comparator, threshold):
            return Point(v.time, False, 0, "normal", summary, refs, v.retracted, derived)
        if _below(v.value, v.comparator, self.rules.agranulocytosis.below):
            return Point(v.time, True, 4, "agranulocytosis", summary, refs, v.retracted, derived)
        grade = _grade(v.value, v.comparator, self.rules.neutropenia.grades)
        return Point(v.time, True, grade, "neutropenia", summary, refs, v.retracted, derived)

    # lymphocytes (§2 lymphopenia; LLN = the lab's range when present, else the age default)
    def lymph_point(self, v: _Value) -> Point:
        return self._below_lln_point(v, self.lymph_lln, "lymphocytes", self.rules.lymphopenia.grades, "lymphopenia")

    def hemoglobin_low(self, v: _Value) -> bool:
        if v.lln == v.lln:
            lln = v.lln
        else:
            defaults = self.rules.pancytopenia.hemoglobin_lln
            if self.age_known and v.time < self.adult_from:
                lln = defaults.under_18
            else:
                lln = (
                    defaults.male
                    if self.gender == "male"
                    else (defaults.female if self.gender == "female" else defaults.other)
                )
        return _below(v.value, v.comparator, lln)

    def platelets_low(self, v: _Value) -> bool:
        return _below(v.value, v.comparator, v.lln if v.lln == v.lln else self.rules.pancytopenia.platelets_lln)

    # pancytopenia (§2): leukopenia + low hemoglobin + low platelets in one blood count
    def blood_count_point(self, wbc: Point, w: _Value, hb: _Value, plt: _Value) -> Point:
        p = self.rules.pancytopenia
        summary = wbc.shown + (
            ("hemoglobin", hb.value, hb.comparator, "g/dL"),
            ("platelets", plt.value, plt.comparator, _UNIT),
        )
        refs = (w.ref, hb.ref, plt.ref)
        retracted = w.retracted or hb.retracted or plt.retracted
        if not (wbc.low and self.hemoglobin_low(hb) and self.platelets_low(plt)):
            return Point(w.time, False, 0, "normal", summary, refs, retracted)
        grade = max(
            wbc.grade,
            _grade(hb.value, hb.comparator, p.hemoglobin_grades),
            _grade(plt.value, plt.comparator, p.platelets_grades),
        )
        return Point(w.time, True, grade, "pancytopenia", summary, refs, retracted)

    def not_pancytopenic(self, v: _Value, label: str, unit: str) -> Point:
        """One value that alone shows the blood count is not pancytopenic (v1.1 §4: it ends the episode)."""
        return Point(v.time, False, 0, "normal", ((label, v.value, v.comparator, unit),), (v.ref,), v.retracted)


def default_threshold(rules: Rules, info: PatientInfo | None, family: str, at: datetime) -> float:
    """The threshold a family's value is judged against at `at` when the lab gives no range of its own (§1.3, §2):
    the age band's LLN, or for granulocytes the neutropenia threshold (BEN included). Pancytopenia: the WBC's."""
    patient = _PatientRules(rules, info)
    at_ns = pd.Timestamp(at).as_unit("ns").value
    if family == "granulocytes":
        threshold = patient.anc_threshold.at(at_ns)
        return min(threshold, rules.ben.threshold) if patient.ben else threshold
    if family == "lymphocytes":
        return patient.lymph_lln.at(at_ns)
    return patient.wbc_lln.at(at_ns)


def _panel_key(v: _Value):
    return v.panel if v.panel is not None else v.time


def _points(rules: Rules, patient: _PatientRules, values: dict[str, list[_Value]]) -> dict[str, list[Point]]:
    """Every family's judged points for one patient, in time order."""
    out: dict[str, list[Point]] = {}
    wbc_values = values.get("wbc", [])
    wbc_points = [patient.wbc_point(v) for v in wbc_values]
    out["leukocytes"] = wbc_points
    granulocytes = [p for v in values.get("anc", []) if (p := patient.anc_point(v, (v.ref,), False)) is not None]
    if rules.derive_anc and values.get("neutrophils_pct"):
        # ANC when not reported: WBC × (neutrophils % + bands %) / 100 from the same panel (§2).
        reported = {_panel_key(v) for v in values.get("anc", [])}
        wbc_by = {}
        for v in wbc_values:
            wbc_by.setdefault(_panel_key(v), v)
        bands_by = {}
        for v in values.get("bands_pct", []):
            bands_by.setdefault(_panel_key(v), v)
        seen = set()
        for n in values["neutrophils_pct"]:
            key = _panel_key(n)
            w = wbc_by.get(key)
            if key in reported or key in seen or w is None:
                continue
            seen.add(key)
            band = bands_by.get(key)
            percent = n.value + (band.value if band else 0.0)
            refs = (w.ref, n.ref) + ((band.ref,) if band else ())
            retracted = w.retracted or n.retracted or bool(band and band.retracted)
            derived = _Value(w.time, w.value * percent / 100.0, w.comparator, float("nan"), w.panel, w.ref, retracted)
            point = patient.anc_point(derived, refs, True)
            if point is not None:
                granulocytes.append(point)
        granulocytes.sort(key=lambda p: (p.time, p.refs))
    out["granulocytes"] = granulocytes
    out["lymphocytes"] = [patient.lymph_point(v) for v in values.get("lymphocytes_abs", [])]
    out["pancytopenia"] = _blood_counts(rules, patient, wbc_values, wbc_points, values)
    return {family: _one_per_instant(points) for family, points in out.items()}


def _one_per_instant(points: list[Point]) -> list[Point]:
    """Several values of one family at one instant (a repeat on another analyser, a copy under another id) are one
    judgement: the worst of them, so a low value is never lost and a normal one beside it never closes the episode
    (recovery is a *later* value, §4). Each episode then starts at its own instant and has its own identifier.
    (docs/clinical-decisions.md "Simultaneous results".)"""
    if len(points) < 2:
        return points
    times = [p.time for p in points]
    if len(set(times)) == len(times):
        return points  # the usual case: one value per instant
    out: list[Point] = []
    i, n = 0, len(points)
    while i < n:
        j = i + 1
        while j < n and times[j] == times[i]:
            j += 1
        out.append(points[i] if j == i + 1 else _worst_at_one_instant(points[i:j]))
        i = j
    return out


def _worst_at_one_instant(group: list[Point]) -> Point:
    """The worst value (highest grade; a counted one before a retracted one), with every low value as evidence; it
    is retracted only when every low value is. Points come sorted by resource id, so the choice never depends on
    input order."""
    lows = [p for p in group if p.low]
    if not lows:
        return group[0]
    worst = max(lows, key=lambda p: (p.grade, not p.retracted))
    refs = list(worst.refs)
    for p in lows:
        refs.extend(r for r in p.refs if r not in refs)
    return Point(
        worst.time,
        True,
        worst.grade,
        worst.condition,
        worst.shown,
        tuple(refs),
        all(p.retracted for p in lows),
        worst.derived,
    )


def _blood_counts(rules, patient, wbc_values, wbc_points, values) -> list[Point]:
    """The blood counts of §2 pancytopenia and those that end it (v1.1 §4), in time order.

    A count is anchored on each WBC: hemoglobin and platelets of the same report, else the nearest within 24 h. It is
    pancytopenic when all three are low. What shows a count is *not* pancytopenic ends an episode: a WBC at or above
    its LLN alone, a low WBC beside a normal hemoglobin or platelet count, and a normal hemoglobin or platelet count
    alone. A low WBC without both others cannot be judged and changes nothing."""
    hbs, plts = values.get("hemoglobin", []), values.get("platelets", [])
    if not hbs or not plts:
        return []  # no hemoglobin or no platelets at all: never pancytopenia, so nothing to end either
    window = int(rules.pancytopenia.same_count_within.total_seconds()) * _NS_PER_S
    hb_times = [v.time for v in hbs]
    plt_times = [v.time for v in plts]
    hb_panel = {v.panel: v for v in hbs if v.panel is not None}
    plt_panel = {v.panel: v for v in plts if v.panel is not None}
    points = []
    counted: set[str] = set()  # hemoglobin and platelet values judged inside a WBC's count
    for w, wp in zip(wbc_values, wbc_points):
        hb = hb_panel.get(w.panel) if w.panel is not None else None
        hb = hb or _nearest(hbs, hb_times, w.time, window)
        plt = plt_panel.get(w.panel) if w.panel is not None else None
        plt = plt or _nearest(plts, plt_times, w.time, window)
        if hb is not None and plt is not None:
            points.append(patient.blood_count_point(wp, w, hb, plt))
            counted.update((hb.ref, plt.ref))
        elif not wp.low:
            points.append(Point(w.time, False, 0, "normal", wp.shown, wp.refs, wp.retracted))
        elif hb is not None and not patient.hemoglobin_low(hb):
            points.append(patient.not_pancytopenic(hb, "hemoglobin", "g/dL"))
            counted.add(hb.ref)
        elif plt is not None and not patient.platelets_low(plt):
            points.append(patient.not_pancytopenic(plt, "platelets", _UNIT))
            counted.add(plt.ref)
    if not any(p.low for p in points):
        return points  # no pancytopenic count: no episode for the values below to end
    points.extend(
        patient.not_pancytopenic(v, "hemoglobin", "g/dL")
        for v in hbs
        if v.ref not in counted and not patient.hemoglobin_low(v)
    )
    points.extend(
        patient.not_pancytopenic(v, "platelets", _UNIT)
        for v in plts
        if v.ref not in counted and not patient.platelets_low(v)
    )
    points.sort(key=lambda p: (p.time, p.refs))
    return points


def _nearest(items: list[_Value], times: list[int], at: int, window: int) -> _Value | None:
    i = bisect_right(times, at)
    best = None
    for j in (i - 1, i):
        if (
            0 <= j < len(items)
            and abs(times[j] - at) <= window
            and (best is None or abs(times[j] - at) < abs(best.time - at))
        ):
            best = items[j]
    return best


@dataclass
class _Episode:
    lows: list[Point]
    recovery: Point | None = None
    gap_closed: bool = False
    lapsed: bool = False


def _episodes(points: list[Point], episode_gap: int, as_of: int) -> list[_Episode]:
    """§4: an episode opens at the first low after a normal value (or with no earlier value) and ends at the first
    later value at or above the threshold; a low value more than the episode gap after the previous value opens a
    new one (v1.1 §4 "Episode gap"); the episode still open at the end lapses when the family's last value is more
    than the episode gap before `as_of` (v1.3 §4 "Lapse": strictly more, as for the gap)."""
    out: list[_Episode] = []
    current: _Episode | None = None
    last_time: int | None = None
    for p in points:
        if p.low and current is not None and last_time is not None and p.time - last_time > episode_gap:
            # The old episode ends unconfirmed at its last low value; what follows is a new episode.
            current.gap_closed = True
            out.append(current)
            current = None
        if p.low:
            if current is None:
                current = _Episode([p])
            else:
                current.lows.append(p)
        elif current is not None:
            current.recovery = p
            out.append(current)
            current = None
        last_time = p.time
    if current is not None:
        # Its last low is the family's last value: a later one would have joined or ended the episode.
        current.lapsed = as_of - last_time > episode_gap
        out.append(current)
    return out


def _condition_meta(rules: Rules, condition: str):
    return {
        "leukopenia": rules.leukopenia,
        "neutropenia": rules.neutropenia,
        "agranulocytosis": rules.agranulocytosis,
        "lymphopenia": rules.lymphopenia,
        "pancytopenia": rules.pancytopenia,
    }[condition]


def _spec(
    rules: Rules, patient_id: str, family: str, episode: _Episode, status: str, exposures: list[tuple]
) -> FlagSpec:
    """The Flag of one episode (§4, §5): its worst value, period and status, drugs (§3), text and evidence."""
    worst = max(episode.lows, key=lambda p: (p.grade, -p.time))  # escalation: the worst grade, first reached
    meta = _condition_meta(rules, worst.condition)
    start, end, status, transient = _period_and_status(rules, episode, status)
    drugs = _associated_drugs(rules, family, episode.lows[0].time, status, exposures)
    return FlagSpec(
        identifier=episode_identifier(patient_id, family, start),
        patient_id=patient_id,
        family=family,
        condition=worst.condition,
        code=meta.snomed,
        display=meta.display,
        grade=worst.grade,
        status=status,
        start=start,
        end=end,
        text=_flag_text(rules, meta, worst, episode, status, end, transient, drugs),
        evidence=_evidence(episode),
        drugs=drugs,
        last_low=_to_datetime(episode.lows[-1].time),
    )


def _period_and_status(rules: Rules, episode: _Episode, status: str) -> tuple[datetime, datetime | None, str, bool]:
    """(start, end, status, transient): active while open; inactive once a later normal value ended it (transient
    when within `transient_within` of the start), or at its last low value once the episode gap closed it or it
    lapsed (§4): those did not recover, so they are never transient."""
    start = _to_datetime(episode.lows[0].time)
    end = None
    transient = False
    if episode.recovery is not None:
        end = _to_datetime(episode.recovery.time)
        transient = end - start <= rules.windows.transient_within
    elif episode.gap_closed or episode.lapsed:
        end = _to_datetime(episode.lows[-1].time)
    if status == "active" and end is not None:
        status = "inactive"
    return start, end, status, transient


def _associated_drugs(
    rules: Rules, family: str, onset_ns: int, status: str, exposures: list[tuple]
) -> list[tuple[str, str]]:
    """(label, medication reference) of each exposure overlapping [onset − look-back, onset] (§3); the finding time
    is the episode's onset. Lymphopenia and retracted Flags are never drug-associated."""
    drugs: list[tuple[str, str]] = []
    if family not in _DRUG_FAMILIES or status == "entered-in-error":
        return drugs
    lookback = int(rules.windows.drug_lookback.total_seconds()) * _NS_PER_S
    for label, ref, ex_start, ex_end in exposures:
        if (
            ex_start <= onset_ns
            and (ex_end is None or ex_end >= onset_ns - lookback)
            and all(ref != r for _, r in drugs)
        ):
            drugs.append((label, ref))
    return drugs


def _flag_text(
    rules: Rules,
    meta,
    worst: Point,
    episode: _Episode,
    status: str,
    end: datetime | None,
    transient: bool,
    drugs: list[tuple[str, str]],
) -> str:
    """ "Neutropenia, moderate — ANC 0.9 ×10^9/L on 2011-03-04, CTCAE v5.0 grade 3", then what became of it (§5)."""
    severity = ""
    if worst.condition == "neutropenia":
        word = rules.neutropenia.severity_words.get(worst.grade)
        severity = f", {word}" if word else ""
    day = _to_datetime(worst.time).date().isoformat()
    text = f"{meta.display}{severity} — {worst.summary} on {day}, CTCAE v5.0 grade {worst.grade}"
    if drugs:
        text += f"; possibly drug-associated: {', '.join(sorted({label for label, _ in drugs}))}"
    if status == "entered-in-error":
        text += "; entered in error: its only evidence was retracted"
    elif transient:
        hours = int(rules.windows.transient_within.total_seconds() // 3600)
        text += f"; transient low count, normal again within {hours} h — consistent with pseudoleukopenia"
    elif episode.recovery is not None:
        text += f"; normal again on {end.date().isoformat()}"
    elif episode.gap_closed:
        text += "; no follow-up count for too long, closed when a later episode began"
    elif episode.lapsed:
        text += f"; no follow-up count for more than {_span_words(rules.windows.episode_gap)}"
    return text


def _span_words(span: timedelta) -> str:
    """90 days -> "90 days"; a span that is no whole number of days in hours ("36 h"), as the transient text does."""
    days, rest = divmod(span, timedelta(days=1))
    if not rest:
        return f"{days} day" if days == 1 else f"{days} days"
    return f"{span / timedelta(hours=1):g} h"


def _evidence(episode: _Episode) -> list[str]:
    """The low Observations, then the recovering one, each once (§5 flag-detail)."""
    evidence: list[str] = []
    for p in episode.lows + ([episode.recovery] if episode.recovery is not None else []):
        for ref in p.refs:
            if ref not in evidence:
                evidence.append(ref)
    return evidence


def evaluate(
    observations: pd.DataFrame,
    patients: dict[str, PatientInfo],
    exposures: pd.DataFrame | None,
    rules: Rules,
    as_of: datetime | None = None,
) -> list[FlagSpec]:
    """Desired Flags for every (patient, family) episode in the rows (§2-§4); deterministic in any row order.

    `as_of` is the time of the evaluation: values after it are set aside, and an open episode whose family has had no
    value for more than the episode gap before it has lapsed (v1.3 §4). Default: the latest time in the rows."""
    if observations is None or observations.empty:
        return []
    statuses = rules.observations.statuses
    counted = set(statuses.counted) | ({"preliminary"} if statuses.preliminary_counts else set())
    wanted = (
        observations["status"].isin(counted | {statuses.retracted})
        & observations["value"].notna()
        & observations["time"].notna()
        & observations["patient_id"].notna()
    )
    if as_of is not None:
        wanted &= observations["time"] <= pd.Timestamp(as_of)
        as_of_ns = pd.Timestamp(as_of).as_unit("ns").value
    elif wanted.any():
        as_of_ns = observations.loc[wanted, "time"].max().as_unit("ns").value  # of every patient, not only those below
    else:
        return []
    wanted &= observations["patient_id"].isin(_patients_with_low_values(observations[wanted], patients, rules))
    frame = observations[wanted]  # one filtered copy, of only the columns used below
    if frame.empty:
        return []
    frame = frame.sort_values(["patient_id", "time", "resource_id"], kind="mergesort")
    patient_col = frame["patient_id"].tolist()
    concept_col = frame["concept"].tolist()
    time_col = (
        frame["time"].astype("int64").tolist()
        if frame["time"].dt.unit == "ns"
        else (frame["time"].dt.as_unit("ns").astype("int64").tolist())
    )
    value_col = frame["value"].tolist()
    comparator_col = frame["comparator"].tolist()
    lln_col = frame["lln"].astype("float64").tolist()
    panel_col = frame["panel"].tolist()
    ref_col = frame["resource_id"].tolist()
    retracted_col = (frame["status"] == statuses.retracted).tolist()
    exposures_by_patient = _exposures_by_patient(exposures, rules)
    episode_gap = int(rules.windows.episode_gap.total_seconds()) * _NS_PER_S
    specs: list[FlagSpec] = []
    ages: dict = {}
    n = len(patient_col)
    start = 0
    while start < n:
        pid = patient_col[start]
        stop = start
        while stop < n and patient_col[stop] == pid:
            stop += 1
        counted_values: dict[str, list[_Value]] = defaultdict(list)
        all_values: dict[str, list[_Value]] = defaultdict(list)
        any_retracted = False
        for i in range(start, stop):
            comparator = comparator_col[i] if isinstance(comparator_col[i], str) else None
            panel = panel_col[i] if isinstance(panel_col[i], str) else None
            v = _Value(time_col[i], value_col[i], comparator, lln_col[i], panel, ref_col[i], retracted_col[i])
            all_values[concept_col[i]].append(v)
            if v.retracted:
                any_retracted = True
            else:
                counted_values[concept_col[i]].append(v)
        specs.extend(
            _patient_flags(
                rules,
                pid,
                patients.get(pid),
                counted_values,
                all_values if any_retracted else None,
                exposures_by_patient.get(pid, []),
                episode_gap,
                as_of_ns,
                ages,
            )
        )
        start = stop
    specs.sort(key=lambda s: (s.patient_id, s.family, s.start))
    return specs


def lapse_horizon(specs: list[FlagSpec], rules: Rules) -> datetime | None:
    """The earliest time of evaluation at which one of these Flags' open episodes would lapse (v1.3 §4), or None when
    none is open: evaluated as of any time up to it, they are the same."""
    lows = [s.last_low for s in specs if s.end is None and s.last_low is not None]
    return min(lows) + rules.windows.episode_gap if lows else None


def _patients_with_low_values(frame: pd.DataFrame, patients: dict[str, PatientInfo], rules: Rules) -> np.ndarray:
    """The patients with at least one value that may be low; the others cannot have a Flag (§4: every episode,
    retracted ones too, opens at a low value). Vectorised and conservative, so that the per-patient rules run
    only where they can find something: each bound is at least the threshold the value is judged against.
    - WBC and lymphocytes: the row's LLN (lab range), else the age band's LLN: the adult band's once the patient
      is surely in it, else the highest band's;
    - ANC: the higher of the row's LLN (under 14 days only the lab's range counts) and that age band threshold
      (benign ethnic neutropenia only lowers it);
    - a neutrophil % may give a derived ANC: its patient is always kept (when derive_anc is on);
    - pancytopenia needs a low WBC; hemoglobin and platelets alone raise nothing.
    A value with comparator `>` or `>=` is never low; `<x` is low when x <= threshold, hence `<=` below."""
    if frame.empty:
        return np.empty(0, dtype=object)
    concept = frame["concept"].to_numpy(dtype=object)
    value = frame["value"].to_numpy(dtype="float64")
    lln = frame["lln"].to_numpy(dtype="float64")
    time = frame["time"].dt.as_unit("ns").astype("int64").to_numpy()
    codes, uniques = pd.factorize(frame["patient_id"])
    adult = time >= _adult_from(uniques, patients, rules)[codes]
    bound = np.full(len(frame), -np.inf)
    bands = {
        "wbc": [b.lln for b in rules.wbc_lln],
        "lymphocytes_abs": [b.lln for b in rules.lymphopenia.lln],
        "anc": [b.threshold for b in rules.neutropenia.thresholds],
    }
    for name, values in bands.items():
        rows = concept == name
        if rows.any():
            band = np.where(adult[rows], values[-1], max(values))
            # Lab LLN when present, else the band; for ANC the higher of the two (NaN ignored by fmax).
            bound[rows] = np.fmax(lln[rows], band) if name == "anc" else np.where(np.isnan(lln[rows]), band, lln[rows])
    maybe = (value <= bound) & ~frame["comparator"].isin([">", ">="]).to_numpy()
    if rules.derive_anc:
        maybe |= concept == "neutrophils_pct"
    return uniques.to_numpy(dtype=object)[np.unique(codes[maybe])]


def _adult_from(patient_ids, patients: dict[str, PatientInfo], rules: Rules) -> np.ndarray:
    """Per patient, the instant (ns) from which every age-banded threshold is its last (adult) band; the smallest
    int64 when the birth date is unknown (adult thresholds then, §1.3) or when no threshold has more than one band."""
    lists = [rules.wbc_lln, rules.lymphopenia.lln, rules.neutropenia.thresholds]
    last_starts = [bands[-2].below for bands in lists if len(bands) > 1]
    low = np.iinfo(np.int64).min
    by_birth: dict = {}
    out = np.empty(len(patient_ids), dtype=np.int64)
    for i, pid in enumerate(patient_ids):
        info = patients.get(pid)
        birth = info.birth_date if info else None
        if birth is None:
            out[i] = low
            continue
        start = by_birth.get(birth)
        if start is None:
            start = by_birth[birth] = max((age_reached_ns(birth, span) for span in last_starts), default=low)
        out[i] = start
    return out


def _patient_flags(
    rules, pid, info, counted_values, all_values, exposures, episode_gap, as_of, ages=None
) -> list[FlagSpec]:
    patient = _PatientRules(rules, info, ages)
    specs = []
    real = _points(rules, patient, counted_values)
    real_ids: set[str] = set()
    for family in FAMILIES:
        for episode in _episodes(real.get(family, []), episode_gap, as_of):
            spec = _spec(rules, pid, family, episode, "active", exposures)
            real_ids.add(spec.identifier)
            specs.append(spec)
    if all_values is not None:
        # §1.1 retraction: an episode that only existed because of an entered-in-error Observation (it opened
        # it) becomes an entered-in-error Flag with the same identifier, so a Flag written earlier is withdrawn.
        with_retracted = _points(rules, patient, all_values)
        for family in FAMILIES:
            for episode in _episodes(with_retracted.get(family, []), episode_gap, as_of):
                if not episode.lows[0].retracted:
                    continue
                spec = _spec(rules, pid, family, episode, "entered-in-error", exposures)
                if spec.identifier not in real_ids:
                    real_ids.add(spec.identifier)
                    specs.append(spec)
    return specs


def _exposures_by_patient(exposures: pd.DataFrame | None, rules: Rules) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = defaultdict(list)
    if exposures is None or exposures.empty:
        return out
    drugs = rules.medications.drugs
    frame = exposures[exposures["start"].notna() & exposures["patient_id"].notna()]
    frame = frame.sort_values(["patient_id", "start", "resource_id"], kind="mergesort")
    starts = frame["start"].dt.as_unit("ns").astype("int64").tolist()
    ends = frame["end"].dt.as_unit("ns")
    ends = [None if pd.isna(e) else int(e.value) for e in ends]
    agents = frame["agent"] if "agent" in frame else [None] * len(frame)
    columns = zip(frame["patient_id"], frame["drug"], agents, frame["resource_id"], starts, ends)
    for pid, drug, agent, ref, s, e in columns:
        label = drugs[drug].label if drug in drugs else str(drug)
        if isinstance(agent, str) and agent and agent.lower() != label.lower():
            label = f"{label} ({agent})"  # the class and the agent: "antineoplastic chemotherapy (oxaliplatin)"
        out[pid].append((label, ref, s, e))
    return out
