"""Offline evaluation: FHIR files in; Flag.ndjson, quarantine.ndjson and report.json out (`leukofhir evaluate`)."""

from __future__ import annotations

import json
import logging
import os
import sys
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd

from leukofhir.config import Rules, load_config
from leukofhir.errors import OutputError, UsageError
from leukofhir.evaluate import FlagSpec, evaluate, lapse_horizon
from leukofhir.flags import DETAIL_URL, build_flag, flag_row
from leukofhir.normalise import Normalised, Normaliser
from leukofhir.reader import ReadError, Source, expand_paths, iter_located, iter_resources
from leukofhir.report_html import write_report_html
from leukofhir.trends import flag_trends
from leukofhir.validate import check_contract, contract_counts, merge_contract, suite_parameters, validate_batch

__all__ = [
    "evaluate_files", "evaluate_command", "read_and_normalise", "validate_rows", "evaluate_rows", "build_flags",
    "build_report", "write_outputs", "finish_outputs", "ReadResult", "Validated", "Evaluation", "CheckedFlags",
]

log = logging.getLogger(__name__)

SKIP_RETRACTED = "status entered-in-error (used only to retract)"
SKIP_AFTER_AS_OF = "after the as-of time"
EXAMPLES = 5
SHOWN_READ_ERRORS = 20
OUTPUTS = ("Flag.ndjson", "quarantine.ndjson", "report.html", "report.json")


def parse_as_of(text: str | datetime | None) -> datetime | None:
    """`--as-of` as an aware UTC datetime; a date or a time without zone is read as UTC."""
    if text is None or isinstance(text, datetime):
        return text if text is None or text.tzinfo else text.replace(tzinfo=timezone.utc)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--as-of {text!r} is not an ISO 8601 date or time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class _Sources:
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


def _read(paths, normaliser: Normaliser, sources: _Sources, on_error, progress: bool) -> Counter:
    """Feed every resource to the normaliser, noting where it was read; the per-resource hot loop of a run."""
    counts: dict[str, int] = {}
    add = normaliser.add
    add_file, add_line, add_entry = sources.file.append, sources.line.append, sources.entry.append
    last_path, file_index = None, -1
    for index, (resource, path, line, entry) in enumerate(_progress(iter_located(paths, on_error), progress)):
        if path is not last_path:  # one str object per file: an identity check, not a lookup per resource
            last_path, file_index = path, sources.path_index(path)
        add_file(file_index)
        add_line(-1 if line is None else line)
        add_entry(-1 if entry is None else entry)
        kind = resource["resourceType"]
        counts[kind] = counts.get(kind, 0) + 1
        add(resource, index)
    return Counter(counts)


def _progress(items, enabled: bool):
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(items, unit=" resources", unit_scale=True, file=sys.stderr, desc="reading")
    return items


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


# -- stage 1: read and normalise -------------------------------------------------------------------------------------
@dataclass
class ReadResult:
    """What reading and normalising leave: the tidy rows and buckets, what was read, and where (for quarantine)."""

    normalised: Normalised
    read_counts: Counter
    read_errors: list[ReadError]
    sources: _Sources
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
    read_errors: list[ReadError] = []
    sources = _Sources()
    normaliser = Normaliser(rules, base_url=base_url)
    # Shown as they happen (file, line and why, never content).
    warn = CappedWarnings(SHOWN_READ_ERRORS, "more read errors: see quarantine.ndjson")

    def on_read_error(error: ReadError) -> None:
        warn("%s", error)
        read_errors.append(error)

    read_counts = _read(files, normaliser, sources, on_read_error, progress)
    return ReadResult(normaliser.finish(), read_counts, read_errors, sources, skipped_files)


# -- stage 2: validate -----------------------------------------------------------------------------------------------
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


def validate_rows(normalised: Normalised, parameters: dict, *, keep_frames: bool = False,
                  validate: Callable = validate_batch) -> Validated:
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


