"""The stages every evaluation runs, whatever drives it (offline `evaluate`, a partition, an online run's chunk):
read and normalise → validate → the rules → Flags → the run report; and what the drivers share around them (read
errors shown and kept, one progress bar)."""

from __future__ import annotations

import logging
import sys
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

import pandas as pd

from leukofhir.config import Rules
from leukofhir.evaluate.flag_resource import build_flag, flag_row
from leukofhir.evaluate.rules import FlagSpec, evaluate, lapse_horizon
from leukofhir.evaluate.trends import flag_trends
from leukofhir.evaluate.validate import contract_counts, merge_contract, validate_batch
from leukofhir.extract.reader import ReadError, expand_paths, iter_located
from leukofhir.fhir.references import DETAIL_URL
from leukofhir.normalise import Normalised, Normaliser

__all__ = [
    "run_stages",
    "read_and_normalise",
    "validate_rows",
    "evaluate_rows",
    "build_flags",
    "build_report",
    "held_flags",
    "flag_frame",
    "read_error_collector",
    "progress_bar",
    "CappedWarnings",
    "Sources",
    "ReadResult",
    "Validated",
    "Evaluation",
    "CheckedFlags",
    "Staged",
]

log = logging.getLogger(__name__)

SKIP_RETRACTED = "status entered-in-error (used only to retract)"
SKIP_AFTER_AS_OF = "after the as-of time"
EXAMPLES = 5
SHOWN_READ_ERRORS = 20


class Sources:
    """Where each resource was read, kept compact (three ints) so quarantined ones can be re-read at the end."""

    def __init__(self):
        self.paths: list[str] = []
        self._path_index: dict[str, int] = {}
        self.file = array("i")
        self.line = array("q")
        self.entry = array("q")

    def path_index(self, path: str) -> int:
        index = self._path_index.get(path)
        if index is None:
            index = self._path_index[path] = len(self.paths)
            self.paths.append(path)
        return index

    def key(self, index: int) -> tuple[int, int, int]:
        return self.file[index], self.line[index], self.entry[index]


def _read(paths, normaliser: Normaliser, sources: Sources, on_error, progress: bool) -> Counter:
    """Feed every resource to the normaliser, noting where it was read; the per-resource hot loop of a run."""
    counts: dict[str, int] = {}
    add = normaliser.add
    add_file, add_line, add_entry = sources.file.append, sources.line.append, sources.entry.append
    last_path, file_index = None, -1
    for index, (resource, path, line, entry) in enumerate(_reading(iter_located(paths, on_error), progress)):
        if path is not last_path:  # one str object per file: an identity check, not a lookup per resource
            last_path, file_index = path, sources.path_index(path)
        add_file(file_index)
        add_line(-1 if line is None else line)
        add_entry(-1 if entry is None else entry)
        kind = resource["resourceType"]
        counts[kind] = counts.get(kind, 0) + 1
        add(resource, index)
    return Counter(counts)


def _reading(items, enabled: bool):
    bar = progress_bar("reading", enabled, iterable=items)
    return items if bar is None else bar


def progress_bar(
    desc: str,
    enabled: bool,
    *,
    total: int | None = None,
    iterable=None,
    unit: str = " resources",
    unit_scale: bool = True,
):
    """The one progress bar of a run (tqdm, on stderr), or None when not wanted or stderr is not a terminal (a log
    file, an Airflow task): over `iterable` when given, else updated by the caller."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, unit=unit, unit_scale=unit_scale, file=sys.stderr, desc=desc)
    return None


def _bucket(reason: str) -> str:
    """The report groups quarantine reasons by kind: a GX reason's value detail (after ': ') is per row."""
    return reason.split(": ", 1)[0]


class CappedWarnings:
    """Log the first `limit` warnings of one kind, then one line saying where the rest are, so a run with thousands
    of the same problem keeps a readable log (everything is still counted and written to the run's files)."""

    def __init__(self, limit: int, rest: str):
        self.limit, self.rest, self.count = limit, rest, 0

    def __call__(self, message: str, *args) -> None:
        if self.count < self.limit:
            log.warning(message, *args)
        elif self.count == self.limit:
            log.warning("%s", self.rest)
        self.count += 1


def read_error_collector() -> tuple[list[ReadError], Callable[[ReadError], None]]:
    """The read errors of a run, and the callback the reader calls with each: kept (all of them go to
    quarantine.ndjson) and shown as they happen (file, line and why, never content), capped."""
    read_errors: list[ReadError] = []
    warn = CappedWarnings(SHOWN_READ_ERRORS, "more read errors: see quarantine.ndjson")

    def on_read_error(error: ReadError) -> None:
        warn("%s", error)
        read_errors.append(error)

    return read_errors, on_read_error


