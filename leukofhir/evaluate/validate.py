"""Validate tidy rows against the GX suites in expectations/ and split them into valid and quarantined rows."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leukofhir.config import Rules
from leukofhir.errors import ConfigError, LeukofhirError
from leukofhir.report.html import scope_name

# The suites live at the top of the repository (the design card fixes the layout) and travel inside the wheel:
# leukofhir/expectations links to them in a checkout and holds a copy in an installed package. A site with its own
# suites points LEUKOFHIR_EXPECTATIONS_DIR at them.
EXPECTATIONS_DIR = Path(
    os.environ.get("LEUKOFHIR_EXPECTATIONS_DIR") or Path(__file__).resolve().parents[1] / "expectations"
)

# Which column names a row in messages and examples; ids only, never patient data.
ID_COLUMN = {"observations": "resource_id", "exposures": "resource_id", "flags": "identifier"}
# Columns a failing row's reason may quote besides its id: the concept and unit of an unconvertible result.
REASON_COLUMNS = {"observations": ("concept", "unit")}

EXAMPLES_PER_EXPECTATION = 5
MAX_BREACHES_SHOWN = 3  # failing suites or feeds named in the message of a run that stops


# The column naming a row's patient, and the columns whose values name a row's feed: the source a systemic fault
# comes from (a laboratory's WBC in one unit, a pharmacy system's MedicationRequests). Flags are ours: no feeds.
PATIENT_COLUMN = {"observations": "patient_id", "exposures": "patient_id", "flags": "subject"}
FEED_COLUMNS = {"observations": ("concept", "unit"), "exposures": ("type",), "flags": ()}


class ValidationThresholdError(LeukofhirError):
    """A run whose data fails its contract systemically (contract_breaches): nothing may be written."""


@dataclass
class ValidationResult:
    valid: pd.DataFrame
    reasons: dict[str, list[str]]  # row_id -> one reason per failed expectation
    expectations: list[dict]  # one summary per expectation, for the run report


# FHIR R4 Flag.status (required binding): the statuses the engine may write.
FLAG_STATUSES = ["active", "inactive", "entered-in-error"]


def suite_parameters(config: Rules, now: datetime | None = None) -> dict:
    """The values the suites take as `$PARAMETER`s, from the rules configuration (never duplicated in the JSON).

    `now` is the instant "the future" starts at, plus the clock skew; tests and re-runs pass it, the default is
    the wall clock (a result dated after the moment we read it is wrong whatever window is being evaluated)."""
    settings = config.validation
    concepts = config.observations.concepts
    counts = {name for name, concept in concepts.items() if concept.kind == "count"}
    latest = pd.Timestamp(now or datetime.now(timezone.utc))
    latest = latest.tz_localize("UTC") if latest.tzinfo is None else latest.tz_convert("UTC")
    return {
        "accepted_units": sorted({*config.units.counts, *config.units.hemoglobin, *config.units.percent}),
        "accepted_statuses": sorted(config.accepted_statuses),
        "min_value": settings.min_value,
        # Lab and server clocks drift; a result stamped a few minutes ahead is not a wrong date.
        "latest_time": latest + pd.Timedelta(settings.clock_skew),
        "flag_statuses": FLAG_STATUSES,
        "flag_codes": sorted(
            condition.snomed
            for condition in (
                config.leukopenia,
                config.neutropenia,
                config.agranulocytosis,
                config.lymphopenia,
                config.pancytopenia,
            )
        ),
        # Not GX parameters: validate_batch turns these into the helper columns plausible_max and panel_wbc.
        "plausible_max": dict(settings.plausible_max),
        # A differential count is a part of the WBC: every count concept except the WBC itself and platelets.
        "differential_concepts": sorted(counts - {"wbc", "platelets"}),
    }


def validate_batch(suite: str, rows: pd.DataFrame, parameters: dict) -> ValidationResult:
    """Run one suite on a batch of tidy rows: the rows that pass, reasons for those that fail, and GX's results. A
    batch never fails for its failing rows: they are quarantined, and the contract is judged on a whole run's counts
    (contract_counts, contract_breaches).

    `rows` needs a unique str column `row_id`."""
    if suite not in ID_COLUMN:
        raise ConfigError(f"unknown expectation suite {suite!r}; known: {', '.join(ID_COLUMN)}")
    suites, batches = _context()
    id_column = ID_COLUMN[suite]
    frame, naive = prepare_frame(suite, rows, parameters)
    batch = batches[suite].get_batch(batch_parameters={"dataframe": frame})
    run = batch.validate(
        suites[suite],
        expectation_parameters=parameters,
        result_format={
            # COMPLETE: every failing row id, not a sample, or quarantine would lose rows.
            "result_format": "COMPLETE",
            "unexpected_index_column_names": ["row_id", id_column, *REASON_COLUMNS.get(suite, ())],
            # The pandas index query lists every failing index as text: costly and unused.
            "return_unexpected_index_query": False,
            "include_unexpected_rows": False,
        },
    )
    reasons: dict[str, list[str]] = defaultdict(list)
    summaries = [_collect(suite, result, id_column, reasons, naive) for result in run.results]
    valid = rows[~rows["row_id"].isin(list(reasons))] if reasons else rows
    return ValidationResult(valid=valid, reasons=dict(reasons), expectations=summaries)


def prepare_frame(suite: str, rows: pd.DataFrame, parameters: dict) -> tuple[pd.DataFrame, frozenset[str]]:
    """The frame GX validates for `suite`: helper columns added, only the columns the suite reads, tz-aware
    column pairs made naive UTC (returned as the set of such columns, to put the zone back on reported values)."""
    frame = _with_helper_columns(rows, parameters) if suite == "observations" else rows
    # GX filters and copies whole batches per expectation: give it only the columns the suite reads.
    needed = _suite_columns(suite) | {"row_id", ID_COLUMN[suite], *REASON_COLUMNS.get(suite, ())}
    return _naive_pair_columns(suite, frame[[c for c in frame.columns if c in needed]])


def _with_helper_columns(rows: pd.DataFrame, parameters: dict) -> pd.DataFrame:
    """Add the helper columns the Observation suite checks.

    `plausible_max`: the parameter `plausible_max` looked up by concept. A column-pair expectation on it costs one
    pass, where one row-conditioned expectation per concept cost GX about 3 s per million rows.
    `panel_wbc`: on a differential count, the highest WBC of the same panel (DiagnosticReport); else NaN.
    `earlier_copies`, `differing_copies`: see `_copies`."""
    maxima = parameters["plausible_max"]
    concept = rows["concept"]
    # Few distinct concepts and panels: look values up per distinct value (a hash pass in C), not per row.
    codes, concepts = pd.factorize(concept)
    unbounded = {c for c in concepts if isinstance(c, str)} - set(maxima)
    if unbounded:
        # Without a bound the check would pass silently; a site adding a concept must give its range.
        raise ConfigError(f"no plausible_max configured for concept(s): {', '.join(sorted(unbounded))}")
    n = len(rows)
    per_concept = np.array([maxima[c] if isinstance(c, str) else np.nan for c in concepts] + [np.nan], dtype="float64")
    plausible_max = per_concept[codes]  # code -1 (no concept) takes the NaN at the end
    panel_wbc = np.full(n, np.nan)
    differential = np.flatnonzero(concept.isin(parameters["differential_concepts"]).to_numpy())
    if len(differential):
        wbc = rows.loc[(concept == "wbc") & rows["panel"].notna(), ["panel", "value"]]
        if len(wbc):
            highest = wbc.groupby("panel", sort=False)["value"].max()
            where = highest.index.get_indexer(rows["panel"].to_numpy()[differential])
            found = where >= 0
            panel_wbc[differential[found]] = highest.to_numpy()[where[found]]
    earlier_copies, differing_copies = _copies(rows)
    return rows.assign(
        plausible_max=plausible_max,
        panel_wbc=panel_wbc,
        earlier_copies=earlier_copies,
        differing_copies=differing_copies,
    )


# What a copy of a resource may differ in from the first copy read, as bits of the `differing_copies` helper column.
_COPY_FIELDS = (
    ("patient_id", "subject"),
    ("concept", "code"),
    ("code", "code"),
    ("value", "value"),
    ("comparator", "comparator"),
    ("unit", "unit"),
    ("status", "status"),
    ("time", "time"),
    ("lln", "reference range"),
)


def _copies(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per row, for copies of one resource (same resource_id and version, e.g. in a Bundle and in an NDJSON export):
    `earlier_copies`, how many identical copies were read before it; `differing_copies`, the fields (bits of
    _COPY_FIELDS) in which it differs from the first copy read, 0 when none. The first copy read passes both checks
    and goes on; every repeat fails at least one, and one with other content is quarantined saying so (GX's
    compound-unique check would quarantine every copy, so a resource read twice would never be evaluated)."""
    n = len(rows)
    earlier = np.zeros(n, dtype="int64")
    differing = np.zeros(n, dtype="int64")
    # Copies are rare: find the repeated resource ids with one hash pass, look only at them.
    repeated = np.flatnonzero(rows["resource_id"].duplicated(keep=False).to_numpy())
    if not len(repeated):
        return earlier, differing
    columns = ["resource_id", "version"] + [c for c, _ in _COPY_FIELDS if c in rows.columns]
    subset = rows.iloc[repeated][columns]
    first: dict[tuple, tuple] = {}
    seen: dict[tuple, int] = {}
    for position, row in zip(repeated, subset.itertuples(index=False, name=None)):
        if not isinstance(row[0], str):
            continue  # no id: not a copy of anything (the not-null check quarantines it)
        key = row[:2]
        content = tuple(None if v is pd.NaT or (isinstance(v, float) and v != v) else v for v in row[2:])
        earlier[position] = seen.get((key, content), 0)
        seen[(key, content)] = earlier[position] + 1
        reference = first.setdefault(key, content)
        differing[position] = sum(1 << bit for bit, (a, b) in enumerate(zip(reference, content)) if a != b)
    return earlier, differing


