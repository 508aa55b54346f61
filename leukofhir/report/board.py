"""The hospital-wide board (`leukofhir board`): the project's Flags on the server, read page by page, as board.html."""

from __future__ import annotations

import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from html import escape
from pathlib import Path
from typing import Any, Iterable

from leukofhir.config import Rules, load_config
from leukofhir.errors import OutputError, UsageError
from leukofhir.extract.search import (
    PAGE_SIZE,
    local_patient_id,
    parse_instant,
    patient_batches,
    project_flag_tag,
    subject_of,
)
from leukofhir.fhir.client import FhirClient
from leukofhir.fhir.references import DETAIL_URL
from leukofhir.report.svg import STYLE as CHART_STYLE
from leukofhir.report.svg import bar_chart

__all__ = ["Board", "read_board", "render_board", "write_board", "board_command", "STATUSES", "WEEKS"]

log = logging.getLogger(__name__)

STATUSES = ("active", "inactive", "entered-in-error")
_STATUS_LABEL = {"active": "active", "inactive": "inactive", "entered-in-error": "withdrawn"}
GRADES = (1, 2, 3, 4)
WEEKS = 53  # the chart: this week and the 52 before it
# The table lists this many active Flags (the worst grade first, then the latest); the counts above it cover all.
MAX_TABLE_ROWS = 1000
_GRADE_SUFFIX = "/StructureDefinition/ctcae-grade"
# Only what the board shows is read: a hospital's Flags are many.
_ELEMENTS = "status,code,subject,period,extension"
# Patients whose names are looked up per search (`_id=a,b,…`), when the site shows names.
NAME_BATCH = 200


@dataclass
class Board:
    """The counts of the board: every project Flag read counted once by status; the active ones by condition and
    grade and by drug class; the new ones (their episode began) in the last 24 h, 7 days and per week for a year."""

    as_of: datetime
    server: str = ""
    total: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_condition_status: Counter = field(default_factory=Counter)  # (condition, status)
    active: Counter = field(default_factory=Counter)  # (condition, grade)
    drug_classes: Counter = field(default_factory=Counter)  # active drug-associated Flags by drug class
    new_24h: int = 0
    new_7d: int = 0
    per_week: Counter = field(default_factory=Counter)  # Monday of the week -> Flags whose episode began in it
    rows: list[tuple] = field(default_factory=list)  # active Flags: (grade, since, patient, condition, count, drugs)
    unreadable: int = 0  # Flags without a readable period.start: counted by status, never as new
    names: dict[str, str] | None = None  # patient id -> name, only when the site shows names (`--names`)

    def add(self, flag: dict, base_url: str) -> None:
        status = flag.get("status") if flag.get("status") in STATUSES else "entered-in-error"
        condition = _condition(flag)
        self.total += 1
        self.by_status[status] += 1
        self.by_condition_status[condition, status] += 1
        start = _start(flag)
        if start is None:
            self.unreadable += 1
        elif status != "entered-in-error" and start <= self.as_of:
            # New = the episode began then (period.start), whenever the Flag was written: a backfill's old episodes
            # are not news (docs/board.md).
            age = self.as_of - start
            self.new_24h += age <= timedelta(hours=24)
            self.new_7d += age <= timedelta(days=7)
            week = start.date() - timedelta(days=start.weekday())
            if week >= _first_week(self.as_of):
                self.per_week[week] += 1
        if status != "active":
            return
        grade = _grade(flag)
        self.active[condition, grade] += 1
        drugs = _drug_classes(flag)
        for drug in drugs:
            self.drug_classes[drug] += 1
        patient = local_patient_id(subject_of(flag), base_url) or str(subject_of(flag) or "")
        self.rows.append(
            (grade, start.isoformat() if start else "", patient, condition, _decisive(flag), ", ".join(drugs))
        )
        if len(self.rows) > 2 * MAX_TABLE_ROWS:  # kept bounded while reading
            self._trim()

    def _trim(self) -> None:
        self.rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
        del self.rows[MAX_TABLE_ROWS:]

    def weeks(self) -> list[tuple[str, int]]:
        first = _first_week(self.as_of)
        return [
            (f"week of {first + timedelta(weeks=i):%Y-%m-%d}", self.per_week.get(first + timedelta(weeks=i), 0))
            for i in range(WEEKS)
        ]


