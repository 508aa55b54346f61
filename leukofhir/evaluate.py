"""The leukopenia rules (clinical-rules §2-§4) as pure functions: tidy rows in, desired Flags out as plain data."""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

import numpy as np
import pandas as pd

from leukofhir.config import AgeBand, Grades, Rules
from leukofhir.normalise import PatientInfo

__all__ = ["FlagSpec", "Point", "evaluate", "episode_identifier", "iso_instant", "FAMILIES"]

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
        """"ANC 0.9 ×10^9/L" for the Flag text."""
        text = ", ".join(_shown(*value) for value in self.shown)
        return text + _DERIVED if self.derived else text


@dataclass
class FlagSpec:
    """A desired Flag as plain data; flags.py turns it into FHIR JSON (§5)."""

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
    derived: bool = False
    transient: bool = False


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
        born = datetime(birth.year, birth.month, birth.day, tzinfo=timezone.utc)
        self.limits = [int(b.below.after(born).timestamp()) * _NS_PER_S for b in bands[:-1]]

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
        (self.birth_ns, self.wbc_lln, self.anc_threshold, self.lymph_lln, self.lab_only_until,
         self.adult_from) = known

    @staticmethod
    def _ages(rules: Rules, birth: date | None) -> tuple:
        wbc_lln = _Bands(rules.wbc_lln, birth, "lln")
        anc_threshold = _Bands(rules.neutropenia.thresholds, birth, "threshold")
        lymph_lln = _Bands(rules.lymphopenia.lln, birth, "lln")
        if birth is None:
            return None, wbc_lln, anc_threshold, lymph_lln, None, None
        born = datetime(birth.year, birth.month, birth.day, tzinfo=timezone.utc)
        birth_ns = int(born.timestamp()) * _NS_PER_S
        lab_only_until = int(rules.neutropenia.lab_range_only_below.after(born).timestamp()) * _NS_PER_S
        adult_from = int(born.replace(year=born.year + 18).timestamp()) * _NS_PER_S if not (
            born.month == 2 and born.day == 29) else int(born.replace(year=born.year + 18, day=28).timestamp()) * _NS_PER_S
        return birth_ns, wbc_lln, anc_threshold, lymph_lln, lab_only_until, adult_from

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

    def hemoglobin_lln(self, v: _Value) -> float:
        if v.lln == v.lln:
            return v.lln
        defaults = self.rules.pancytopenia.hemoglobin_lln
        if self.birth_ns is not None and v.time < self.adult_from:
            return defaults.under_18
        return {"male": defaults.male, "female": defaults.female}.get(self.gender, defaults.other)

    # pancytopenia (§2): leukopenia + low hemoglobin + low platelets in one blood count
    def blood_count_point(self, wbc: Point, w: _Value, hb: _Value, plt: _Value) -> Point:
        p = self.rules.pancytopenia
        hb_low = _below(hb.value, hb.comparator, self.hemoglobin_lln(hb))
        plt_lln = plt.lln if plt.lln == plt.lln else p.platelets_lln
        plt_low = _below(plt.value, plt.comparator, plt_lln)
        summary = wbc.shown + (("hemoglobin", hb.value, hb.comparator, "g/dL"),
                               ("platelets", plt.value, plt.comparator, _UNIT))
        refs = (w.ref, hb.ref, plt.ref)
        retracted = w.retracted or hb.retracted or plt.retracted
        if not (wbc.low and hb_low and plt_low):
            return Point(w.time, False, 0, "normal", summary, refs, retracted)
        grade = max(
            wbc.grade,
            _grade(hb.value, hb.comparator, p.hemoglobin_grades),
            _grade(plt.value, plt.comparator, p.platelets_grades),
        )
        return Point(w.time, True, grade, "pancytopenia", summary, refs, retracted)


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
    return out


