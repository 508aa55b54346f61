"""Render a run's report.json as one self-contained report.html (inline CSS and SVG, nothing from the network)."""

from __future__ import annotations

import os
from html import escape
from pathlib import Path
from typing import Any, Iterable

from leukofhir.report.svg import MAX_BARS, bar_chart, bin_per_day, trend_chart
from leukofhir.report.svg import STYLE as CHART_STYLE

__all__ = ["write_report_html", "render_report", "scope_name", "bin_per_day", "MAX_BARS"]

# Long tables are cut here; the full data stays in report.json and quarantine.ndjson.
MAX_ROWS = 50
MAX_INPUT_FILES = 20

STYLE = (
    """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
  margin:0;padding:24px 32px;color:#1d2433;background:#f6f7f9}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5d9e0;padding-bottom:4px}
.sub{color:#5a6372;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #d5d9e0;border-radius:6px;padding:10px 16px;min-width:120px}
.card .n{font-size:24px;font-weight:600;font-variant-numeric:tabular-nums}.card .l{color:#5a6372;font-size:12px}
table{border-collapse:collapse;background:#fff;border:1px solid #d5d9e0;margin:4px 0 8px}
th,td{padding:4px 10px;border-bottom:1px solid #e6e9ee;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
code,.ids{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;font-size:12px}
.ok{color:#1a7f37;font-weight:600}.bad{color:#c62828;font-weight:600}
.recon{background:#fff;border:1px solid #d5d9e0;border-left:4px solid #1a7f37;padding:8px 12px;margin:12px 0}
.recon.bad{border-left-color:#c62828}
.more,.empty{color:#5a6372;font-style:italic}.why{color:#5a6372;font-size:12px;max-width:420px}
figure.trend{background:#fff;border:1px solid #d5d9e0;border-radius:6px;margin:8px 0;padding:8px 12px;width:max-content}
figcaption{margin-bottom:4px}.legend{color:#5a6372;font-size:12px;max-width:760px}
"""
    + CHART_STYLE
)


def write_report_html(report: dict, path: str | os.PathLike) -> Path:
    """Write report.html; through a temporary file, so a reader never sees half a report."""
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(render_report(report), encoding="utf-8")
    partial.replace(target)
    return target


def render_report(report: dict) -> str:
    """The whole page as a string; every value from the report is escaped."""
    sections = [
        _header(report),
        _counts(report),
        _writes(report),
        _stages(report),
        _table("Read by resource type", ["resource type", "read"], _by_count(report.get("read"))),
        _table("Skipped, by reason", ["reason", "resources"], _by_count(report.get("skipped"))),
        _quarantine(report),
        _expectations(report.get("expectations") or []),
        _contract(report),
        _flags(report.get("flags") or {}),
        _trends(report),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>leukofhir run report</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(s for s in sections if s)
        + "\n</body></html>\n"
    )


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _n(value: Any) -> str:
    """A count with thousands separators; anything else shown as given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e("—" if value is None else value)
    return f"{value:,}" if isinstance(value, int) or float(value).is_integer() else f"{value:,.2f}"


def _ids(ids: list | None) -> str:
    """A few example resource ids (ids only: the report carries no patient data)."""
    return '<span class="ids">' + ", ".join(_e(i) for i in (ids or [])[:5]) + "</span>"


def _total(counts: Any) -> int:
    if isinstance(counts, dict):
        return sum(v for v in counts.values() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return counts if isinstance(counts, int) else 0


def _by_count(counts: Any) -> list[list[str]]:
    if not isinstance(counts, dict):
        return []
    items = sorted(counts.items(), key=lambda kv: (-_total(kv[1]), str(kv[0])))
    return [[_e(k), _n(v)] for k, v in items]


def _header(report: dict) -> str:
    window = report.get("window")
    sweep = report.get("sweep")
    if window:
        field = window.get("field") or "lastUpdated"
        source = (
            f"Window <b>{_e(window.get('since', '—'))}</b> to <b>{_e(window.get('until', '—'))}</b> (by {_e(field)})"
        )
    elif sweep:
        source = ""  # the sweep alone: said below
    else:
        files = [str(f) for f in report.get("inputs") or []]
        shown = "".join(f"<li><code>{_e(f)}</code></li>" for f in files[:MAX_INPUT_FILES])
        more = len(files) - MAX_INPUT_FILES
        if more > 0:
            shown += f'<li class="more">and {more:,} more files</li>'
        source = f"Input files ({len(files):,}):<ul>{shown}</ul>" if files else "Input: none recorded"
    as_of = report.get("as_of")
    return (
        "<h1>leukofhir run report</h1>"
        f'<p class="sub">{"As of <b>" + _e(as_of) + "</b>. " if as_of else ""}{source}{_sweep(sweep)}</p>'
        + _failure(report)
    )


def _sweep(sweep: Any) -> str:
    """The daily lapse sweep's part of a run (leukofhir.extract.sweep): the patients it added to the run."""
    if not isinstance(sweep, dict):
        return ""
    return (
        f' Lapse sweep: <b id="sweep-added">{_n(sweep.get("added", 0))}</b> patients added '
        f"({_n(sweep.get('candidates', 0))} whose active Flags may have lapsed, of "
        f"{_n(sweep.get('flags_read', 0))} active Flags read)."
    )