def _first_week(as_of: datetime) -> date:
    monday = as_of.date() - timedelta(days=as_of.weekday())
    return monday - timedelta(weeks=WEEKS - 1)


def _condition(flag: dict) -> str:
    code = flag.get("code") if isinstance(flag.get("code"), dict) else {}
    for coding in code.get("coding") or []:
        if isinstance(coding, dict) and coding.get("display"):
            return str(coding["display"])
    return "unknown condition"


def _grade(flag: dict) -> int:
    for ext in flag.get("extension") or []:
        if isinstance(ext, dict) and str(ext.get("url", "")).endswith(_GRADE_SUFFIX):
            value = ext.get("valueInteger")
            if isinstance(value, int) and value in GRADES:
                return value
    return 0


def _drug_classes(flag: dict) -> list[str]:
    """The drug classes a Flag is associated with: its medication evidence's labels ("clozapine", "antineoplastic
    chemotherapy (oxaliplatin)" -> "antineoplastic chemotherapy"), each once."""
    out: list[str] = []
    for ext in flag.get("extension") or []:
        if not isinstance(ext, dict) or ext.get("url") != DETAIL_URL:
            continue
        label = (ext.get("valueReference") or {}).get("display")
        if isinstance(label, str) and label:
            drug = label.split(" (", 1)[0]
            if drug not in out:
                out.append(drug)
    return out


def _start(flag: dict) -> datetime | None:
    period = flag.get("period") if isinstance(flag.get("period"), dict) else {}
    try:
        return parse_instant(period["start"])
    except (KeyError, TypeError, UsageError):
        return None


def _decisive(flag: dict) -> str:
    """The decisive count the Flag's text quotes ("ANC 0.9 ×10^9/L on 2011-03-04"), or nothing."""
    text = (flag.get("code") or {}).get("text")
    match = re.search(r" — (.+?), CTCAE", text) if isinstance(text, str) else None
    return match.group(1) if match else ""


def read_board(client: FhirClient, rules: Rules, as_of: datetime | None = None, *, names: bool = False) -> Board:
    """Every project Flag on the server (`Flag?_tag=…`, page by page: only the counts and the active Flags' rows are
    kept), counted as of `as_of` (default now); with `names`, the table's patients' names too (a site's choice: the
    page then holds patient data)."""
    board = Board(as_of=(as_of or datetime.now(timezone.utc)).astimezone(timezone.utc), server=client.base_url)
    params = {"_tag": project_flag_tag(rules), "_elements": _ELEMENTS, "_count": PAGE_SIZE}
    for bundle in client.search_pages("Flag", params):
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == "Flag":
                board.add(resource, client.base_url)
    board._trim()
    if names:
        board.names = _names(client, sorted({row[2] for row in board.rows}))
    log.info("board: %d project Flags read, %d active", board.total, board.by_status["active"])
    return board


def _names(client: FhirClient, patients: list[str]) -> dict[str, str]:
    """The patients' names (`Patient?_id=…&_elements=name`, in batches: never one request per patient)."""
    found: dict[str, str] = {}
    for batch in patient_batches(patients, NAME_BATCH):
        params = {"_id": ",".join(batch), "_elements": "name", "_count": len(batch)}
        for resource in client.search("Patient", params):
            if resource.get("resourceType") == "Patient" and resource.get("id") in batch:
                found[resource["id"]] = _name(resource.get("name"))
    return found