def _copy_fields(mask) -> str:
    names = []
    for bit, (_, name) in enumerate(_COPY_FIELDS):
        if int(mask) >> bit & 1 and name not in names:
            names.append(name)
    return ", ".join(names) or "content"


@functools.cache
def _suite_columns(suite: str, keys: tuple[str, ...] = ("column", "column_A", "column_B")) -> frozenset[str]:
    """The columns the suite's expectations read (through the given kwargs)."""
    suites, _ = _context()
    columns = set()
    for expectation in suites[suite].expectations:
        kwargs = expectation.configuration.kwargs
        columns.update(kwargs[k] for k in keys if isinstance(kwargs.get(k), str))
    return frozenset(columns)


def _naive_pair_columns(suite: str, frame: pd.DataFrame) -> tuple[pd.DataFrame, frozenset[str]]:
    """Column-pair expectations get tz-aware datetime columns as naive UTC.

    GX lists a pair's failing values through `Series.values`, which pandas 3.1 deprecates for tz-aware columns
    (Pandas4Warning: it drops the zone). Naive UTC compares exactly the same; `_collect` puts the zone back on the
    values it reports, so reasons still read `2025-01-01T00:00:00+00:00`."""
    columns = [
        c
        for c in _suite_columns(suite, ("column_A", "column_B"))
        if c in frame.columns and isinstance(frame[c].dtype, pd.DatetimeTZDtype)
    ]
    if not columns:
        return frame, frozenset()
    return frame.assign(**{c: frame[c].dt.tz_convert("UTC").dt.tz_localize(None) for c in columns}), frozenset(columns)