def _blood_counts(rules, patient, wbc_values, wbc_points, values) -> list[Point]:
    """One blood count per WBC: hemoglobin and platelets of the same report, else the nearest within 24 h."""
    hbs, plts = values.get("hemoglobin", []), values.get("platelets", [])
    if not hbs or not plts:
        return []
    window = int(rules.pancytopenia.same_count_within.total_seconds()) * _NS_PER_S
    hb_times = [v.time for v in hbs]
    plt_times = [v.time for v in plts]
    hb_panel = {v.panel: v for v in hbs if v.panel is not None}
    plt_panel = {v.panel: v for v in plts if v.panel is not None}
    points = []
    for w, wp in zip(wbc_values, wbc_points):
        hb = hb_panel.get(w.panel) if w.panel is not None else None
        hb = hb or _nearest(hbs, hb_times, w.time, window)
        plt = plt_panel.get(w.panel) if w.panel is not None else None
        plt = plt or _nearest(plts, plt_times, w.time, window)
        if hb is not None and plt is not None:
            points.append(patient.blood_count_point(wp, w, hb, plt))
    return points


def _nearest(items: list[_Value], times: list[int], at: int, window: int) -> _Value | None:
    i = bisect_right(times, at)
    best = None
    for j in (i - 1, i):
        if 0 <= j < len(items) and abs(times[j] - at) <= window:
            if best is None or abs(times[j] - at) < abs(best.time - at):
                best = items[j]
    return best


@dataclass
class _Episode:
    lows: list[Point]
    recovery: Point | None = None
    gap_closed: bool = False


def _episodes(points: list[Point], history: int) -> list[_Episode]:
    """§4: an episode opens at the first low after a normal value (or after no value within the look-back) and
    ends at the first later value at or above the threshold."""
    out: list[_Episode] = []
    current: _Episode | None = None
    last_time: int | None = None
    for p in points:
        if p.low and current is not None and last_time is not None and p.time - last_time > history:
            # No value for longer than the episode gap: what follows is a new episode (§4 "no earlier value in the
            # look-back"); the old one ends unconfirmed. The gap is ours (docs/clinical-decisions.md).
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
    """The Flag of one episode: worst severity reached (§4 escalation), transient/resolved state, drugs (§3)."""
    worst = max(episode.lows, key=lambda p: (p.grade, -p.time))
    meta = _condition_meta(rules, worst.condition)
    start_ns = episode.lows[0].time
    start = _to_datetime(start_ns)
    end = None
    transient = False
    window = rules.windows.transient_within
    if episode.recovery is not None:
        end = _to_datetime(episode.recovery.time)
        transient = end - start <= window
    elif episode.gap_closed:
        end = _to_datetime(episode.lows[-1].time)
    if status == "active" and end is not None:
        status = "inactive"
    severity = ""
    if worst.condition == "neutropenia":
        word = rules.neutropenia.severity_words.get(worst.grade)
        severity = f", {word}" if word else ""
    text = f"{meta.display}{severity} — {worst.summary} on {_to_datetime(worst.time).date().isoformat()}, CTCAE v5.0 grade {worst.grade}"
    drugs: list[tuple[str, str]] = []
    if family in _DRUG_FAMILIES and status != "entered-in-error":
        lookback = int(rules.windows.drug_lookback.total_seconds()) * _NS_PER_S
        for label, ref, ex_start, ex_end in exposures:
            # Exposure overlapping [finding time − look-back, finding time] (§3); finding time = the episode start.
            if ex_start <= start_ns and (ex_end is None or ex_end >= start_ns - lookback):
                if all(ref != r for _, r in drugs):
                    drugs.append((label, ref))
    if drugs:
        labels = sorted({label for label, _ in drugs})
        text += f"; possibly drug-associated: {', '.join(labels)}"
    if status == "entered-in-error":
        text += "; entered in error: its only evidence was retracted"
    elif transient:
        hours = int(window.total_seconds() // 3600)
        text += f"; transient low count, normal again within {hours} h — consistent with pseudoleukopenia"
    elif episode.recovery is not None:
        text += f"; normal again on {end.date().isoformat()}"
    elif episode.gap_closed:
        text += "; no follow-up count for too long, closed when a later episode began"
    evidence: list[str] = []
    for p in episode.lows + ([episode.recovery] if episode.recovery is not None else []):
        for ref in p.refs:
            if ref not in evidence:
                evidence.append(ref)
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
        text=text,
        evidence=evidence,
        drugs=drugs,
        derived=any(p.derived for p in episode.lows),
        transient=transient,
    )


