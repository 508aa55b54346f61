"""Bounded memory: an input whose rows would not fit the memory budget is spilled to partition files by a stable hash
of the patient id, then evaluated a partition at a time (or in processes), with the outputs of the in-memory path.

Every rule works within one patient, so a partition holds whole patients. What crosses patients is resolved here:
- a subject given as `urn:uuid:x` or a bare id names the Patient `x` of the input: both hash by `x`, so they meet;
- a Bundle's references to its entries' fullUrls are made `Type/id` by the reader before anything is spilled;
- a Medication has no subject: it goes to every partition whose medication resources reference it, where it is used
  but not counted (it is counted once, by the first pass);
- copies and versions of one Observation (the duplicate checks, the superseded versions), and a result and the
  DiagnosticReport or panel Observation that lists it (its time, its blood count), must be judged together: the
  partitions they link are evaluated as one, in the order the input was read;
- read errors are found, shown and reported once, by the first pass, as are resource types the rules never read
  (counted, not spilled);
- a given `--as-of` holds for every partition; without one, the as-of is the latest of the partitions' (the input's
  latest time), and a partition evaluated as of an earlier time whose open episodes would lapse by then (v1.3 §4) is
  evaluated again as of it; the validation threshold of a run against a server is checked on the totals, as in
  memory.
Flag.ndjson and quarantine.ndjson are merged in the in-memory order (patient, family, episode start; input order).
"""

from __future__ import annotations

import gzip
import heapq
import json
import logging
import math
import multiprocessing
import os
import pickle
import re
import shutil
import struct
import tempfile
import zlib
from array import array
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from multiprocessing.connection import wait
from pathlib import Path
from typing import Iterator

import numpy as np

from leukofhir.config import Rules
from leukofhir.errors import LeukofhirError, OutputError, UsageError
from leukofhir.evaluate.outputs import finish_outputs, flag_line, pick_quarantined, read_error_line
from leukofhir.evaluate.stages import ReadResult, Sources, progress_bar, read_error_collector, run_stages
from leukofhir.evaluate.summary import merge_reports
from leukofhir.evaluate.validate import check_contract, prepare, suite_parameters
from leukofhir.extract.reader import ReadError, decode_line, iter_located
from leukofhir.normalise import SKIP_NOT_USED, Normaliser
from leukofhir.normalise.context import FOREIGN, LocalBases, resource_ref
from leukofhir.normalise.exposures import MEDICATION_KINDS, medication_key
from leukofhir.normalise.reports import observation_key

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "ROW_COSTS",
    "PartitionPlan",
    "PartitionError",
    "parse_size",
    "show_size",
    "input_bytes",
    "estimate_rows",
    "plan_partitions",
    "evaluate_partitioned",
]

log = logging.getLogger(__name__)

# The memory an evaluation's rows may take, beyond the process's own (Python, pandas, Great Expectations: about
# 250 MB). A 2-core, 4 GB worker runs two task processes (scripts/airflow-stack, docker-compose.yml) beside the
# Celery worker itself (about 0.6 GB): 2 x (768 MiB + 0.25 GB + an Airflow task runner's 0.15 GB) + 0.6 GB = 3.0 GB,
# a quarter of the worker left for the estimate's error and the system.
DEFAULT_MEMORY_BUDGET = 768 << 20
# Memory one row takes while the rows are evaluated (peak RSS above the process's own, bytes per resource read), by
# kind: the slopes benchmarks/row_cost_bench.py measured between inputs of 100,000 and 400,000 rows (2026-12-06:
# 466, 391 and 671; benchmarks/README.md), plus 10 %. Per row, not per byte: compact NDJSON holds about twice the
# rows per byte of verbose (1.4 and 0.74 byte of memory per byte of JSON).
ROW_COST_OBSERVATION = 512
ROW_COST_MEDICATION = 432
ROW_COST_OTHER = 736  # Patient, DiagnosticReport, Condition, Flag, Medication (a Medication is held as context)
ROW_COSTS = {
    "Observation": ROW_COST_OBSERVATION,
    "Medication": ROW_COST_OTHER,
    **{kind: ROW_COST_MEDICATION for kind in MEDICATION_KINDS},
    **{kind: ROW_COST_OTHER for kind in ("Patient", "DiagnosticReport", "Condition", "Flag")},
}
SAMPLE_BYTES = 1 << 18  # read at the start, middle and end of each file to count its rows per byte
GZIP_RATIO = 5  # a .gz whose recorded size is not plausible holds at least this many times its size (FHIR JSON: 8-20)
OVERSPLIT = 4  # partitions spilled per partition evaluated: packed by their counted rows into the evaluated ones
MAX_SPILLED = 256  # files open at once while spilling
JOIN_FILES = 16  # the cross-partition links are joined this many slices at a time
SUITES = ("observations", "exposures", "flags")
# The kinds the normaliser reads per patient: spilled. Medications are shared; every other kind is only counted.
ROUTED = frozenset({"Observation", "Patient", "DiagnosticReport", "Condition", "Flag", *MEDICATION_KINDS})
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