def _failure(report: dict) -> str:
    """A run that stopped before the end: why, and what it had not written (re-running it is safe)."""
    if report.get("status") != "failed":
        return ""
    return (
        '<div class="recon bad" id="failure"><span class="bad">This run stopped before the end</span>: '
        f'<span id="error">{_e(report.get("error") or "no reason recorded")}</span>. The Flag counts below are what '
        f"it wrote before it stopped; {_n(report.get('patients_not_written', 0))} patients were not written "
        f"({_n(report.get('chunks_written', 0))} of {_n(report.get('chunks', 0))} batches done). Running it again is "
        "safe: every write names the version it was decided from, and a re-run writes only what is still missing.</div>"
    )


def _counts(report: dict) -> str:
    read = report.get("read_total", _total(report.get("read")))
    evaluated = report.get("evaluated", 0)
    skipped = _total(report.get("skipped"))
    quarantined = _total(report.get("quarantined"))
    cards = [
        ("read", read),
        ("evaluated", evaluated),
        ("skipped", skipped),
        ("quarantined", quarantined),
        ("read errors", report.get("read_errors", 0)),
        ("Flags", (report.get("flags") or {}).get("total", 0)),
    ]
    html = ['<h2>Counts</h2><div class="cards">']
    html += [
        f'<div class="card" id="count-{_e(label.replace(" ", "-"))}"><div class="n">{_n(value)}</div>'
        f'<div class="l">{_e(label)}</div></div>'
        for label, value in cards
    ]
    html.append("</div>")
    # Nothing read may vanish: the report says so plainly when the sum does not hold.
    balanced = read == evaluated + skipped + quarantined
    verdict = '<span class="ok">reconciles</span>' if balanced else '<span class="bad">does NOT reconcile</span>'
    html.append(
        f'<div class="recon{"" if balanced else " bad"}" id="reconciliation">read {_n(read)} = '
        f"evaluated {_n(evaluated)} + skipped {_n(skipped)} + quarantined {_n(quarantined)}: {verdict}"
        + ("" if balanced else f" (difference {_n(read - evaluated - skipped - quarantined)})")
        + "</div>"
    )
    return "".join(html)


_WRITE_LABELS = [
    ("create", "created"),
    ("update", "updated"),
    ("withdraw", "withdrawn"),
    ("unchanged", "unchanged"),
    ("refused", "refused by the server"),
    ("delete", "duplicates deleted"),
    ("not_created", "withdrawn before ever written (not created)"),
    ("conflict", "not written: changed by another writer through every re-evaluation"),
    ("reevaluated", "patients read and evaluated again (their Flag had changed since it was read)"),
    ("alert_create", "critical results: CommunicationRequests created"),
    ("alert_revoke", "critical results: CommunicationRequests revoked (Flag withdrawn)"),
    ("alert_refused", "critical results: batches whose CommunicationRequests the server refused (tried again)"),
]


