"""Offline evaluation: FHIR files in; Flag.ndjson, quarantine.ndjson and report.json out (`leukofhir evaluate`)."""

from __future__ import annotations

import json
import logging
import os
import sys
from array import array
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from leukofhir.config import Rules, load_config
from leukofhir.errors import OutputError, UsageError
from leukofhir.evaluate import evaluate
from leukofhir.flags import build_flag, flag_row
from leukofhir.normalise import Normaliser
from leukofhir.reader import ReadError, Source, expand_paths, iter_located, iter_resources
from leukofhir.report_html import write_report_html
from leukofhir.validate import suite_parameters, validate_batch

__all__ = ["evaluate_files", "evaluate_command"]

log = logging.getLogger(__name__)

SKIP_RETRACTED = "status entered-in-error (used only to retract)"
SKIP_AFTER_AS_OF = "after the as-of time"
EXAMPLES = 5
SHOWN_READ_ERRORS = 20
# What a run writes to its folder, report.json last: a folder holds a finished run exactly when report.json is there.
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


def evaluate_files(
    paths, out_dir, as_of=None, config=None, progress: bool = True, *, fail_on_threshold: bool = False,
    data_docs: bool = False,
) -> dict:
    """Read, normalise, validate and evaluate the files; write Flag.ndjson, quarantine.ndjson, report.json and
    report.html to `out_dir`; return the report.

    `fail_on_threshold`: whether a batch whose share of rows failing validation is above the rules'
    `validation.max_failure_rate` raises ValidationThresholdError (naming the expectations and a few resource ids)
    instead of being quarantined and reported. Off for offline `leukofhir evaluate`, which must never fail on data
    quality: it reports. On for the pipeline step run against a server (`leukofhir run`, the DAGs), where a window
    that is mostly bad data must fail the task loudly.

    `data_docs`: also write GX's own Data Docs site for the run's validations to `out_dir/gx-data-docs/` (an
    optional extra: its pages load styles from public CDNs; see leukofhir.data_docs). Off, it costs nothing."""
    rules = config if isinstance(config, Rules) else load_config(config)
    max_failure_rate = rules.validation.max_failure_rate if fail_on_threshold else None
    as_of_given = parse_as_of(as_of)
    skipped_files: list[str] = []
    files = expand_paths(paths, skipped_files)  # an input that does not exist is a UsageError, before any output
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"output directory {out} is not writable")
    _remove_outputs(out)  # an earlier run's outputs must never pass for this run's if this one fails

    # 1. read and normalise, streaming: only compact rows and each resource's origin are kept.
    read_errors: list[ReadError] = []
    sources = _Sources()
    normaliser = Normaliser(rules)

    def on_read_error(error: ReadError) -> None:
        # Shown as they happen (file, line and why, never content); all of them also go to quarantine.ndjson.
        if len(read_errors) < SHOWN_READ_ERRORS:
            log.warning("%s", error)
        elif len(read_errors) == SHOWN_READ_ERRORS:
            log.warning("more read errors: see quarantine.ndjson")
        read_errors.append(error)

    read_counts = _read(files, normaliser, sources, on_read_error, progress)
    normalised = normaliser.finish()
    read_total = sum(read_counts.values())
    skipped: Counter = Counter(normalised.skipped)
    quarantined = list(normalised.quarantined)
    normalised_count = read_total - sum(skipped.values()) - len(quarantined)

    # 2. validate with the Great Expectations suites (value plausibility, units, statuses, duplicates).
    parameters = suite_parameters(rules)
    expectations: list[dict] = []
    observations, exposures = normalised.observations, normalised.exposures
    gx_failed = 0
    validated: list[tuple[str, pd.DataFrame]] = []  # kept only for data_docs
    for suite, frame in (("observations", observations), ("exposures", exposures)):
        if frame.empty:
            continue
        result = validate_batch(suite, frame, parameters, max_failure_rate=max_failure_rate)
        if data_docs:
            validated.append((suite, frame))
        expectations.extend(result.expectations)
        by_row = frame.set_index("row_id")["resource_id"] if result.reasons else None
        for row_id, reasons in result.reasons.items():
            quarantined.append((int(row_id), by_row.get(row_id), reasons))
        gx_failed += len(result.reasons)
        if suite == "observations":
            observations = result.valid
        else:
            exposures = result.valid

    # 3. as-of: the latest input time by default; later rows are out of this evaluation, counted as skipped.
    times = observations["time"]
    effective_as_of = as_of_given or (times.max().to_pydatetime() if len(times) and times.notna().any() else None)
    retracted = observations["status"] == rules.observations.statuses.retracted
    if retracted.any():
        skipped[SKIP_RETRACTED] += int(retracted.sum())
    if as_of_given is not None:
        late = (times > pd.Timestamp(as_of_given)) & ~retracted
        if late.any():
            skipped[SKIP_AFTER_AS_OF] += int(late.sum())
        observations = observations[~late]
    evaluated_rows = len(observations) - int((observations["status"] == rules.observations.statuses.retracted).sum())
    evaluated = normalised.evaluated_other + evaluated_rows + len(exposures)

    # 4. evaluate and build the Flags; the GX `flags` suite checks them before they are written.
    specs = evaluate(observations, normalised.patients, exposures, rules, as_of=effective_as_of)
    checked_shapes: set = set()
    flags = [build_flag(spec, rules, checked_shapes) for spec in specs]
    rejected_flags = 0
    rejected_identifiers: list[str] = []
    if specs:
        flag_rows = flag_frame(specs)
        result = validate_batch("flags", flag_rows, parameters, max_failure_rate=max_failure_rate)
        if data_docs:
            validated.append(("flags", flag_rows))
        expectations.extend(result.expectations)
        if result.reasons:
            rejected_flags = len(result.reasons)
            rejected_identifiers = sorted({specs[int(row_id)].identifier for row_id in result.reasons})
            for row_id in result.reasons:
                log.warning("Flag %s not written: %s", specs[int(row_id)].identifier, result.reasons[row_id])
            flags = [f for i, f in enumerate(flags) if str(i) not in result.reasons]

    quarantined_by: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    for _, ref, reasons in quarantined:
        reason = _bucket(reasons[0])
        quarantined_by[reason] += 1
        if ref and len(examples[reason]) < EXAMPLES and ref not in examples[reason]:
            examples[reason].append(ref)
    report = {
        "inputs": [str(p) for p in paths],
        "skipped_files": skipped_files,
        "as_of": effective_as_of.isoformat() if effective_as_of else None,
        "read": dict(sorted(read_counts.items())),
        "read_total": read_total,
        "evaluated": evaluated,
        "skipped": dict(sorted(skipped.items())),
        "quarantined": dict(sorted(quarantined_by.items())),
        "quarantine_examples": dict(sorted(examples.items())),
        "read_errors": len(read_errors),
        "stages": {
            "read": read_total,
            "normalised": normalised_count,
            "validated": normalised_count - gx_failed,
            "evaluated": evaluated,
        },
        "expectations": expectations,
        "flags": _flag_counts(flags),
        "flags_rejected": rejected_flags,
        # A server run leaves the Flags of these identifiers as they are on the server (never withdrawn for it).
        "flags_rejected_identifiers": rejected_identifiers,
    }
    report["reconciled"] = read_total == evaluated + sum(skipped.values()) + sum(quarantined_by.values())
    if not report["reconciled"]:
        log.error("report does not reconcile: %s read, %s evaluated, %s skipped, %s quarantined", read_total,
                  evaluated, sum(skipped.values()), sum(quarantined_by.values()))

    # 5. write: each output under a temporary name, renamed into place only once all of them are written.
    target = out
    try:
        if data_docs:
            from leukofhir.data_docs import DATA_DOCS_DIR, write_data_docs

            target = out / DATA_DOCS_DIR
            write_data_docs(target, validated, parameters)
            report["data_docs"] = f"{DATA_DOCS_DIR}/index.html"
        target = out / "Flag.ndjson"
        _write_ndjson(_partial(target), flags)
        target = out / "quarantine.ndjson"
        _write_quarantine(_partial(target), quarantined, read_errors, sources)
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
    return report


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