class PartitionError(LeukofhirError):
    """A partition could not be evaluated (its process died: out of memory?); the message says which."""


# -- sizes -------------------------------------------------------------------------------------------------------------
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Bytes of a size: an int, or text such as `64MB`, `1.5GB`, `512KiB`, `100000` (K, M, G, T: powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.fullmatch(str(value).strip())
        if not match:
            raise UsageError(f"memory budget {value!r} is not a size (e.g. 64MB, 1.5GB)")
        size = int(float(match[1]) * 1024 ** ("KMGT".find(match[2].upper()) + 1 if match[2] else 0))
    if size < 1:
        raise UsageError(f"memory budget {value!r} must be at least 1 byte")
    return size


def show_size(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _gzip_size(path: Path) -> int:
    """The size a .gz file records for its data (RFC 1952 ISIZE, the last 4 bytes: modulo 2^32, last member only)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            return struct.unpack("<I", fh.read(4))[0]
    except (OSError, struct.error):
        return 0


def input_bytes(files: list[Path]) -> int:
    """The bytes of JSON the files hold: their size, and for a .gz what it records (at least GZIP_RATIO times its
    size, as the record is modulo 4 GiB). A file that cannot be read counts nothing (it is a read error later)."""
    total = 0
    for path in files:
        try:
            size = os.stat(path).st_size
        except OSError:
            continue
        if path.name.lower().endswith(".gz"):
            size = max(size * GZIP_RATIO, _gzip_size(path))
        total += size
    return total


_RESOURCE_TYPE = re.compile(rb'"resourceType"\s*:\s*"([A-Za-z]+)"')


def _samples(path: Path, size: int) -> list[bytes]:
    """Whole lines from the start, middle and end of a file (a .gz: its start only, as it cannot be sought)."""
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            return [fh.read(SAMPLE_BYTES)]
    with open(path, "rb") as fh:
        if size <= 3 * SAMPLE_BYTES:
            return [fh.read()]
        found = []
        for offset in (0, size // 2, size - SAMPLE_BYTES):
            fh.seek(offset)
            data = fh.read(SAMPLE_BYTES)
            start = data.find(b"\n") + 1 if offset else 0
            end = data.rfind(b"\n") + 1
            found.append(data[start:end] if end > start else data)
        return found


def estimate_rows(files: list[Path]) -> tuple[int, int]:
    """(rows, memory) the files' rows would take in memory: each file's size (a .gz: as input_bytes) times the rows of
    each kind per byte its samples hold (the densest sample, a margin for a file that changes along its length) times
    the kind's ROW_COSTS. The first pass counts the real rows; this only decides whether to partition, and how
    finely. A file that cannot be read counts nothing (it is a read error later)."""
    rows = memory = 0.0
    for path in files:
        size = input_bytes([path])
        if not size:
            continue
        try:
            samples = _samples(path, size)
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error):
            continue
        densest = (0.0, 0.0)  # (memory, rows) per byte
        for data in samples:
            if not data:
                continue
            kinds = Counter(_RESOURCE_TYPE.findall(data))
            per_byte = (
                sum(ROW_COSTS.get(k.decode(), 0) * n for k, n in kinds.items()) / len(data),
                sum(n for k, n in kinds.items() if k.decode() in ROW_COSTS) / len(data),
            )
            densest = max(densest, per_byte)
        memory += size * densest[0]
        rows += size * densest[1]
    return int(rows), int(memory)


@dataclass(frozen=True)
class PartitionPlan:
    """How an input larger than the memory budget is partitioned."""

    budget: int  # bytes the rows may take, in all
    workers: int  # processes evaluating partitions at once
    estimate: int  # bytes the rows of the whole input would take (estimate_rows)
    spilled: int  # partition files the first pass writes
    unit_budget: int  # bytes the rows of one evaluated partition may take: the budget of one process
    rows: int = 0  # the rows estimated

    @property
    def shown_estimate(self) -> str:
        return show_size(self.estimate)

    @property
    def shown_budget(self) -> str:
        return show_size(self.budget)


def plan_partitions(files: list[Path], budget: int | str | None = None, workers: int = 1) -> PartitionPlan | None:
    """None when the input's rows fit the budget (evaluated in memory, in this process); else how to partition."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--workers {workers!r} must be a whole number of at least 1")
    budget = DEFAULT_MEMORY_BUDGET if budget is None else parse_size(budget)
    rows, estimate = estimate_rows(files)
    if estimate <= budget:
        return None
    per_process = budget / workers
    spilled = min(MAX_SPILLED, max(2, OVERSPLIT * math.ceil(estimate / per_process)))
    return PartitionPlan(budget, workers, estimate, spilled, max(1, int(per_process)), rows)


# -- pass 1: spill -----------------------------------------------------------------------------------------------------
class _Links:
    """Join records: a 64-bit key hash, and its partition << 1 | 1 for a resource with that key, | 0 for a reference
    to it. Appended in memory (two array appends per record), written out every FLUSH records split by hash over
    JOIN_FILES files, so that each slice is joined alone in bounded memory."""

    FLUSH = 1 << 20

    def __init__(self, folder: Path, name: str):
        self.paths = [folder / f"{name}-{j:02d}.join" for j in range(JOIN_FILES)]
        for path in self.paths:
            path.write_bytes(b"")
        self.hashes = array("q")
        self.codes = array("q")

    def flush(self) -> None:
        if not self.hashes:
            return
        records = np.stack(
            [np.frombuffer(self.hashes, dtype=np.int64), np.frombuffer(self.codes, dtype=np.int64)], axis=1
        )
        slices = records[:, 0] % JOIN_FILES
        order = np.argsort(slices, kind="stable")
        bounds = np.searchsorted(slices[order], np.arange(JOIN_FILES + 1))
        for j in range(JOIN_FILES):
            if bounds[j] < bounds[j + 1]:
                with open(self.paths[j], "ab") as fh:
                    records[order[bounds[j] : bounds[j + 1]]].tofile(fh)
        self.hashes, self.codes = array("q"), array("q")

    def load(self, j: int) -> np.ndarray:
        return np.fromfile(self.paths[j], dtype=np.int64).reshape(-1, 2)


def _encode(resource: dict) -> bytes:
    """A resource of a Bundle or JSON file as one line (json.dumps: NaN and lone surrogates survive the round trip)."""
    return json.dumps(resource).encode("ascii") + b"\n"


class _Spill:
    """Pass 1: each resource read goes to the file of its patient's partition, or is counted here (Medications are
    kept aside for the partitions that reference them); what links resources across partitions is noted."""

    def __init__(self, folder: Path, partitions: int, base_url):
        self.folder = folder
        self.partitions = partitions
        self.bases = LocalBases(base_url)
        self.files = [open(_part(folder, p), "wb", buffering=1 << 16) for p in range(partitions)]
        self.sizes = [0] * partitions
        self.counts = [0] * partitions
        self.memory = [0] * partitions  # what the partition's rows take in memory: its rows by kind x ROW_COSTS
        self.links = _Links(folder, "links")  # Observations, and the results reports and panels list
        self.needs = _Links(folder, "needs")  # Medications referenced by medication resources
        self.medications = [open(folder / f"medications-{j:02d}.spill", "wb") for j in range(JOIN_FILES)]
        self.read_counts: Counter = Counter()
        self.skipped: Counter = Counter()
        self.evaluated = 0  # Medications: used whole, counted here
        self._routes: dict[str, int] = {}  # subject reference -> partition (-1: none), cleared past 65536 entries

    def run(self, items, tick=None) -> None:
        """Spill every (resource, path, line, entry, raw line) read. The hot loop of pass 1: names bound locally."""
        files, sizes, counts, memory, routes = self.files, self.sizes, self.counts, self.memory, self._routes
        costs = ROW_COSTS
        links, needs = self.links, self.needs
        link_hash, link_code = links.hashes.append, links.codes.append
        route, partition_of = self._route, self._partition
        medication_kinds = MEDICATION_KINDS
        for seq, (resource, _, _, _, raw) in enumerate(items):
            kind = resource["resourceType"]
            if kind not in ROUTED:
                self._other(resource, kind, seq, raw)
                continue
            partition = -1
            if kind != "Patient":
                subject = resource.get("subject")
                reference = subject.get("reference") if type(subject) is dict else None
                if type(reference) is str:
                    partition = routes.get(reference)
                    if partition is None:
                        partition = route(reference)
                        if len(routes) >= 65536:
                            routes.clear()
                        routes[reference] = partition
            if partition < 0:
                partition = partition_of(resource, kind)
            if raw is None:
                raw = _encode(resource)
            elif raw[-1:] != b"\n":
                raw += b"\n"  # the last line of a file may lack its newline
            line = b"%d\t%s" % (seq, raw)
            files[partition].write(line)
            sizes[partition] += len(line)
            counts[partition] += 1
            memory[partition] += costs[kind]
            if kind == "Observation":
                rid = resource.get("id")
                if type(rid) is str and rid:
                    link_hash(hash("Observation/" + rid))
                    link_code(partition << 1 | 1)
                members = resource.get("hasMember")
                if type(members) is list and members:
                    self._link(resource, members, partition)
            elif kind == "DiagnosticReport":
                results = resource.get("result")
                if type(results) is list and results:
                    self._link(resource, results, partition)
            elif kind in medication_kinds:
                medication = resource.get("medicationReference")
                reference = medication.get("reference") if type(medication) is dict else None
                if not (type(reference) is str and reference.startswith("#")):  # a contained one travels along
                    key = medication_key(self.bases, reference)
                    if key is not None:
                        needs.hashes.append(hash(key))
                        needs.codes.append(partition << 1)
            if len(links.hashes) >= _Links.FLUSH:
                links.flush()
                link_hash, link_code = links.hashes.append, links.codes.append
            if len(needs.hashes) >= _Links.FLUSH:
                needs.flush()
            if tick is not None and not seq & 4095:
                tick(seq)
        links.flush()
        needs.flush()
        for fh in self.files + self.medications:
            fh.close()

    def _other(self, resource: dict, kind: str, seq: int, raw: bytes | None) -> None:
        """A Medication is kept aside for the partitions that reference it; any other kind is only counted."""
        self.read_counts[kind] += 1
        if kind != "Medication":
            self.skipped[SKIP_NOT_USED] += 1
            return
        self.evaluated += 1
        ref = resource_ref(resource)
        if ref is not None:  # one without an id cannot be referenced: counted, nothing more
            key_hash = hash(ref)
            data = (raw if raw is not None else _encode(resource)).rstrip(b"\r\n")
            self.medications[key_hash % JOIN_FILES].write(b"%d\t%d\t%s\n" % (seq, key_hash, data))

    def _link(self, resource: dict, references: list, partition: int) -> None:
        """The results a report (or panel Observation) lists, as normalise.Reports reads them."""
        if resource_ref(resource) is None:
            return  # a report without an id links nothing (Reports._note)
        bases, hashes, codes = self.bases, self.links.hashes, self.links.codes
        for item in references:
            if isinstance(item, dict):
                key = observation_key(bases, item.get("reference"))
                if key is not None:
                    hashes.append(hash(key))
                    codes.append(partition << 1)

    def _partition(self, resource: dict, kind: str) -> int:
        """A Patient's partition by its id; a resource without a patient to go by (it is quarantined or skipped for
        that wherever it goes) by its own id."""
        rid = resource.get("id")
        if kind == "Patient" and type(rid) is str and rid:
            return self._hash(rid)
        return self._hash(f"{kind}/{rid}" if type(rid) is str else kind)

    def _route(self, reference: str) -> int:
        """The partition of a subject: by the patient id it names, typed (`Patient/x`) or not (`urn:uuid:x`)."""
        target = self.bases.target(reference)
        if target is FOREIGN:
            return -1
        kind, rid = target
        return self._hash(rid) if rid and not rid.startswith("#") and kind in ("Patient", None) else -1

    def _hash(self, key: str) -> int:
        # CRC-32: stable across processes and runs (Python's str hash is salted per process).
        return zlib.crc32(key.encode("utf-8", "surrogatepass")) % self.partitions


def _part(folder: Path, partition: int) -> Path:
    return folder / f"part-{partition:04d}.spill"


def _context_file(folder: Path, partition: int) -> Path:
    return folder / f"part-{partition:04d}.context"


# -- between the passes: what must be evaluated together, and where each Medication goes -------------------------------
def _linked(links: _Links, partitions: int) -> list[list[int]]:
    """The partitions, grouped: those holding copies or versions of one Observation, or a result and a report (or
    panel) that lists it, are in one group. Each group sorted; groups by their first partition."""
    parent = list(range(partitions))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for j in range(JOIN_FILES):
        records = links.load(j)
        if not len(records):
            continue
        order = np.argsort(records[:, 0], kind="stable")
        keys, codes = records[order, 0], records[order, 1]
        partition, has = codes >> 1, codes & 1
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        low = np.minimum.reduceat(partition, starts)
        high = np.maximum.reduceat(partition, starts)
        present = np.maximum.reduceat(has, starts)
        # Keys seen in more than one partition that name a resource of the input (a reference to a result that is
        # not in the input links nothing).
        crossing = (low != high) & (present == 1)
        if not crossing.any():
            continue
        group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(keys)]))
        chosen = crossing[group]
        pairs = np.unique(np.stack([partition[chosen], low[group[chosen]]], axis=1), axis=0)
        for a, b in pairs.tolist():
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = defaultdict(list)
    for p in range(partitions):
        groups[find(p)].append(p)
    return sorted(groups.values(), key=lambda g: g[0])