def _collect(
    suite: str, result: Any, id_column: str, reasons: dict[str, list[str]], naive_utc: frozenset[str] = frozenset()
) -> dict:
    """Turn one GX expectation result into reasons per failing row and a summary for the report."""
    config = result.expectation_config
    kwargs = config.kwargs
    name = config.type
    if _raised(result):
        # An expectation that could not run has checked nothing: a broken contract, not bad data.
        raise ConfigError(f"{suite}: {name}({_columns(kwargs)}) could not run: {_exception_text(result)}")
    label = f"{name}({_columns(kwargs)})"
    failing = result.result.get("unexpected_index_list") or []
    examples: list[str] = []
    for entry in failing:
        for column in naive_utc.intersection(entry):
            if isinstance(entry[column], pd.Timestamp) and entry[column] is not pd.NaT:
                entry[column] = entry[column].tz_localize("UTC")
        reasons[entry["row_id"]].append(f"{label}: {_explain(name, kwargs, entry)}")
        if len(examples) < EXAMPLES_PER_EXPECTATION:
            # A row without its resource id is still named, by its row id.
            example = entry.get(id_column)
            example = example if isinstance(example, str) else f"row {entry['row_id']}"
            if example not in examples:
                examples.append(example)
    return {
        "suite": suite,
        "name": name,
        "column": _columns(kwargs),
        "why": (config.meta or {}).get("why"),
        "success": bool(result.success),
        "unexpected_count": int(result.result.get("unexpected_count") or 0),
        "element_count": int(result.result.get("element_count") or 0),
        "examples": examples,
    }