# -- stage 3: evaluate -----------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """The desired Flags as of a time, and what the as-of handling set aside."""

    specs: list[FlagSpec]
    as_of: datetime | None  # the time evaluated as of: the one given, else the latest input time (or the run's time)
    skipped: Counter  # retracted rows (used only to retract) and rows after the as-of time
    evaluated_rows: int  # Observation rows the rules judged
    # Evaluated as of any time up to this one, the Flags would be the same (evaluate.lapse_horizon); None: any time.
    lapse_horizon: datetime | None = None


def evaluate_rows(observations: pd.DataFrame, exposures: pd.DataFrame, patients: dict, rules: Rules,
                  as_of: datetime | None = None, run_time: datetime | None = None) -> Evaluation:
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


# -- stage 4: build and check the Flags ------------------------------------------------------------------------------
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


def build_flags(specs: list[FlagSpec], rules: Rules, parameters: dict,
                validate: Callable = validate_batch) -> CheckedFlags:
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
    return CheckedFlags(flags, len(result.reasons), list(result.expectations), rows, rejected, kept,
                        contract_counts("flags", (rows, result.reasons)))


# -- stage 5: the run's files ----------------------------------------------------------------------------------------
def build_report(paths, read: ReadResult, validated: Validated, evaluation: Evaluation,
                 checked: CheckedFlags, rules: Rules | None = None) -> tuple[dict, list]:
    """The run report (counts that reconcile: read = evaluated + skipped + quarantined) and every quarantined row;
    with `rules`, the trend pictures' series of the Flags written too (leukofhir.trends, capped)."""
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
        report["trends"] = flag_trends(evaluation.specs, checked.kept, validated.observations, validated.exposures,
                                       normalised.patients, rules)
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
        evidence = {_reference(e.get("valueReference")) for e in _dicts(flag.get("extension"))
                    if e.get("url") == DETAIL_URL}
        if not refs.isdisjoint(evidence):
            held.update(i["value"] for i in _dicts(flag.get("identifier")) if isinstance(i.get("value"), str))
    return sorted(held)


def _dicts(items) -> list[dict]:
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _reference(value) -> str | None:
    return value.get("reference") if isinstance(value, dict) else None


def write_outputs(out: Path, report: dict, flags: list[dict], quarantined: list, read: ReadResult,
                  data_docs: tuple | None = None) -> None:
    """Flag.ndjson, quarantine.ndjson (each rejected resource re-read from its file, with its reasons), report.json
    and report.html, and GX's Data Docs when asked (`data_docs` = (frames, parameters)): see finish_outputs."""
    finish_outputs(out, report, lambda path: _write_ndjson(path, flags),
                   lambda path: _write_quarantine(path, quarantined, read.read_errors, read.sources), data_docs)


def finish_outputs(out: Path, report: dict, write_flags: Callable[[Path], None],
                   write_quarantine: Callable[[Path], None], data_docs: tuple | None = None) -> None:
    """The run's files: `write_flags(path)` writes Flag.ndjson, `write_quarantine(path)` quarantine.ndjson, then
    report.html and report.json, and GX's Data Docs when asked; the report gets `reconciled` here. Each file is
    written under a temporary name and renamed into place once all are written, report.json last: a folder holds a
    finished run exactly when its report.json is there. A write that fails is an OutputError and leaves no output
    behind."""
    evaluated, skipped, quarantined_count = (report["evaluated"], sum(report["skipped"].values()),
                                             sum(report["quarantined"].values()))
    report["reconciled"] = report["read_total"] == evaluated + skipped + quarantined_count
    if not report["reconciled"]:
        log.error("report does not reconcile: %s read, %s evaluated, %s skipped, %s quarantined",
                  report["read_total"], evaluated, skipped, quarantined_count)
    target = out
    try:
        if data_docs is not None:
            from leukofhir.data_docs import DATA_DOCS_DIR, write_data_docs

            target = out / DATA_DOCS_DIR
            write_data_docs(target, *data_docs)
            report["data_docs"] = f"{DATA_DOCS_DIR}/index.html"
        target = out / "Flag.ndjson"
        write_flags(_partial(target))
        target = out / "quarantine.ndjson"
        write_quarantine(_partial(target))
        target = out / "report.html"
        write_report_html(report, _partial(target))
        target = out / "report.json"
        with open(_partial(target), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str)
            fh.write("\n")
        for name in OUTPUTS:  # report.json last
            target = out / name
            _partial(target).replace(target)
    except OSError as exc:
        _remove_outputs(out, quiet=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        _remove_outputs(out, quiet=True)
        raise


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _remove_outputs(out: Path, quiet: bool = False) -> None:
    """Remove the outputs of an earlier run (or the partial ones of this run) from the run folder."""
    for name in OUTPUTS:
        for path in (out / name, _partial(out / name)):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                if not quiet:
                    raise OutputError(f"cannot remove the earlier output {path}: {exc.strerror or exc}") from None


def _output_dir(out_dir) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"output directory {out} is not writable")
    return out