def _deliver_medications(spill: _Spill) -> None:
    """Each Medication into the context file of every partition whose medication resources reference it."""
    with ExitStack() as stack:
        contexts: dict[int, object] = {}
        for j in range(JOIN_FILES):
            needs = spill.needs.load(j)
            if not len(needs):
                continue
            wanted = np.unique(np.stack([needs[:, 0], needs[:, 1] >> 1], axis=1), axis=0)  # by hash, then partition
            hashes = wanted[:, 0]
            with open(spill.folder / f"medications-{j:02d}.spill", "rb") as fh:
                for line in fh:
                    seq, key_hash, data = line.split(b"\t", 2)
                    key_hash = int(key_hash)
                    lo, hi = np.searchsorted(hashes, key_hash, "left"), np.searchsorted(hashes, key_hash, "right")
                    for partition in wanted[lo:hi, 1].tolist():
                        if partition not in contexts:
                            path = _context_file(spill.folder, partition)
                            contexts[partition] = stack.enter_context(open(path, "wb"))
                        contexts[partition].write(seq + b"\t" + data)
                        spill.memory[partition] += ROW_COSTS["Medication"]  # held by each partition it goes to


@dataclass
class _Unit:
    """Partitions evaluated together in one process: whole groups, up to the budget of one process."""

    number: int
    groups: list[list[int]] = field(default_factory=list)
    size: int = 0  # bytes of spilled JSON
    resources: int = 0
    memory: int = 0  # what its rows take in memory (ROW_COSTS), packed up to one process's budget