def _raised(result: Any) -> bool:
    info = result.exception_info or {}
    if "raised_exception" in info:
        return bool(info["raised_exception"])
    # With several metrics GX keys the exception info by metric id.
    return any(isinstance(v, dict) and v.get("raised_exception") for v in info.values())


def _exception_text(result: Any) -> str:
    info = result.exception_info or {}
    if "exception_message" in info:
        return str(info["exception_message"])
    return "; ".join(str(v.get("exception_message")) for v in info.values() if isinstance(v, dict))


def _columns(kwargs: dict) -> str:
    if "column_A" in kwargs:
        return f"{kwargs['column_A']}, {kwargs['column_B']}"
    return kwargs["column"]


def _explain(name: str, kwargs: dict, entry: dict) -> str:
    """Say what was wrong with the row's value, in words a data engineer can act on."""
    if "column_A" in kwargs:
        a, b = kwargs["column_A"], kwargs["column_B"]
        word = "after" if isinstance(entry.get(b), datetime) else "above"
        return f"{b} {_show(entry.get(b))} {word} {a} {_show(entry.get(a))}"
    column = kwargs["column"]
    if column == "differing_copies":
        return (
            f"another copy of this id and version, read before it, differs in {_copy_fields(entry.get(column))}: "
            "the first copy read goes on, this one is quarantined"
        )
    if column == "earlier_copies":
        return "an identical copy of this id and version was read before it: the first copy goes on"
    if column == "value" and name == "expect_column_values_to_not_be_null":
        unit, concept = _show(entry.get("unit")), entry.get("concept")
        return f"value missing: unit {unit} cannot be converted to the unit of {concept} (§1.2)"
    value = _show(entry.get(column))
    if column == "unit" and name == "expect_column_values_to_be_in_set":
        return f"unknown unit {value} for {entry.get('concept')}"
    if name == "expect_column_values_to_not_be_null":
        return "value missing"
    if name == "expect_column_values_to_be_in_set":
        return f"value {value} not accepted"
    if name == "expect_column_values_to_be_between":
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        if low is None:
            return f"value {value} above {_show(high)}"
        if high is None:
            return f"value {value} below {_show(low)}"
        return f"value {value} outside [{_show(low)}, {_show(high)}]"
    if name == "expect_column_values_to_be_unique":
        return f"value {value} occurs more than once"
    return f"value {value} unexpected"


def _show(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value) or value is pd.NaT:
        return "missing"
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.isoformat()
    if isinstance(value, str):
        return repr(value)
    if hasattr(value, "item"):  # numpy scalar: show it as the plain Python number
        value = value.item()
    return repr(value) if isinstance(value, float) else str(value)


# -- the data contract: judged on a run's totals, per suite and per feed ----------------------------------------------
def contract_counts(suite: str, *parts: tuple[pd.DataFrame, dict[str, list[str]]]) -> list[dict]:
    """The counts the data contract is judged on, for one batch of a suite's rows: `parts`, each (rows, reasons of
    its failing rows by row_id), e.g. the rows GX checked and those the normaliser quarantined before. One scope for
    the whole suite and one per feed (FEED_COLUMNS), each with its rows, failing rows, distinct patients among them,
    failing rows per expectation and a few failing resource ids. The counts of batches add up (merge_contract): a
    run's batches hold disjoint patients."""
    scopes: dict[str, tuple[dict, set]] = {}  # feed as JSON -> (scope, its failing rows' patients)

    def scope(feed: dict | None) -> tuple[dict, set]:
        key = json.dumps(feed, sort_keys=True)
        if key not in scopes:
            scopes[key] = (_scope(suite, feed, 0), set())
        return scopes[key]

    for rows, reasons in parts:
        if rows.empty:
            continue
        feeds, feed_of = _feeds(suite, rows)
        here = [scope(None)] + [scope(feed) for feed, _ in feeds]
        for (target, _), n in zip(here, [len(rows)] + [n for _, n in feeds]):
            target["rows"] += n
        if not reasons:
            continue
        failing = np.flatnonzero(rows["row_id"].isin(list(reasons)).to_numpy())
        for row_id, rid, patient, feed in zip(
            rows["row_id"].to_numpy()[failing],
            rows[ID_COLUMN[suite]].to_numpy()[failing],
            rows[PATIENT_COLUMN[suite]].to_numpy()[failing],
            feed_of[failing],
        ):
            labels = sorted({reason.split(": ", 1)[0] for reason in reasons[row_id]})  # the expectation, not the detail
            for target, patients in (here[0], here[feed + 1]) if feeds else here[:1]:
                target["failed"] += 1
                for label in labels:
                    target["expectations"][label] = target["expectations"].get(label, 0) + 1
                if isinstance(patient, str):
                    patients.add(patient)
                if isinstance(rid, str) and len(target["examples"]) < EXAMPLES_PER_EXPECTATION:
                    target["examples"].append(rid)
    for target, patients in scopes.values():
        target["patients"] = len(patients)
    return sorted((target for target, _ in scopes.values()), key=_scope_order)