def evaluate(
    observations: pd.DataFrame,
    patients: dict[str, PatientInfo],
    exposures: pd.DataFrame | None,
    rules: Rules,
    as_of: datetime | None = None,
) -> list[FlagSpec]:
    """Desired Flags for every (patient, family) episode in the rows (§2-§4); deterministic in any row order."""
    if observations is None or observations.empty:
        return []
    statuses = rules.observations.statuses
    counted = set(statuses.counted) | ({"preliminary"} if statuses.preliminary_counts else set())
    wanted = (
        observations["status"].isin(counted | {statuses.retracted})
        & observations["value"].notna() & observations["time"].notna() & observations["patient_id"].notna()
    )
    if as_of is not None:
        wanted &= observations["time"] <= pd.Timestamp(as_of)
    wanted &= observations["patient_id"].isin(_patients_with_low_values(observations[wanted], patients, rules))
    frame = observations[wanted]  # one filtered copy, of only the columns used below
    if frame.empty:
        return []
    frame = frame.sort_values(["patient_id", "time", "resource_id"], kind="mergesort")
    patient_col = frame["patient_id"].tolist()
    concept_col = frame["concept"].tolist()
    time_col = frame["time"].astype("int64").tolist() if frame["time"].dt.unit == "ns" else (
        frame["time"].dt.as_unit("ns").astype("int64").tolist())
    value_col = frame["value"].tolist()
    comparator_col = frame["comparator"].tolist()
    lln_col = frame["lln"].astype("float64").tolist()
    panel_col = frame["panel"].tolist()
    ref_col = frame["resource_id"].tolist()
    retracted_col = (frame["status"] == statuses.retracted).tolist()
    exposures_by_patient = _exposures_by_patient(exposures, rules)
    history = int(rules.windows.episode_gap.total_seconds()) * _NS_PER_S
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
        specs.extend(_patient_flags(rules, pid, patients.get(pid), counted_values, all_values if any_retracted else None,
                                    exposures_by_patient.get(pid, []), history, ages))
        start = stop
    specs.sort(key=lambda s: (s.patient_id, s.family, s.start))
    return specs


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
    int64 when the birth date is unknown (adult thresholds then, §1.3), the largest when there is only one band."""
    lists = [rules.wbc_lln, rules.lymphopenia.lln, rules.neutropenia.thresholds]
    last_starts = [bands[-2].below for bands in lists if len(bands) > 1]
    low, high = np.iinfo(np.int64).min, np.iinfo(np.int64).max
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
            born = datetime(birth.year, birth.month, birth.day, tzinfo=timezone.utc)
            start = by_birth[birth] = max(
                (int(span.after(born).timestamp()) * _NS_PER_S for span in last_starts), default=low)
        out[i] = start
    return out


def _patient_flags(rules, pid, info, counted_values, all_values, exposures, history, ages=None) -> list[FlagSpec]:
    patient = _PatientRules(rules, info, ages)
    specs = []
    real = _points(rules, patient, counted_values)
    real_ids: set[str] = set()
    for family in FAMILIES:
        for episode in _episodes(real.get(family, []), history):
            spec = _spec(rules, pid, family, episode, "active", exposures)
            real_ids.add(spec.identifier)
            specs.append(spec)
    if all_values is not None:
        # §1.1 retraction: an episode that only existed because of an entered-in-error Observation (it opened
        # it) becomes an entered-in-error Flag with the same identifier, so a Flag written earlier is withdrawn.
        with_retracted = _points(rules, patient, all_values)
        for family in FAMILIES:
            for episode in _episodes(with_retracted.get(family, []), history):
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
    for pid, drug, agent, ref, s, e in zip(frame["patient_id"], frame["drug"], agents, frame["resource_id"], starts, ends):
        label = drugs[drug].label if drug in drugs else str(drug)
        if isinstance(agent, str) and agent and agent.lower() != label.lower():
            label = f"{label} ({agent})"  # the class and the agent: "antineoplastic chemotherapy (oxaliplatin)"
        out[pid].append((label, ref, s, e))
    return out
