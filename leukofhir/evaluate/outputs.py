"""The run's files: Flag.ndjson, quarantine.ndjson (each rejected resource re-read from where it was read, with its
reasons), report.html and report.json, written all or nothing, whatever evaluated the run (in memory or by
partition)."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

from leukofhir.errors import OutputError, UsageError
from leukofhir.extract.reader import ReadError, Source, iter_resources
from leukofhir.report.html import write_report_html

__all__ = [
    "OUTPUTS",
    "finish_outputs",
    "remove_outputs",
    "write_ndjson",
    "write_quarantine",
    "pick_quarantined",
    "flag_line",
    "quarantine_line",
    "read_error_line",
]

log = logging.getLogger(__name__)

OUTPUTS = ("Flag.ndjson", "quarantine.ndjson", "report.html", "report.json")


def finish_outputs(
    out: Path,
    report: dict,
    write_flags: Callable[[Path], None],
    write_quarantine: Callable[[Path], None],
    data_docs: tuple | None = None,
) -> None:
    """The run's files: `write_flags(path)` writes Flag.ndjson, `write_quarantine(path)` quarantine.ndjson, then
    report.html and report.json, and GX's Data Docs when asked; the report gets `reconciled` here. Each file is
    written under a temporary name and renamed into place once all are written, report.json last: a folder holds a
    finished run exactly when its report.json is there. A write that fails is an OutputError and leaves no output
    behind."""
    evaluated, skipped, quarantined_count = (
        report["evaluated"],
        sum(report["skipped"].values()),
        sum(report["quarantined"].values()),
    )
    report["reconciled"] = report["read_total"] == evaluated + skipped + quarantined_count
    if not report["reconciled"]:
        log.error(
            "report does not reconcile: %s read, %s evaluated, %s skipped, %s quarantined",
            report["read_total"],
            evaluated,
            skipped,
            quarantined_count,
        )
    target = out
    try:
        if data_docs is not None:
            from leukofhir.evaluate.data_docs import DATA_DOCS_DIR, write_data_docs

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
        remove_outputs(out, quiet=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        remove_outputs(out, quiet=True)
        raise


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def remove_outputs(out: Path, quiet: bool = False) -> None:
    """Remove the outputs of an earlier run (or the partial ones of this run) from the run folder."""
    for name in OUTPUTS:
        for path in (out / name, _partial(out / name)):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                if not quiet:
                    raise OutputError(f"cannot remove the earlier output {path}: {exc.strerror or exc}") from None


def flag_line(flag: dict) -> str:
    """A Flag as one line of Flag.ndjson."""
    return json.dumps(flag, ensure_ascii=False, separators=(",", ":")) + "\n"


def quarantine_line(resource: dict, reasons: list[str]) -> str:
    """A rejected resource and its reasons as one line of quarantine.ndjson (ASCII: U+2028 etc. never split a line)."""
    return json.dumps({"resource": resource, "reasons": reasons}) + "\n"


def read_error_line(error: ReadError) -> str:
    """A read error as one line of quarantine.ndjson: where and why, never content."""
    return json.dumps({"source": str(error.source), "reasons": [error.message]}) + "\n"


def write_ndjson(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(flag_line(record))


def write_quarantine(path: Path, quarantined: list, read_errors: list[ReadError], sources) -> None:
    """One line per rejected resource, re-read from its file (the run never held raw resources); `sources`: where
    each was read (stages.Sources)."""
    wanted: dict[int, dict[tuple[int, int], list[str]]] = defaultdict(dict)
    for index, _, reasons in sorted(quarantined, key=lambda q: q[0]):
        file, line, entry = sources.key(index)
        wanted[file].setdefault((line, entry), []).extend(reasons)
    with open(path, "w", encoding="utf-8") as fh:
        for file, by_position in sorted(wanted.items()):
            items = (
                (_position(item.source), item.resource)
                for item in iter_resources([sources.paths[file]], lambda error: None)
            )
            try:
                for _, text in pick_quarantined(by_position, items):
                    fh.write(text)
            except UsageError:
                pass  # the file is gone since it was read: its quarantined resources are listed by place below
            for (line, entry), reasons in sorted(by_position.items()):
                # Not found again (the file changed since it was read): where it was and why, at least.
                where = Source(sources.paths[file], None if line < 0 else line, None if entry < 0 else entry)
                fh.write(json.dumps({"source": str(where), "reasons": reasons + ["not found again to copy it here"]}))
                fh.write("\n")
        for error in read_errors:
            fh.write(read_error_line(error))


def pick_quarantined(
    wanted: dict, items: Iterable[tuple[object, object]], decode: Callable | None = None
) -> Iterator[tuple]:
    """The one quarantine reader: (key, quarantine.ndjson line) of each of `items` (key, resource) whose key is
    `wanted` (key -> reasons), taken out of `wanted`; stops once none is left. `decode(resource)`: for items read as
    raw JSON, decoded only when wanted."""
    for key, resource in items:
        reasons = wanted.pop(key, None)
        if reasons is not None:
            yield key, quarantine_line(resource if decode is None else decode(resource), reasons)
            if not wanted:
                return


def _position(source: Source) -> tuple[int, int]:
    return -1 if source.line is None else source.line, -1 if source.entry is None else source.entry