def _writes(report: dict) -> str:
    """What a run against a server did to its Flags (absent from offline `evaluate` reports)."""
    writes = report.get("writes")
    if not isinstance(writes, dict):
        return ""
    dry = bool(report.get("dry_run"))
    title = "Flags on the server (dry run: nothing was written)" if dry else "Flags on the server"
    intro = (
        f'<p>Patients touched: <b id="patients-touched">{_n(report.get("patients_touched", 0))}</b>'
        f"{' &middot; server <code>' + _e(report['server']) + '</code>' if report.get('server') else ''}</p>"
    )
    rows = [
        [
            _e(("would be " if dry and key in ("create", "update", "withdraw", "delete") else "") + label),
            f'<span id="writes-{key}">{_n(writes.get(key, 0))}</span>',
        ]
        for key, label in _WRITE_LABELS
        if key in writes
    ]
    return _table(title, ["Flags", "count"], rows).replace("<table>", intro + "<table>", 1)


def _stages(report: dict) -> str:
    stages = report.get("stages")
    if not isinstance(stages, dict) or not stages:
        return ""
    # A stage may give its count per resource type; the detail column appears only then.
    detailed = any(isinstance(v, dict) for v in stages.values())
    rows = []
    for name, value in stages.items():
        row = [_e(name), _n(_total(value) if isinstance(value, dict) else value)]
        if detailed:
            row.append(", ".join(f"{_e(k)} {_n(v)}" for k, v in value.items()) if isinstance(value, dict) else "")
        rows.append(row)
    header = ["stage", "rows", "detail"] if detailed else ["stage", "rows"]
    return _table("Counts per stage", header, rows, numeric=(1,))


def _quarantine(report: dict) -> str:
    counts = report.get("quarantined") or {}
    examples = report.get("quarantine_examples") or {}
    rows = [
        [_e(reason), _n(n), _ids(examples.get(reason))]
        for reason, n in sorted(counts.items(), key=lambda kv: (-_total(kv[1]), str(kv[0])))
    ]
    return _table("Quarantine reasons (example resource ids)", ["reason", "resources", "examples"], rows)


def _expectations(results: list[dict]) -> str:
    rows = []
    for r in results:
        ok = r.get("success")
        rows.append(
            [
                _e(r.get("suite", "")),
                f"<code>{_e(r.get('name', ''))}</code>"
                + (f'<div class="why">{_e(r["why"])}</div>' if r.get("why") else ""),
                f"<code>{_e(r.get('column', ''))}</code>",
                '<span class="ok">passed</span>' if ok else '<span class="bad">failed</span>',
                _n(r.get("unexpected_count", 0)),
                _n(r.get("element_count", 0)),
                _ids(r.get("examples")),
            ]
        )
    return _table(
        "Data contract (Great Expectations)",
        ["suite", "expectation", "column", "result", "failing rows", "rows checked", "examples"],
        rows,
        numeric=(4, 5),
        limit=None,
    )


def scope_name(scope: dict) -> str:
    """`observations`, `observations feed wbc in 'furlong'`, `exposures feed MedicationRequest`."""
    feed = scope["feed"]
    if not feed:
        return scope["suite"]
    if scope["suite"] == "observations":
        unit = feed.get("unit")
        return f"observations feed {feed.get('concept')} in {'no unit' if unit is None else repr(unit)}"
    return f"{scope['suite']} feed {', '.join(str(v) for v in feed.values())}"


def _contract(report: dict) -> str:
    """The data contract by suite and feed (the counts it is judged on), and its verdict on an online run."""
    verdict = report.get("contract_verdict")
    said = ""
    if verdict:
        said = (
            '<p>Judged on the whole run: <span class="ok">passed</span></p>'
            if verdict.get("passed")
            else f'<p>Judged on the whole run: <span class="bad">failed</span>, nothing written. '
            f"{_e(verdict.get('message'))}</p>"
        )
    rows = [
        [
            _e(scope_name(s)),
            _n(s["failed"]),
            _n(s["rows"]),
            f"{s['failed'] / s['rows']:.1%}",
            _n(s["patients"]),
            _ids(s.get("examples")),
        ]
        for s in report.get("contract") or []
        if s.get("failed")
    ]
    return (
        "<h2>Data contract by suite and feed</h2>"
        + said
        + _table(
            None,
            ["suite or feed", "failing rows", "rows", "share", "patients", "examples"],
            rows,
            numeric=(1, 2, 3, 4),
            empty="No failing rows.",
        )
    )