def _units(groups: list[list[int]], spill: _Spill, limit: int) -> list[_Unit]:
    """Whole groups packed, in order, into units whose rows take at most `limit` bytes of memory: by the rows the
    first pass counted, not by their bytes (compact JSON holds many more rows per byte than verbose)."""
    units: list[_Unit] = []
    for group in groups:
        resources = sum(spill.counts[p] for p in group)
        if not resources:
            continue
        memory = sum(spill.memory[p] for p in group)
        if not units or units[-1].memory + memory > limit:
            units.append(_Unit(len(units)))
        unit = units[-1]
        unit.groups.append(group)
        unit.size += sum(spill.sizes[p] for p in group)
        unit.resources += resources
        unit.memory += memory
    return units


# -- pass 2: evaluate --------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    """What every partition's evaluation shares (set before the worker processes fork, so nothing is pickled)."""

    folder: Path
    rules: Rules
    base_url: object
    parameters: dict
    as_of: datetime | None
    units: list[_Unit]
    run_time: datetime | None = None


_JOB: _Job | None = None


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb", buffering=1 << 20) as fh:
        yield from fh


def _seq(line: bytes) -> int:
    return int(line[: line.index(b"\t")])


def _unit_lines(folder: Path, unit: _Unit) -> Iterator[tuple[int, bytes]]:
    """(input position, JSON) of a unit's resources: a group of several partitions in the order the input was read."""
    for group in unit.groups:
        paths = [_part(folder, p) for p in group]
        lines = _lines(paths[0]) if len(paths) == 1 else heapq.merge(*map(_lines, paths), key=_seq)
        for line in lines:
            seq, _, data = line.partition(b"\t")
            yield int(seq), data