def evaluate_files(
    paths, out_dir, as_of=None, config=None, progress: bool = True, *, fail_on_threshold: bool = False,
    data_docs: bool = False, base_url=None, memory_budget: int | str | None = None, workers: int = 1,
    run_time=None,
) -> dict:
    """Read, normalise, validate and evaluate the files; write Flag.ndjson, quarantine.ndjson, report.json and
    report.html to `out_dir`; return the report. The stages above, in order (an online run shares every one of them
    after its extract).

    `fail_on_threshold`: whether the data contract is judged on these files' totals (validate.check_contract, the
    rules' `validation` settings): a systemic failure raises ValidationThresholdError (naming the suites or feeds,
    expectations and a few resource ids) before any output is written. Off for offline `leukofhir evaluate`, which
    must never fail on data quality: it quarantines and reports. The online pipeline leaves it off too: it judges the
    contract on the whole run's totals, across every batch, before anything is written (run.judge_contract).

    `data_docs`: also write GX's own Data Docs site for the run's validations to `out_dir/gx-data-docs/` (an
    optional extra: its pages load styles from public CDNs; see leukofhir.data_docs). Off, it costs nothing.

    `base_url`: the server the files came from (an online run's staged pages), so that references to it are local.

    `as_of` (offline `--as-of`): evaluate as of that time (later results set aside; open episodes lapse as of it,
    v1.3 §4); default the latest input time. `run_time` (an online run: when it started): evaluate as of it, or as of
    the latest input time when that is later; no result is set aside (evaluate_rows).

    `memory_budget` (bytes, or a size such as "64MB"; default partition.DEFAULT_MEMORY_BUDGET): an input whose rows
    would take more is partitioned by patient and evaluated a partition at a time, in `workers` processes
    (leukofhir.partition); the outputs are the same.

    An earlier run's outputs in `out_dir` are removed first: they must never pass for this run's if it fails."""
    # The partitioned path builds on this module's stages.
    from leukofhir.partition import evaluate_partitioned, plan_partitions

    rules = config if isinstance(config, Rules) else load_config(config)
    as_of_given = parse_as_of(as_of)
    run_time = parse_as_of(run_time)
    skipped_files: list[str] = []
    # An input that does not exist is a UsageError here, before any output is touched.
    files = expand_paths(paths, skipped_files)
    plan = plan_partitions(files, memory_budget, workers)
    if plan is not None and data_docs:
        raise UsageError(f"--data-docs needs every row in memory, and this input needs about {plan.shown_estimate} "
                         f"(memory budget {plan.shown_budget}): raise --memory-budget or leave --data-docs out")
    out = _output_dir(out_dir)
    _remove_outputs(out)
    if plan is not None:
        return evaluate_partitioned(files, paths, out, rules, plan, as_of=as_of_given, run_time=run_time,
                                    base_url=base_url, progress=progress, fail_on_threshold=fail_on_threshold,
                                    skipped_files=skipped_files)
    read = read_and_normalise(files, rules, base_url=base_url, progress=progress)
    read.skipped_files[:0] = skipped_files
    parameters = suite_parameters(rules)
    validated = validate_rows(read.normalised, parameters, keep_frames=data_docs)
    evaluation = evaluate_rows(validated.observations, validated.exposures, read.normalised.patients, rules,
                               as_of=as_of_given, run_time=run_time)
    checked = build_flags(evaluation.specs, rules, parameters)
    report, quarantined = build_report(paths, read, validated, evaluation, checked, rules)
    if fail_on_threshold:
        check_contract(report["contract"], rules.validation)
    frames = validated.frames + ([("flags", checked.rows)] if checked.rows is not None else [])
    write_outputs(out, report, checked.flags, quarantined, read, (frames, parameters) if data_docs else None)
    return report


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


