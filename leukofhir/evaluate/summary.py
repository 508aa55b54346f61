"""The run report of an online run: per-batch evaluation reports merged into one, with the write counts added."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from leukofhir.evaluate.trends import merge_trends
from leukofhir.evaluate.validate import merge_contract

__all__ = ["merge_reports", "WRITE_ACTIONS"]

EXAMPLES = 5
# What became of each Flag decided (`conflict`: its version kept moving, write.flags.VERSION_ROUNDS), and `reevaluated`:
# the patients read and decided again because a version had moved; `alert_*`: the critical results'
# CommunicationRequests (leukofhir/write/alerts.py).
WRITE_ACTIONS = (
    "create",
    "update",
    "withdraw",
    "delete",
    "unchanged",
    "not_created",
    "refused",
    "conflict",
    "reevaluated",
    "alert_create",
    "alert_revoke",
    "alert_refused",
)
# Keys of a batch's report.json that are sums (nested dicts of counts are summed key by key).
_SUMMED = (
    "read",
    "read_total",
    "evaluated",
    "skipped",
    "quarantined",
    "read_errors",
    "stages",
    "flags",
    "flags_rejected",
    "flags_held",
    "trends_total",
)


def _add(total: dict, part: dict) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            _add(total.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value


def _sorted(node):
    return {k: _sorted(v) for k, v in sorted(node.items())} if isinstance(node, dict) else node


def _merge_expectations(merged: dict, results: Iterable[dict]) -> None:
    for result in results:
        key = (result["suite"], result["name"], result["column"])
        total = merged.get(key)
        if total is None:
            merged[key] = {**result, "examples": list(result.get("examples") or [])}
            continue
        total["success"] = total["success"] and result["success"]
        total["unexpected_count"] += result["unexpected_count"]
        total["element_count"] += result["element_count"]
        for example in result.get("examples") or []:
            if len(total["examples"]) < EXAMPLES and example not in total["examples"]:
                total["examples"].append(example)


def merge_reports(batch_reports: Iterable[dict]) -> dict:
    """One report from the batches' reports: counts summed, examples, expectation results and the data contract's
    counts merged."""
    summed: dict = {}
    contracts: list = []
    examples: dict[str, list[str]] = {}
    expectations: dict = {}
    reconciled = True
    batches = 0
    trends: list = []
    for report in batch_reports:
        batches += 1
        trends = merge_trends([trends, report.get("trends")])  # capped as it goes: never every batch's at once
        _add(summed, {k: report[k] for k in _SUMMED if k in report})
        for reason, ids in (report.get("quarantine_examples") or {}).items():
            shown = examples.setdefault(reason, [])
            shown.extend(i for i in ids if i not in shown and len(shown) < EXAMPLES)
        _merge_expectations(expectations, report.get("expectations") or [])
        contracts.append(report.get("contract"))
        reconciled = reconciled and bool(report.get("reconciled", True))
    merged = {
        k: _sorted(summed.get(k, {} if k in ("read", "skipped", "quarantined", "stages") else 0))
        for k in _SUMMED
        if k != "flags"
    }
    flags = summed.get("flags") or {}
    merged["flags"] = {
        "total": flags.get("total", 0),
        **{k: _sorted(flags.get(k, {})) for k in ("by_code", "by_status", "by_code_status", "per_day")},
    }
    merged["quarantine_examples"] = _sorted(examples)
    merged["expectations"] = list(expectations.values())
    merged["contract"] = merge_contract(contracts)
    merged["reconciled"] = reconciled and merged["read_total"] == (
        merged["evaluated"] + sum(merged["skipped"].values()) + sum(merged["quarantined"].values())
    )
    merged["batches"] = batches
    merged["trends"] = trends
    return merged


def write_counts(parts: Iterable[dict]) -> dict:
    """The write counts of a run: the sum of each batch's, every action present."""
    total: Counter = Counter()
    for part in parts:
        total.update({k: v for k, v in part.items() if k in WRITE_ACTIONS})
    return {action: total.get(action, 0) for action in WRITE_ACTIONS}