# -- stage 1: read and normalise ---------------------------------------------------------------------------------------
@dataclass
class ReadResult:
    """What reading and normalising leave: the tidy rows and buckets, what was read, and where (for quarantine)."""

    normalised: Normalised
    read_counts: Counter
    read_errors: list[ReadError]
    sources: Sources
    skipped_files: list[str]  # files in a folder given that are not FHIR data (said, never read)

    @property
    def read_total(self) -> int:
        return sum(self.read_counts.values())


def read_and_normalise(paths, rules: Rules, *, base_url=None, progress: bool = True) -> ReadResult:
    """Stage 1: read the files (Bundles, NDJSON, plain or .gz) and normalise them, streaming: only compact rows and
    each resource's origin are kept. A bad line or file is a read error (shown as it happens, capped; all of them go
    to quarantine.ndjson); an input that does not exist is a UsageError; `base_url`: the local server's base URL(s),
    see Normaliser."""
    skipped_files: list[str] = []
    files = expand_paths(paths, skipped_files)
    read_errors, on_read_error = read_error_collector()
    sources = Sources()
    normaliser = Normaliser(rules, base_url=base_url)
    read_counts = _read(files, normaliser, sources, on_read_error, progress)
    return ReadResult(normaliser.finish(), read_counts, read_errors, sources, skipped_files)


# -- stage 2: validate -------------------------------------------------------------------------------------------------
@dataclass
class Validated:
    """The rows that passed the GX suites, the ones quarantined with their reasons, and GX's results."""

    observations: pd.DataFrame
    exposures: pd.DataFrame
    quarantined: list[tuple[int, str | None, list[str]]]
    expectations: list[dict]
    failed_rows: int
    frames: list[tuple[str, pd.DataFrame]]  # the validated batches, kept only for Data Docs
    contract: list[dict] = field(default_factory=list)  # the data contract's counts (validate.contract_counts)


def validate_rows(
    normalised: Normalised, parameters: dict, *, keep_frames: bool = False, validate: Callable = validate_batch
) -> Validated:
    """Stage 2: the Observation and exposure rows through the Great Expectations suites (value plausibility, units,
    statuses, copies). Failing rows are quarantined, never a failure: the data contract's counts (including the
    Observations the normaliser quarantined) are judged on a whole run's totals (validate.contract_breaches).
    `validate`: validate.validate_batch, or a caller's memo of it (leukofhir/cds)."""
    out = Validated(normalised.observations, normalised.exposures, [], [], 0, [])
    # The Observations the normaliser quarantined count with those GX fails: one count, the same patients.
    checked = {"observations": [_refused(normalised.refused_observations)], "exposures": []}
    for suite in ("observations", "exposures"):
        frame = getattr(out, suite)
        if frame.empty:
            continue
        result = validate(suite, frame, parameters)
        checked[suite].append((frame, result.reasons))
        if keep_frames:
            out.frames.append((suite, frame))
        out.expectations.extend(result.expectations)
        by_row = frame.set_index("row_id")["resource_id"] if result.reasons else None
        for row_id, reasons in result.reasons.items():
            out.quarantined.append((int(row_id), by_row.get(row_id), reasons))
        out.failed_rows += len(result.reasons)
        setattr(out, suite, result.valid)
    out.contract = merge_contract(contract_counts(suite, *parts) for suite, parts in checked.items())
    return out