def flag_line(flag: dict) -> str:
    """A Flag as one line of Flag.ndjson."""
    return json.dumps(flag, ensure_ascii=False, separators=(",", ":")) + "\n"


def quarantine_line(resource: dict, reasons: list[str]) -> str:
    """A rejected resource and its reasons as one line of quarantine.ndjson (ASCII: U+2028 etc. never split a line)."""
    return json.dumps({"resource": resource, "reasons": reasons}) + "\n"


def read_error_line(error: ReadError) -> str:
    """A read error as one line of quarantine.ndjson: where and why, never content."""
    return json.dumps({"source": str(error.source), "reasons": [error.message]}) + "\n"


def _write_ndjson(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(flag_line(record))


def _write_quarantine(path: Path, quarantined: list, read_errors: list[ReadError], sources: _Sources) -> None:
    """One line per rejected resource, re-read from its file (the run never held raw resources)."""
    wanted: dict[int, dict[tuple[int, int], list[str]]] = defaultdict(dict)
    for index, _, reasons in sorted(quarantined, key=lambda q: q[0]):
        file, line, entry = sources.key(index)
        wanted[file].setdefault((line, entry), []).extend(reasons)
    with open(path, "w", encoding="utf-8") as fh:
        for file, by_position in sorted(wanted.items()):
            try:
                for item in iter_resources([sources.paths[file]], lambda error: None):
                    key = (-1 if item.source.line is None else item.source.line,
                           -1 if item.source.entry is None else item.source.entry)
                    reasons = by_position.pop(key, None)
                    if reasons is not None:
                        fh.write(quarantine_line(item.resource, reasons))
                        if not by_position:
                            break
            except UsageError:
                pass  # the file is gone since it was read: its quarantined resources are listed by place below
            for (line, entry), reasons in sorted(by_position.items()):
                # Not found again (the file changed since it was read): where it was and why, at least.
                where = Source(sources.paths[file], None if line < 0 else line, None if entry < 0 else entry)
                fh.write(json.dumps({"source": str(where), "reasons": reasons + ["not found again to copy it here"]}))
                fh.write("\n")
        for error in read_errors:
            fh.write(read_error_line(error))


def evaluate_command(args) -> int:
    """`leukofhir evaluate`: run, print a one-line summary, exit 0 (errors in arguments raise UsageError)."""
    report = evaluate_files(
        args.files, args.out, as_of=args.as_of, config=args.config, data_docs=getattr(args, "data_docs", False),
        memory_budget=getattr(args, "memory_budget", None), workers=getattr(args, "workers", 1),
    )
    flags = report["flags"]
    parts = report.get("partitions")
    print(
        f"read {report['read_total']} resources ({report['read_errors']} read errors): {report['evaluated']} evaluated, "
        f"{sum(report['skipped'].values())} skipped, {sum(report['quarantined'].values())} quarantined; "
        f"{flags['total']} Flags written to {args.out}"
        + (f" (in {parts['evaluated']} partitions by patient)" if parts else ""),
        file=sys.stderr,
    )
    return 0
