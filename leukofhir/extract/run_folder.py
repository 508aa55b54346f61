"""A run's folder as its steps share it: run.json, and the chunk folders with their patient lists, made at the start."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from leukofhir.extract.search import Window, parse_instant, write_patient_list

log = logging.getLogger("leukofhir.run")  # the run's own log: these lines belong to its first step

CONTRACT_FILE = "contract.json"  # the verdict of judge_contract, in the run folder


def chunk_dirs(run_dir) -> list:
    """The chunk folders of a run folder (a local path, or an ObjectStoragePath in the DAGs); none before
    find_patients made them, or when it found no patient."""
    folder = (Path(run_dir) if isinstance(run_dir, str) else run_dir) / "chunks"
    return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name) if folder.exists() else []


def run_start(now: datetime | None) -> datetime:
    """The run's start, to the second (as run.json keeps it): the time the run evaluates as of (v1.3 §4)."""
    return parse_instant(now or datetime.now(timezone.utc)).replace(microsecond=0)


def start_run(
    run_dir: Path,
    server: str,
    ids: list[str],
    *,
    window: Window | None,
    patients_given: bool,
    chunks: int = 1,
    chunk_size: int | None = None,
    dry_run: bool = False,
    extract: str = "search",
    started: datetime | None = None,
    sweep: dict | None = None,
    **chunk_meta,
) -> list[Path]:
    """run.json, and the sorted patient ids cut into contiguous chunk folders (`chunks` of them, or of `chunk_size`
    patients), each with its patients.json (and `chunk_meta`). `extract`: how the histories are read (search,
    export); `started`: the run's start (default: now); `sweep`: the lapse sweep's counts, when it ran."""
    log.info("%d patients touched", len(ids))
    meta = {
        "server": server,
        "dry_run": dry_run,
        "extract": extract,
        "started": run_start(started).isoformat(timespec="seconds"),
        "window": window.as_dict() if window else None,
        "patients_given": patients_given,
        "patients_touched": len(ids),
        "sweep": sweep,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    (run_dir / CONTRACT_FILE).unlink(missing_ok=True)  # a retried run is judged again
    if chunk_size:
        bounds = list(range(0, len(ids), chunk_size)) + [len(ids)]
    else:  # `chunks` contiguous slices (fewer when there are fewer patients), their sizes one apart at most
        count = min(chunks, len(ids))
        bounds = [len(ids) * n // count for n in range(count + 1)] if count else [0]
    out = []
    for number, (start, stop) in enumerate(zip(bounds, bounds[1:]), start=1):
        folder = run_dir / "chunks" / f"{number:05d}"
        write_patient_list(folder / "patients.json", ids[start:stop], **chunk_meta)
        out.append(folder)
    return out