def _refused(refused: list[tuple]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The Observations the normaliser quarantined (not a number, no time...) as rows and reasons for the contract's
    counts: failing rows of their feed, as the GX suite's are."""
    rows = pd.DataFrame([r[:5] for r in refused], columns=["row_id", "resource_id", "patient_id", "concept", "unit"])
    return rows, {r[0]: [r[5]] for r in refused}


# -- stage 3: evaluate -------------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """The desired Flags as of a time, and what the as-of handling set aside."""

    specs: list[FlagSpec]
    as_of: datetime | None  # the time evaluated as of: the one given, else the latest input time (or the run's time)
    skipped: Counter  # retracted rows (used only to retract) and rows after the as-of time
    evaluated_rows: int  # Observation rows the rules judged
    # Evaluated as of any time up to this one, the Flags would be the same (rules.lapse_horizon); None: any time.
    lapse_horizon: datetime | None = None


def evaluate_rows(
    observations: pd.DataFrame,
    exposures: pd.DataFrame,
    patients: dict,
    rules: Rules,
    as_of: datetime | None = None,
    run_time: datetime | None = None,
) -> Evaluation:
    """Stage 3: the rules as of `as_of`; later rows are out of this evaluation and counted as skipped, as are
    entered-in-error rows (they only retract, §1.1). Without `as_of`: as of the latest input time, or as of
    `run_time` (a run against a server: the time it started) when that is later, so that an open episode lapses as of
    the run (v1.3 §4) and a result that came in while the run read is still evaluated, never set aside."""
    skipped: Counter = Counter()
    times = observations["time"]
    latest = times.max().to_pydatetime() if len(times) and times.notna().any() else None
    effective_as_of = as_of or (max(latest, run_time) if latest and run_time else latest or run_time)
    retracted_status = rules.observations.statuses.retracted
    retracted = observations["status"] == retracted_status
    if retracted.any():
        skipped[SKIP_RETRACTED] += int(retracted.sum())
    if as_of is not None:
        late = (times > pd.Timestamp(as_of)) & ~retracted
        if late.any():
            skipped[SKIP_AFTER_AS_OF] += int(late.sum())
        observations = observations[~late]
    evaluated_rows = len(observations) - int((observations["status"] == retracted_status).sum())
    specs = evaluate(observations, patients, exposures, rules, as_of=effective_as_of)
    return Evaluation(specs, effective_as_of, skipped, evaluated_rows, lapse_horizon(specs, rules))


# -- stage 4: build and check the Flags --------------------------------------------------------------------------------
@dataclass
class CheckedFlags:
    """The FHIR Flags to write, those the GX `flags` suite refused, and its results."""

    flags: list[dict]
    rejected: int
    expectations: list[dict]
    rows: pd.DataFrame | None  # what the suite checked, for Data Docs
    # A server run leaves the Flags of these identifiers as they are on the server (never withdrawn for it).
    rejected_identifiers: list[str]
    kept: list[int] = field(default_factory=list)  # the position in `specs` of each Flag in `flags`
    contract: list[dict] = field(default_factory=list)  # the data contract's counts (validate.contract_counts)


def build_flags(
    specs: list[FlagSpec], rules: Rules, parameters: dict, validate: Callable = validate_batch
) -> CheckedFlags:
    """Stage 4: each FlagSpec as FHIR JSON (validated with fhir.resources), then the GX `flags` suite over them; a Flag
    it refuses is not written, and said (capped like read errors). `validate`: as validate_rows takes it."""
    checked_shapes: set = set()
    flags = [build_flag(spec, rules, checked_shapes) for spec in specs]
    if not specs:
        return CheckedFlags(flags, 0, [], None, [])
    rows = flag_frame(specs)
    result = validate("flags", rows, parameters)
    kept = [i for i in range(len(specs)) if str(i) not in result.reasons]
    if result.reasons:
        warn = CappedWarnings(SHOWN_READ_ERRORS, "more Flags not written: their count is flags_rejected in report.json")
        for row_id in result.reasons:
            warn("Flag %s not written: %s", specs[int(row_id)].identifier, result.reasons[row_id])
        flags = [flags[i] for i in kept]
    rejected = sorted({specs[int(row_id)].identifier for row_id in result.reasons})
    return CheckedFlags(
        flags,
        len(result.reasons),
        list(result.expectations),
        rows,
        rejected,
        kept,
        contract_counts("flags", (rows, result.reasons)),
    )


# -- stage 5: the run report -------------------------------------------------------------------------------------------
def build_report(
    paths,
    read: ReadResult,
    validated: Validated,
    evaluation: Evaluation,
    checked: CheckedFlags,
    rules: Rules | None = None,
) -> tuple[dict, list]:
    """The run report (counts that reconcile: read = evaluated + skipped + quarantined) and every quarantined row;
    with `rules`, the trend pictures' series of the Flags written too (leukofhir.evaluate.trends, capped)."""
    normalised = read.normalised
    read_total = read.read_total
    skipped: Counter = Counter(normalised.skipped)
    quarantined = list(normalised.quarantined)
    normalised_count = read_total - sum(skipped.values()) - len(quarantined)
    quarantined += validated.quarantined
    skipped.update(evaluation.skipped)
    evaluated = normalised.evaluated_other + evaluation.evaluated_rows + len(validated.exposures)
    held = held_flags(normalised.existing_flags, quarantined)
    quarantined_by: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    for _, ref, reasons in quarantined:
        reason = _bucket(reasons[0])
        quarantined_by[reason] += 1
        if ref and len(examples[reason]) < EXAMPLES and ref not in examples[reason]:
            examples[reason].append(ref)
    report = {
        "inputs": [str(p) for p in paths],
        "skipped_files": read.skipped_files,
        "as_of": evaluation.as_of.isoformat() if evaluation.as_of else None,
        "read": dict(sorted(read.read_counts.items())),
        "read_total": read_total,
        "evaluated": evaluated,
        "skipped": dict(sorted(skipped.items())),
        "quarantined": dict(sorted(quarantined_by.items())),
        "quarantine_examples": dict(sorted(examples.items())),
        "read_errors": len(read.read_errors),
        "stages": {
            "read": read_total,
            "normalised": normalised_count,
            "validated": normalised_count - validated.failed_rows,
            "evaluated": evaluated,
        },
        "expectations": validated.expectations + checked.expectations,
        "flags": _flag_counts(checked.flags),
        "flags_rejected": checked.rejected,
        "flags_rejected_identifiers": checked.rejected_identifiers,
        "flags_held": len(held),
        "flags_held_identifiers": held,
        "contract": merge_contract([validated.contract, checked.contract]),
    }
    if rules is not None:
        report["trends"] = flag_trends(
            evaluation.specs, checked.kept, validated.observations, validated.exposures, normalised.patients, rules
        )
        report["trends_total"] = len(checked.flags)
    return report, quarantined


def held_flags(existing_flags: list[dict], quarantined: list) -> list[str]:
    """The identifier values of the Flags read with the input (online: the project's Flags on the server) whose
    evidence (flag-detail) names a resource quarantined here. A run leaves them as they are, neither updated nor
    withdrawn: a patient never loses a Flag because some of their results are broken (docs/clinical-decisions.md)."""
    refs = {ref for _, ref, _ in quarantined if ref}
    held: set[str] = set()
    if not refs:
        return []
    for flag in existing_flags:
        evidence = {
            _reference(e.get("valueReference")) for e in _dicts(flag.get("extension")) if e.get("url") == DETAIL_URL
        }
        if not refs.isdisjoint(evidence):
            held.update(i["value"] for i in _dicts(flag.get("identifier")) if isinstance(i.get("value"), str))
    return sorted(held)


def _dicts(items) -> list[dict]:
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _reference(value) -> str | None:
    return value.get("reference") if isinstance(value, dict) else None


def flag_frame(specs) -> pd.DataFrame:
    """The rows the GX `flags` suite checks, one per FlagSpec (row_id = its position), as string columns in which a
    missing value stays missing: a Flag without a subject must fail "subject present", not pass as "None".
    `string` (missing = pd.NA) on every pandas we support: pandas 2's `str` turns None into the text "None"."""
    rows = [flag_row(spec, str(i)) for i, spec in enumerate(specs)]
    columns = list(rows[0]) if rows else ["row_id", "identifier", "status", "code", "subject"]
    return pd.DataFrame({c: pd.array([row[c] for row in rows], dtype="string") for c in columns}, columns=columns)


def _flag_counts(flags: list[dict]) -> dict:
    by_code: Counter = Counter()
    by_status: Counter = Counter()
    by_code_status: Counter = Counter()
    per_day: Counter = Counter()
    for flag in flags:
        display = flag["code"]["coding"][0]["display"]
        by_code[display] += 1
        by_status[flag["status"]] += 1
        by_code_status[f"{display}|{flag['status']}"] += 1
        per_day[flag["period"]["start"][:10]] += 1
    return {
        "total": len(flags),
        "by_code": dict(sorted(by_code.items())),
        "by_status": dict(sorted(by_status.items())),
        "by_code_status": dict(sorted(by_code_status.items())),
        "per_day": dict(sorted(per_day.items())),
    }


# -- the sequence ------------------------------------------------------------------------------------------------------
@dataclass
class Staged:
    """What the stages after reading leave: the rows validated, the evaluation, the Flags checked, the run report and
    every quarantined row (position, resource reference, reasons)."""

    validated: Validated
    evaluation: Evaluation
    checked: CheckedFlags
    report: dict
    quarantined: list


def run_stages(
    read: ReadResult,
    rules: Rules,
    parameters: dict,
    *,
    paths=(),
    as_of: datetime | None = None,
    run_time: datetime | None = None,
    keep_frames: bool = False,
) -> Staged:
    """What was read and normalised (stage 1: read_and_normalise, or a partition's reader) → validate → the rules as of
    `as_of` (evaluate_rows) → Flags built and checked → the run report. The one place that says the order; drivers
    differ only in where the rows come from and where the results go."""
    validated = validate_rows(read.normalised, parameters, keep_frames=keep_frames)
    evaluation = evaluate_rows(
        validated.observations, validated.exposures, read.normalised.patients, rules, as_of=as_of, run_time=run_time
    )
    checked = build_flags(evaluation.specs, rules, parameters)
    report, quarantined = build_report(paths, read, validated, evaluation, checked, rules)
    return Staged(validated, evaluation, checked, report, quarantined)