def _feeds(suite: str, rows: pd.DataFrame) -> tuple[list[tuple[dict, int]], np.ndarray]:
    """The feeds of the rows with their row counts, and each row's feed (its position in that list): a hash pass per
    feed column, never a Python loop over the rows."""
    columns = _feed_values(suite, rows)
    if not columns:
        return [], np.zeros(len(rows), dtype="int64")
    code = np.zeros(len(rows), dtype="int64")
    uniques = []
    for column in columns:
        codes, found = pd.factorize(column, use_na_sentinel=False)
        code = code * len(found) + codes
        uniques.append(found)
    # Few feeds (concepts × units): count by code, then number the codes present (no sort of the rows).
    counts = np.bincount(code)
    present = np.flatnonzero(counts)
    position = np.zeros(len(counts), dtype="int64")
    position[present] = np.arange(len(present))
    feed_of = position[code]
    feeds = []
    for number, count in zip(present, counts[present]):
        values = []
        for found in reversed(uniques):  # the code back to one value per column
            number, position = divmod(int(number), len(found))
            values.append(_plain(found[position]))
        feeds.append((dict(zip(FEED_COLUMNS[suite], reversed(values))), int(count)))
    return feeds, feed_of


def _feed_values(suite: str, rows: pd.DataFrame) -> list:
    if suite == "exposures":  # the resource type: a pharmacy system's orders, a ward's administrations
        return [rows["resource_id"].str.partition("/")[0]]
    return [rows[c] for c in FEED_COLUMNS[suite]]


def _plain(value):
    """A feed value as JSON holds it: missing (None, NaN) as None."""
    return None if value is None or (isinstance(value, float) and value != value) else value


def _scope(suite: str, feed: dict | None, rows: int) -> dict:
    return {"suite": suite, "feed": feed, "rows": rows, "failed": 0, "patients": 0, "expectations": {}, "examples": []}


def merge_contract(parts) -> list[dict]:
    """One list of contract scopes from several batches' (each a list, or None): counts added, examples kept up to
    a few."""
    merged: dict[tuple, dict] = {}
    for part in parts:
        for scope in part or ():
            key = (scope["suite"], json.dumps(scope["feed"], sort_keys=True))
            total = merged.get(key)
            if total is None:
                merged[key] = {
                    **scope,
                    "expectations": dict(scope["expectations"]),
                    "examples": list(scope["examples"]),
                }
                continue
            for count in ("rows", "failed", "patients"):
                total[count] += scope[count]
            for label, n in scope["expectations"].items():
                total["expectations"][label] = total["expectations"].get(label, 0) + n
            shown = total["examples"]
            shown.extend(e for e in scope["examples"] if e not in shown and len(shown) < EXAMPLES_PER_EXPECTATION)
    return sorted(merged.values(), key=_scope_order)


def _scope_order(scope: dict) -> tuple:
    """Suites in their order, each suite's total first, then its feeds, most failing rows first."""
    order = list(ID_COLUMN)
    return (
        order.index(scope["suite"]) if scope["suite"] in order else len(order),
        scope["feed"] is not None,
        -scope["failed"],
        json.dumps(scope["feed"], sort_keys=True),
    )


def contract_breaches(scopes, settings) -> list[dict]:
    """The rule of the data contract (docs/clinical-decisions.md, "The data contract"): the scopes of a whole run
    (merge_contract) that fail systemically. A scope (a suite, or one feed of it) fails when its failing rows are
    more than `settings.max_failure_rate` of its rows, at least `settings.min_failing_rows`, and from at least
    `settings.min_failing_patients` distinct patients. None when the rate is null (never)."""
    limit = settings.max_failure_rate
    if limit is None:
        return []
    return [
        s
        for s in scopes
        if s["failed"] >= settings.min_failing_rows
        and s["patients"] >= settings.min_failing_patients
        and s["failed"] > limit * s["rows"]
    ]