def _name(names) -> str:
    """The official (else usual, else first) HumanName as its text, or its given names and family."""
    names = [n for n in names if isinstance(n, dict)] if isinstance(names, list) else []
    chosen = next((n for use in ("official", "usual") for n in names if n.get("use") == use), names[0] if names else {})
    if isinstance(chosen.get("text"), str):
        return chosen["text"]
    given = [g for g in chosen.get("given") or [] if isinstance(g, str)]
    family = chosen.get("family") if isinstance(chosen.get("family"), str) else ""
    return " ".join([*given, family]).strip()


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
  margin:0;padding:24px 32px;color:#1d2433;background:#f6f7f9}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5d9e0;padding-bottom:4px}
.sub{color:#5a6372;margin:0 0 16px}.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #d5d9e0;border-radius:6px;padding:10px 16px;min-width:120px}
.card .n{font-size:24px;font-weight:600;font-variant-numeric:tabular-nums}.card .l{color:#5a6372;font-size:12px}
table{border-collapse:collapse;background:#fff;border:1px solid #d5d9e0;margin:4px 0 8px}
th,td{padding:4px 10px;border-bottom:1px solid #e6e9ee;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.date{white-space:nowrap}
th button{font:inherit;font-weight:600;background:none;border:0;padding:0;cursor:pointer}
code,.ids{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;font-size:12px}
.more,.empty{color:#5a6372;font-style:italic}
"""

# Sorting the patients' table in place: no library, nothing from the network.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th button").forEach(function (button, column) {
    button.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var th = button.parentNode, down = th.getAttribute("aria-sort") !== "descending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", down ? "descending" : "ascending");
      rows.sort(function (a, b) {
        var x = a.cells[column].getAttribute("data-sort") || a.cells[column].textContent;
        var y = b.cells[column].getAttribute("data-sort") || b.cells[column].textContent;
        var c = (isNaN(x) || isNaN(y)) ? x.localeCompare(y) : x - y;
        return down ? -c : c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _card(key: str, label: str, value: int) -> str:
    return f'<div class="card"><div class="n" id="{key}">{value:,}</div><div class="l">{_e(label)}</div></div>'


def _table(header: Iterable[str], rows: list[str], numeric_from: int = 1, css: str = "") -> str:
    th = "".join(f'<th{" class=num" if i >= numeric_from else ""} scope="col">{h}</th>' for i, h in enumerate(header))
    return f"<table{css}><thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_board(board: Board) -> str:
    """The whole page as a string; every value read from the server is escaped."""
    conditions = sorted({c for c, _ in board.by_condition_status})
    parts = [
        "<h1>leukofhir board</h1>",
        f'<p class="sub">The project\'s Flags on <code>{_e(board.server)}</code> as of '
        f"<b>{board.as_of:%Y-%m-%d %H:%M} UTC</b>. "
        + ("Patients by id and name.</p>" if board.names is not None else "Patients by id only.</p>"),
        '<div class="cards">',
        _card("count-active", "active Flags", board.by_status["active"]),
        _card("new-24h", "new in the last 24 h", board.new_24h),
        _card("new-7d", "new in the last 7 days", board.new_7d),
        _card("count-total", "project Flags on the server", board.total),
        "</div>",
        "<h2>Active Flags by condition and CTCAE v5.0 grade</h2>",
    ]
    active_conditions = sorted({c for c, _ in board.active})
    if active_conditions:
        rows = []
        for c in active_conditions:
            cells = "".join(f'<td class="num" id="active-{_slug(c)}-g{g}">{board.active[c, g]:,}</td>' for g in GRADES)
            rows.append(
                f'<tr><th scope="row">{_e(c)}</th>{cells}'
                f'<td class="num" id="active-{_slug(c)}">{sum(board.active[c, g] for g in GRADES):,}</td></tr>'
            )
        parts.append(_table(["condition", *(f"grade {g}" for g in GRADES), "all"], rows))
    else:
        parts.append('<p class="empty">No active Flags.</p>')
    parts.append("<h2>All project Flags by condition and status</h2>")
    if conditions:
        rows = []
        for c in conditions:
            cells = "".join(
                f'<td class="num" id="flags-{_slug(c)}-{_slug(_STATUS_LABEL[s])}">'
                f"{board.by_condition_status[c, s]:,}</td>"
                for s in STATUSES
            )
            rows.append(f'<tr><th scope="row">{_e(c)}</th>{cells}</tr>')
        totals = "".join(
            f'<td class="num" id="count-{_slug(_STATUS_LABEL[s])}">{board.by_status[s]:,}</td>' for s in STATUSES
        )
        rows.append(f'<tr><th scope="row">all conditions</th>{totals}</tr>')
        parts.append(_table(["condition", *(_STATUS_LABEL[s] for s in STATUSES)], rows))
    else:
        parts.append('<p class="empty">No project Flags on the server.</p>')
    parts.append("<h2>Active drug-associated Flags by drug class</h2>")
    if board.drug_classes:
        rows = [
            f'<tr><th scope="row">{_e(d)}</th><td class="num" id="drug-{_slug(d)}">{n:,}</td></tr>'
            for d, n in sorted(board.drug_classes.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        parts.append(_table(["drug class", "active Flags"], rows))
    else:
        parts.append('<p class="empty">No active drug-associated Flags.</p>')
    weeks = board.weeks()
    parts.append(
        f'<h2>New Flags per week, last year</h2><p class="sub">By the week their episode began; '
        f'<span id="new-year">{sum(n for _, n in weeks):,}</span> in all.</p>'
    )
    parts.append(bar_chart(weeks, "New Flags per week over the last year, by the start of their episode", "weekly"))
    parts.append("<h2>Patients with an active Flag</h2>")
    if board.rows:
        names = board.names
        rows = [
            f'<tr><td class="ids">{_e(patient)}</td>'
            + (f"<td>{_e(names.get(patient, ''))}</td>" if names is not None else "")
            + f"<td>{_e(condition)}</td>"
            f'<td class="num" data-sort="{grade}">{grade or "—"}</td>'
            f'<td class="date" data-sort="{_e(since)}">{_e(since[:10])}</td>'
            f"<td>{_e(count)}</td><td>{_e(drugs)}</td></tr>"
            for grade, since, patient, condition, count, drugs in board.rows
        ]
        header = [
            f'<button type="button">{h}</button>'
            for h in (
                "patient",
                *(("name",) if names is not None else ()),
                "condition",
                "grade",
                "since",
                "decisive count",
                "drug class",
            )
        ]
        parts.append(_table(header, rows, numeric_from=99, css=' class="sortable" id="patients"'))
        if board.by_status["active"] > len(board.rows):
            parts.append(
                f'<p class="more">The first {len(board.rows):,} of {board.by_status["active"]:,} active '
                "Flags: the worst grade first, then the latest.</p>"
            )
    else:
        parts.append('<p class="empty">No active Flags.</p>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>leukofhir board</title><style>{STYLE}{CHART_STYLE}</style></head>\n<body>\n"
        + "\n".join(parts)
        + f"\n<script>{SCRIPT}</script>\n</body></html>\n"
    )


def write_board(board: Board, out_dir: str | Path) -> Path:
    """DIR/board.html, through a temporary file: a reader (a web server serving the folder) never sees half a page."""
    out = Path(out_dir)
    target = out / "board.html"
    partial = out / "board.html.partial"
    try:
        out.mkdir(parents=True, exist_ok=True)
        partial.write_text(render_board(board), encoding="utf-8")
        partial.replace(target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def board_command(args) -> int:
    """`leukofhir board`: read the project's Flags, write DIR/board.html, print a one-line summary."""
    from leukofhir.fhir.client import connect

    rules = load_config(args.config)
    as_of = parse_instant(args.as_of, "--as-of") if args.as_of else None
    with connect(args.fhir_url, args.auth, timeout=args.timeout) as client:
        board = read_board(client, rules, as_of, names=args.names)
    path = write_board(board, args.out)
    print(f"{board.total} project Flags read, {board.by_status['active']} active: {path}", file=sys.stderr)
    return 0