def _unit_context(folder: Path, unit: _Unit) -> list[dict]:
    """The Medications the unit's resources reference, each copy once, in input order (the last copy wins)."""
    found: dict[int, bytes] = {}
    for group in unit.groups:
        for p in group:
            path = _context_file(folder, p)
            if path.exists():
                for line in _lines(path):
                    seq, _, data = line.partition(b"\t")
                    found[int(seq)] = data
    return [decode_line(found[seq]) for seq in sorted(found)]


def _flag_key(spec) -> str:
    """The in-memory order of Flags (evaluate(): patient, family, episode start), as a JSON list."""
    return json.dumps([spec.patient_id, spec.family, (spec.start - _EPOCH) // _MICROSECOND])


def _evaluate_unit(number: int) -> dict:
    """One unit through the stages (stages.run_stages; no threshold: checked on the totals); its Flags and
    quarantined resources to files of the unit; returns its report."""
    job = _JOB
    unit = job.units[number]
    normaliser = Normaliser(job.rules, base_url=job.base_url)
    for medication in _unit_context(job.folder, unit):
        normaliser.add_context(medication)
    counts: dict[str, int] = {}
    add = normaliser.add
    for seq, data in _unit_lines(job.folder, unit):
        resource = decode_line(data)
        kind = resource["resourceType"]
        counts[kind] = counts.get(kind, 0) + 1
        add(resource, seq)
    read = ReadResult(normaliser.finish(), Counter(counts), [], Sources(), [])
    staged = run_stages(read, job.rules, job.parameters, as_of=job.as_of, run_time=job.run_time)
    checked, specs = staged.checked, staged.evaluation.specs
    with open(job.folder / f"unit-{number:04d}.flags", "w", encoding="utf-8") as fh:
        for position, flag in zip(checked.kept, checked.flags):
            fh.write(_flag_key(specs[position]) + "\t" + flag_line(flag))
    _write_unit_quarantine(job.folder, unit, staged.quarantined)
    report = staged.report
    report["lapse_horizon"] = staged.evaluation.lapse_horizon
    return report


def _write_unit_quarantine(folder: Path, unit: _Unit, quarantined: list) -> None:
    """The unit's quarantined resources, re-read from its partition files, with their reasons, by input position."""
    wanted: dict[int, list[str]] = {}
    for seq, _, reasons in sorted(quarantined, key=lambda q: q[0]):
        wanted.setdefault(seq, []).extend(reasons)
    found = list(pick_quarantined(wanted, _unit_lines(folder, unit), decode_line)) if wanted else []
    with open(folder / f"unit-{unit.number:04d}.quarantine", "w", encoding="utf-8") as fh:
        for seq, text in sorted(found):
            fh.write(f"{seq}\t{text}")


def _run_units(job: _Job, workers: int, done, numbers: list[int] | None = None) -> None:
    """Evaluate every unit (or those `numbers`) in a process of its own, forked from this one, at most `workers` at
    once: a unit's memory goes back to the system when its process ends, so each starts from the same footprint (in
    one long-lived process the allocator keeps some of every earlier unit). `done(number, report)` as each
    finishes."""
    global _JOB
    prepare()  # Great Expectations imported and set up once, before forking, not once per unit
    _JOB = job
    fork = multiprocessing.get_context("fork")
    pending = list(range(len(job.units))) if numbers is None else list(numbers)
    running: dict = {}  # sentinel -> (process, unit number)
    if multiprocessing.current_process().daemon:
        # A Celery task runs in a daemonic process, which multiprocessing forbids to have children: the units are
        # evaluated here one after another (each sized to the budget; the allocator keeps some of the earlier ones).
        log.info("a daemonic process (a Celery task): %d partitions evaluated one after another in it", len(pending))
        try:
            for number in pending:
                _unit_process(number)
                done(number, _unit_result(job.folder, number, None))
        finally:
            _JOB = None
        return
    try:
        while pending or running:
            while pending and len(running) < workers:
                number = pending.pop(0)
                process = fork.Process(target=_unit_process, args=(number,), name=f"leukofhir-partition-{number}")
                process.start()
                running[process.sentinel] = (process, number)
            for sentinel in wait(list(running)):
                process, number = running.pop(sentinel)
                process.join()
                done(number, _unit_result(job.folder, number, process.exitcode))
    finally:
        for process, _ in running.values():  # an error (or Ctrl-C) here: the other units' processes go too
            process.kill()
            process.join()
        _JOB = None


def _result_file(folder: Path, number: int) -> Path:
    return folder / f"unit-{number:04d}.result"


def _unit_process(number: int) -> None:
    """A unit's process: its report (with the process's peak RSS), or the error that ended it, to the unit's result
    file (pickled)."""
    _reset_peak_rss()
    try:
        result = ("report", {**_evaluate_unit(number), "peak_rss": _peak_rss()})
    except BaseException as exc:  # handed to the parent, which raises it
        result = ("error", exc)
    path = _result_file(_JOB.folder, number)
    try:
        data = pickle.dumps(result)
    except Exception:  # an error that does not pickle: its type and words
        data = pickle.dumps(("error", PartitionError(f"{type(result[1]).__name__}: {result[1]}")))
    path.with_suffix(".part").write_bytes(data)
    path.with_suffix(".part").replace(path)


def _reset_peak_rss() -> None:
    """The peak RSS of this (forked) process from now on, not its parent's: Linux resets it on `5` to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """Bytes: this process's peak RSS (VmHWM; where there is no /proc, getrusage, which may include its parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _unit_result(folder: Path, number: int, exitcode: int | None) -> dict:
    path = _result_file(folder, number)
    if not path.exists():
        raise PartitionError(
            f"the process evaluating partition {number} died (exit code {exitcode}): out of memory? "
            "lower --memory-budget or --workers"
        )
    kind, value = pickle.loads(path.read_bytes())
    if kind == "error":
        raise value
    return value


# -- the whole run ---------------------------------------------------------------------------------------------------
def evaluate_partitioned(
    files: list[Path],
    paths,
    out: Path,
    rules: Rules,
    plan: PartitionPlan,
    *,
    as_of: datetime | None,
    run_time: datetime | None = None,
    base_url=None,
    progress: bool = True,
    fail_on_threshold: bool = False,
    skipped_files: list[str] | None = None,
) -> dict:
    """evaluate_files for an input above the memory budget: spill by patient (pass 1), evaluate the partitions (pass 2),
    merge their outputs into `out` as the in-memory path writes them; returns the report."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=".partitions-", dir=out))
    except OSError as exc:
        raise OutputError(f"cannot make the partitions' folder in {out}: {exc.strerror or exc}") from None
    try:
        log.info(
            "input rows about %s, above the memory budget %s: partitioning by patient (%d files, %d worker%s)",
            plan.shown_estimate,
            plan.shown_budget,
            plan.spilled,
            plan.workers,
            "s" if plan.workers > 1 else "",
        )
        spill, read_errors = _spill(files, folder, plan, base_url, progress)
        groups = _linked(spill.links, plan.spilled)
        _deliver_medications(spill)
        units = _units(groups, spill, plan.unit_budget)
        linked = [g for g in groups if len(g) > 1 and sum(spill.counts[p] for p in g)]
        if linked:
            log.info(
                "%d group(s) of partitions evaluated together: results copied under another patient, or listed "
                "by another patient's report",
                len(linked),
            )
        for unit in units:
            if unit.memory > plan.unit_budget:
                log.warning(
                    "partition %d's rows take about %s, above one process's share of the memory budget (%s): "
                    "its patients (or patients linked by their data) cannot be split further",
                    unit.number,
                    show_size(unit.memory),
                    show_size(plan.unit_budget),
                )
        job = _Job(folder, rules, base_url, suite_parameters(rules), as_of, units, run_time)
        reports: dict[int, dict] = {}
        bar = progress_bar("pass 2/2: evaluating", progress, total=sum(u.resources for u in units))
        try:

            def done(number: int, report: dict) -> None:
                reports[number] = report
                if bar is not None:
                    bar.update(units[number].resources)

            _run_units(job, plan.workers, done)
            if as_of is None:
                _again_as_of_the_latest(job, plan.workers, reports)
        finally:
            if bar is not None:
                bar.close()
        report = _report(
            paths,
            skipped_files or [],
            spill,
            read_errors,
            [reports[n] for n in range(len(units))],
            as_of,
            plan,
            units,
            linked,
        )
        parts = report["partitions"]
        log.info(
            "%d partitions: rows estimated at up to %s each (%s per process); their processes peaked at up to %s",
            len(units),
            show_size(parts["largest_estimated"]),
            show_size(plan.unit_budget),
            show_size(parts["largest_peak_rss"]),
        )
        if fail_on_threshold:
            check_contract(report["contract"], rules.validation)
        numbers = range(len(units))
        finish_outputs(
            out,
            report,
            lambda target: _merge(target, [folder / f"unit-{n:04d}.flags" for n in numbers], _flag_order),
            lambda target: _merge(
                target,
                [folder / f"unit-{n:04d}.quarantine" for n in numbers],
                _seq,
                [read_error_line(e).encode("utf-8") for e in read_errors],
            ),
        )
        return report
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _again_as_of_the_latest(job: _Job, workers: int, reports: dict[int, dict]) -> None:
    """Without a given as-of, the in-memory path evaluates as of the whole input's latest time; a unit evaluated as of
    its own, earlier one is evaluated again as of it when one of its open episodes would lapse in between (v1.3 §4).
    Rare: it takes an open episode whose last value is about the episode gap before the input's end."""
    times = {n: datetime.fromisoformat(r["as_of"]) for n, r in reports.items() if r.get("as_of")}
    if not times:
        return
    latest = max(times.values())
    again = [n for n, r in sorted(reports.items()) if r["lapse_horizon"] is not None and r["lapse_horizon"] < latest]
    if again:
        log.info(
            "%d partition(s) evaluated again as of the input's latest time %s: open episodes lapse by then",
            len(again),
            latest.isoformat(),
        )
        _run_units(
            _Job(job.folder, job.rules, job.base_url, job.parameters, None, job.units, latest),
            workers,
            reports.__setitem__,
            again,
        )


def _spill(
    files: list[Path], folder: Path, plan: PartitionPlan, base_url, progress: bool
) -> tuple[_Spill, list[ReadError]]:
    """Pass 1: read every file once, spilling each resource to its partition; read errors shown (capped) and kept."""
    read_errors, on_read_error = read_error_collector()
    spill = _Spill(folder, plan.spilled, base_url)
    bar = progress_bar("pass 1/2: partitioning", progress)
    try:
        spill.run(
            iter_located(files, on_read_error, raw=True), None if bar is None else lambda seq: bar.update(seq - bar.n)
        )
    except OSError as exc:
        raise OutputError(f"cannot write the partitions in {folder}: {exc.strerror or exc}") from None
    finally:
        if bar is not None:
            bar.close()
    return spill, read_errors


def _flag_order(line: bytes) -> list:
    return json.loads(line[: line.index(b"\t")])


def _merge(target: Path, parts: list[Path], key, tail: list[bytes] = ()) -> None:
    """The parts' lines (each sorted by `key`, prefixed with it and a tab) merged in `key` order, prefix removed; then
    `tail`."""
    with ExitStack() as stack:
        sources = [stack.enter_context(open(p, "rb")) for p in parts]
        with open(target, "wb") as out:
            for line in heapq.merge(*sources, key=key):
                out.write(line[line.index(b"\t") + 1 :])
            for line in tail:
                out.write(line)


def _latest(values: list[str | None]) -> str | None:
    present = [v for v in values if v]
    return max(present, key=datetime.fromisoformat) if present else None


def _report(
    paths,
    skipped_files: list[str],
    spill: _Spill,
    read_errors: list[ReadError],
    parts: list[dict],
    as_of: datetime | None,
    plan: PartitionPlan,
    units: list[_Unit],
    linked: list[list[int]],
) -> dict:
    """The run report of the in-memory path from the partitions' reports and what the first pass counted."""
    read_total = sum(spill.read_counts.values())
    counted = read_total - sum(spill.skipped.values())
    first_pass = {
        "read": dict(spill.read_counts),
        "read_total": read_total,
        "evaluated": spill.evaluated,
        "skipped": dict(spill.skipped),
        "quarantined": {},
        "read_errors": len(read_errors),
        "stages": {"read": read_total, "normalised": counted, "validated": counted, "evaluated": spill.evaluated},
        "flags": {"total": 0},
        "flags_rejected": 0,
    }
    merged = merge_reports([first_pass, *parts])
    expectations = sorted(merged["expectations"], key=lambda e: SUITES.index(e["suite"]))
    return {
        "inputs": [str(p) for p in paths],
        "skipped_files": skipped_files,
        "as_of": as_of.isoformat() if as_of is not None else _latest([p["as_of"] for p in parts]),
        **{
            k: merged[k]
            for k in (
                "read",
                "read_total",
                "evaluated",
                "skipped",
                "quarantined",
                "quarantine_examples",
                "read_errors",
                "stages",
                "flags_held",
                "contract",
            )
        },
        "expectations": expectations,
        "flags": merged["flags"],
        "flags_rejected": merged["flags_rejected"],
        "flags_rejected_identifiers": sorted({i for p in parts for i in p["flags_rejected_identifiers"]}),
        "flags_held_identifiers": sorted({i for p in parts for i in p["flags_held_identifiers"]}),
        "trends": merged["trends"],
        "trends_total": merged["trends_total"],
        "partitions": {
            "memory_budget": plan.budget,
            "estimated": plan.estimate,
            "estimated_rows": plan.rows,
            "workers": plan.workers,
            "spilled": plan.spilled,
            "evaluated": len(units),
            "linked_groups": len(linked),
            "largest_bytes": max((u.size for u in units), default=0),
            "largest_estimated": max((u.memory for u in units), default=0),
            "largest_peak_rss": max((p.get("peak_rss") or 0 for p in parts), default=0),
            # Each evaluated partition: its rows, bytes of JSON, the memory its rows were estimated to take (packed
            # up to memory_budget / workers) and the peak RSS its process measured (rows and its own base).
            "units": [
                {"rows": u.resources, "bytes": u.size, "estimated": u.memory, "peak_rss": p.get("peak_rss")}
                for u, p in zip(units, parts)
            ],
        },
    }