def check_contract(scopes, settings) -> None:
    """Raise ValidationThresholdError when a run's scopes fail the contract (contract_breaches), naming each failing
    suite or feed, its counts, its worst expectations and a few resource ids."""
    breaches = contract_breaches(scopes, settings)
    if breaches:
        raise ValidationThresholdError(contract_message(breaches, settings))


def contract_message(breaches: list[dict], settings) -> str:
    """The failing scopes (the first few) and the contract they fail, in one line."""
    shown = "; ".join(_breach_text(b) for b in breaches[:MAX_BREACHES_SHOWN])
    more = len(breaches) - MAX_BREACHES_SHOWN
    return (
        f"{shown}{f'; and {more} more' if more > 0 else ''} (the contract: at most "
        f"{settings.max_failure_rate:.1%} of a suite's or a feed's rows failing, unless fewer than "
        f"{settings.min_failing_rows} rows or {settings.min_failing_patients} patients)"
    )


def _breach_text(scope: dict) -> str:
    worst = sorted(scope["expectations"].items(), key=lambda item: (-item[1], item[0]))[:3]
    return (
        f"{scope_name(scope)}: {scope['failed']} of {scope['rows']} rows ({scope['failed'] / scope['rows']:.1%}) "
        f"from {scope['patients']} patients fail validation: "
        + ", ".join(f"{label} {n} rows" for label, n in worst)
        + f", e.g. {', '.join(scope['examples'][:3]) or 'no id'}"
    )


def load_suite(path: Path):
    """One GX ExpectationSuite from its JSON file (the format `suite.to_json_dict()` writes)."""
    from great_expectations.core import ExpectationSuite

    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        suite = ExpectationSuite(**spec)
    except FileNotFoundError:
        raise ConfigError(f"expectation suite {path} not found (set LEUKOFHIR_EXPECTATIONS_DIR)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"expectation suite {path}: {exc}") from exc
    # GX logs and drops an expectation it cannot build; a data contract must not lose a check silently.
    if len(suite.expectations) != len(spec.get("expectations", [])):
        raise ConfigError(f"expectation suite {path}: some expectations are not valid GX 1.x configurations")
    return suite


def new_context():
    """A quiet ephemeral GX context (no INFO pages, no progress bars) holding the suites of expectations/."""
    # GX logs pages of INFO while it imports and builds a context: quiet task logs and the CLI's output before the
    # import (this module owns GX's logging; callers set none). GX pins one module of its own at INFO when it
    # imports, so that one is set again after the import.
    quiet = ("great_expectations", "great_expectations.data_context.types.base")
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    # GX takes seconds to import: only code that validates pays for it.
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.execution_engine import pandas_execution_engine
    from great_expectations.expectations import expectation as expectation_module

    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    # GX fingerprints every pandas batch by hashing all of it (twice per validate): about 3 s per million rows,
    # for a marker we never read. GX already skips it above this size; skipping it always keeps validation cheap.
    pandas_execution_engine.HASH_THRESHOLD = 0
    # GX names an expectation's type from its class name with two regular expressions each time it rebuilds the
    # expectation's configuration: about 140 times per expectation and batch, a fifth of a small batch's 0.25 s
    # (benchmarks/cds_bench.py). The name of a class never changes: remember it.
    if not hasattr(expectation_module.camel_to_snake, "cache_info"):
        expectation_module.camel_to_snake = functools.cache(expectation_module.camel_to_snake)
    context = gx.get_context(mode="ephemeral")
    # tqdm bars would flood Airflow task logs and the CLI's own progress bar.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    for name in ID_COLUMN:
        context.suites.add(load_suite(EXPECTATIONS_DIR / f"{name}.json"))
    return context


def prepare() -> None:
    """Import and set up Great Expectations now (about 2.5 s), once per process: before forking workers, say, so that
    each starts with it instead of paying for it."""
    _context()


@functools.cache
def _context():
    """One ephemeral GX context, data source and suite set per process: building them costs far more than a batch."""
    context = new_context()
    source = context.data_sources.add_pandas("leukofhir")
    suites, batches = {}, {}
    for name in ID_COLUMN:
        suites[name] = context.suites.get(name)
        batches[name] = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
    return suites, batches