def flag_frame(specs) -> pd.DataFrame:
    """The rows the GX `flags` suite checks, one per FlagSpec (row_id = its position), as str columns in which a
    missing value stays missing: a Flag without a subject must fail "subject present", not pass as "None"."""
    rows = [flag_row(spec, str(i)) for i, spec in enumerate(specs)]
    columns = list(rows[0]) if rows else ["row_id", "identifier", "status", "code", "subject"]
    return pd.DataFrame({c: pd.array([row[c] for row in rows], dtype="str") for c in columns}, columns=columns)


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


def _write_ndjson(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
            fh.write("\n")


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
                        # ASCII: U+2028 etc. never split a line
                        fh.write(json.dumps({"resource": item.resource, "reasons": reasons}))
                        fh.write("\n")
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
            fh.write(json.dumps({"source": str(error.source), "reasons": [error.message]}))
            fh.write("\n")


def evaluate_command(args) -> int:
    """`leukofhir evaluate`: run, print a one-line summary, exit 0 (errors in arguments raise UsageError)."""
    report = evaluate_files(
        args.files, args.out, as_of=args.as_of, config=args.config, data_docs=getattr(args, "data_docs", False)
    )
    flags = report["flags"]
    print(
        f"read {report['read_total']} resources ({report['read_errors']} read errors): {report['evaluated']} evaluated, "
        f"{sum(report['skipped'].values())} skipped, {sum(report['quarantined'].values())} quarantined; "
        f"{flags['total']} Flags written to {args.out}",
        file=sys.stderr,
    )
    return 0