def _flags(flags: dict) -> str:
    html = [f'<h2>Flags</h2><p>Total Flags: <b id="flags-total">{_n(flags.get("total", 0))}</b></p>']
    by_code_status = flags.get("by_code_status") or {}
    statuses = sorted({key.rsplit("|", 1)[-1] for key in by_code_status} | set(flags.get("by_status") or {}))
    conditions = sorted(
        {key.rsplit("|", 1)[0] for key in by_code_status} | set(flags.get("by_code") or {}),
        key=lambda c: (-_total((flags.get("by_code") or {}).get(c, 0)), c),
    )
    rows = []
    for condition in conditions:
        cells = [_n(by_code_status.get(f"{condition}|{status}", 0)) for status in statuses]
        rows.append([_e(condition), *cells, _n((flags.get("by_code") or {}).get(condition, 0))])
    if rows:
        totals = [_n((flags.get("by_status") or {}).get(s, 0)) for s in statuses]
        rows.append(["<b>all conditions</b>", *totals, _n(flags.get("total", 0))])
    numeric = tuple(range(1, len(statuses) + 2))
    html.append(_table(None, ["condition", *statuses, "total"], rows, numeric=numeric, empty="No Flags."))
    html.append(_chart(flags.get("per_day") or {}))
    return "".join(html)


def _table(
    title: str | None,
    header: list[str],
    rows: list[list[str]],
    numeric: Iterable[int] = (1,),
    limit: int | None = MAX_ROWS,
    empty: str = "None.",
) -> str:
    """A table of already-escaped cells; header cells are escaped here."""
    numeric = set(numeric)
    heading = f"<h2>{_e(title)}</h2>" if title else ""
    if not rows:
        return f'{heading}<p class="empty">{_e(empty)}</p>'
    shown = rows if limit is None else rows[:limit]
    th = "".join(f"<th{' class=num' if i in numeric else ''}>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in shown
    )
    more = ""
    if len(rows) > len(shown):
        more = f'<p class="more">and {len(rows) - len(shown):,} more rows in report.json</p>'
    return f"{heading}<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>{more}"


def _chart(per_day: dict[str, int]) -> str:
    unit, bars = bin_per_day(per_day)
    if not bars:
        return '<h2>Flags per day</h2><p class="empty">No Flags with a date.</p>'
    title = f"Flags per {unit}, by the start of their episode"
    return f"<h2>Flags per {unit}</h2>" + bar_chart(bars, title, "flags-chart")


def _trends(report: dict) -> str:
    """A picture per Flag (capped, leukofhir.evaluate.trends): the values it rests on, its thresholds, its episode, its
    drugs. Named by the Flag's identifier only, as the rest of the report names resources by id."""
    trends = report.get("trends")
    if trends is None:
        return ""
    total = report.get("trends_total", len(trends))
    html = ["<h2>Evidence per Flag</h2>"]
    if not trends:
        return html[0] + '<p class="empty">No Flags to picture.</p>'
    html.append(
        '<p class="legend">Filled triangles: low values; open circles: values at or above the threshold; '
        "hatched band: the episode; solid line: the threshold (LLN); dashed lines: CTCAE v5.0 grade "
        "boundaries; bars below: exposure to an associated drug.</p>"
    )
    if total > len(trends):
        html.append(
            f'<p class="more">{len(trends):,} of {total:,} Flags pictured: active ones first, the worst grade, '
            "the latest episode; every Flag is in Flag.ndjson.</p>"
        )
    for i, trend in enumerate(trends, 1):
        period = f"{_e(trend['start'][:10])} – {_e((trend.get('end') or 'open')[:10])}"
        html.append(
            f'<figure class="trend" id="trend-{_e(trend["flag"])}"><figcaption><b>{_e(trend["condition"])}</b>, '
            f"grade {_e(trend['grade'])}, {_e(trend['status'])}, {period} &middot; Flag <code>{_e(trend['flag'])}"
            f"</code></figcaption>" + trend_chart(trend, f"trend-chart-{i}") + "</figure>"
        )
    return "".join(html)
