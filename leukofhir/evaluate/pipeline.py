"""Offline evaluation: FHIR files in; Flag.ndjson, quarantine.ndjson and report.json out (`leukofhir evaluate`).

The driver of the stages (leukofhir.evaluate.stages) for files: in memory, or partitioned by patient when the input's
rows would not fit the memory budget (leukofhir.evaluate.partition, below this module: it runs the same stages per
partition)."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from leukofhir.config import Rules, load_config
from leukofhir.errors import UsageError
from leukofhir.evaluate.outputs import finish_outputs, remove_outputs, write_ndjson, write_quarantine
from leukofhir.evaluate.partition import evaluate_partitioned, plan_partitions
from leukofhir.evaluate.stages import ReadResult, read_and_normalise, run_stages
from leukofhir.evaluate.validate import check_contract, suite_parameters
from leukofhir.extract.reader import expand_paths

__all__ = ["evaluate_files", "evaluate_command", "write_outputs", "parse_as_of"]


def parse_as_of(text: str | datetime | None) -> datetime | None:
    """`--as-of` as an aware UTC datetime; a date or a time without zone is read as UTC."""
    if text is None or isinstance(text, datetime):
        return text if text is None or text.tzinfo else text.replace(tzinfo=timezone.utc)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--as-of {text!r} is not an ISO 8601 date or time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def write_outputs(
    out: Path, report: dict, flags: list[dict], quarantined: list, read: ReadResult, data_docs: tuple | None = None
) -> None:
    """Flag.ndjson, quarantine.ndjson (each rejected resource re-read from its file, with its reasons), report.json
    and report.html, and GX's Data Docs when asked (`data_docs` = (frames, parameters)): see finish_outputs."""
    finish_outputs(
        out,
        report,
        lambda path: write_ndjson(path, flags),
        lambda path: write_quarantine(path, quarantined, read.read_errors, read.sources),
        data_docs,
    )


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
    paths,
    out_dir,
    as_of=None,
    config=None,
    progress: bool = True,
    *,
    fail_on_threshold: bool = False,
    data_docs: bool = False,
    base_url=None,
    memory_budget: int | str | None = None,
    workers: int = 1,
    run_time=None,
) -> dict:
    """Read, normalise, validate and evaluate the files; write Flag.ndjson, quarantine.ndjson, report.json and
    report.html to `out_dir`; return the report. The stages of leukofhir.evaluate.stages, in order (an online run shares
    every one of them after its extract).

    `fail_on_threshold`: whether the data contract is judged on these files' totals (validate.check_contract, the
    rules' `validation` settings): a systemic failure raises ValidationThresholdError (naming the suites or feeds,
    expectations and a few resource ids) before any output is written. Off for offline `leukofhir evaluate`, which
    must never fail on data quality: it quarantines and reports. The online pipeline leaves it off too: it judges the
    contract on the whole run's totals, across every batch, before anything is written (run.judge_contract).

    `data_docs`: also write GX's own Data Docs site for the run's validations to `out_dir/gx-data-docs/` (an
    optional extra: its pages load styles from public CDNs; see leukofhir.evaluate.data_docs). Off, it costs nothing.

    `base_url`: the server the files came from (an online run's staged pages), so that references to it are local.

    `as_of` (offline `--as-of`): evaluate as of that time (later results set aside; open episodes lapse as of it,
    v1.3 §4); default the latest input time. `run_time` (an online run: when it started): evaluate as of it, or as of
    the latest input time when that is later; no result is set aside (stages.evaluate_rows).

    `memory_budget` (bytes, or a size such as "64MB"; default partition.DEFAULT_MEMORY_BUDGET): an input whose rows
    would take more is partitioned by patient and evaluated a partition at a time, in `workers` processes
    (leukofhir.evaluate.partition); the outputs are the same.

    An earlier run's outputs in `out_dir` are removed first: they must never pass for this run's if it fails."""
    rules = config if isinstance(config, Rules) else load_config(config)
    as_of_given = parse_as_of(as_of)
    run_time = parse_as_of(run_time)
    skipped_files: list[str] = []
    # An input that does not exist is a UsageError here, before any output is touched.
    files = expand_paths(paths, skipped_files)
    plan = plan_partitions(files, memory_budget, workers)
    if plan is not None and data_docs:
        raise UsageError(
            f"--data-docs needs every row in memory, and this input needs about {plan.shown_estimate} "
            f"(memory budget {plan.shown_budget}): raise --memory-budget or leave --data-docs out"
        )
    out = _output_dir(out_dir)
    remove_outputs(out)
    if plan is not None:
        return evaluate_partitioned(
            files,
            paths,
            out,
            rules,
            plan,
            as_of=as_of_given,
            run_time=run_time,
            base_url=base_url,
            progress=progress,
            fail_on_threshold=fail_on_threshold,
            skipped_files=skipped_files,
        )
    read = read_and_normalise(files, rules, base_url=base_url, progress=progress)
    read.skipped_files[:0] = skipped_files
    parameters = suite_parameters(rules)
    staged = run_stages(
        read, rules, parameters, paths=paths, as_of=as_of_given, run_time=run_time, keep_frames=data_docs
    )
    report, checked = staged.report, staged.checked
    if fail_on_threshold:
        check_contract(report["contract"], rules.validation)
    frames = staged.validated.frames + ([("flags", checked.rows)] if checked.rows is not None else [])
    write_outputs(out, report, checked.flags, staged.quarantined, read, (frames, parameters) if data_docs else None)
    return report


def evaluate_command(args) -> int:
    """`leukofhir evaluate`: run, print a one-line summary, exit 0 (errors in arguments raise UsageError)."""
    report = evaluate_files(
        args.files,
        args.out,
        as_of=args.as_of,
        config=args.config,
        data_docs=getattr(args, "data_docs", False),
        memory_budget=getattr(args, "memory_budget", None),
        workers=getattr(args, "workers", 1),
    )
    flags = report["flags"]
    parts = report.get("partitions")
    print(
        f"read {report['read_total']} resources ({report['read_errors']} read errors): "
        f"{report['evaluated']} evaluated, "
        f"{sum(report['skipped'].values())} skipped, {sum(report['quarantined'].values())} quarantined; "
        f"{flags['total']} Flags written to {args.out}"
        + (f" (in {parts['evaluated']} partitions by patient)" if parts else ""),
        file=sys.stderr,
    )
    return 0
