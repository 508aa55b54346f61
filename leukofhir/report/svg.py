"""Inline SVG charts for report.html and board.html: counts over time, and one Flag's values against its thresholds."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from html import escape
from typing import Any

__all__ = ["bin_per_day", "bar_chart", "trend_chart", "MAX_BARS"]

MAX_BARS = 90

STYLE = """
svg text{font-size:11px;fill:#5a6372}svg .bar{fill:#3b6fb6}
svg .series{fill:none;stroke:#1d2433;stroke-width:1.2}svg .low{fill:#c62828;stroke:#c62828}
svg .normal{fill:#fff;stroke:#1d2433;stroke-width:1.2}svg .lln{stroke:#1d2433;stroke-width:1.2}
svg .grade{stroke:#8a93a3;stroke-dasharray:5 3}svg .episode-edge{stroke:#b26a00;stroke-width:1}
svg .drug{fill:#6b4fa3}svg .axis{stroke:#8a93a3}
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def bin_per_day(per_day: dict[str, int], max_bars: int = MAX_BARS) -> tuple[str, list[tuple[str, int]]]:
    """Counts per day grouped into days, ISO weeks, months or years: the finest that fits in `max_bars` bars.

    Empty periods are kept, so the bars sit on a true time axis."""
    days: dict[date, int] = {}
    for key, n in per_day.items():
        try:
            day = date.fromisoformat(str(key)[:10])
            days[day] = days.get(day, 0) + int(n)
        except (TypeError, ValueError):
            continue  # a malformed key is not worth failing the page for
    if not days:
        return "day", []
    first, last = min(days), max(days)
    starts = {
        "day": lambda d: d,
        "week": lambda d: d - timedelta(days=d.weekday()),
        "month": lambda d: d.replace(day=1),
        "year": lambda d: d.replace(month=1, day=1),
    }
    for unit, start_of in starts.items():
        if _period_count(start_of(first), last, unit) <= max_bars or unit == "year":
            break
    totals = dict.fromkeys(_periods(start_of(first), last, unit), 0)
    for d, n in days.items():
        totals[start_of(d)] += n
    labels = {"day": "%Y-%m-%d", "week": "week of %Y-%m-%d", "month": "%Y-%m", "year": "%Y"}
    return unit, [(p.strftime(labels[unit]), n) for p, n in totals.items()]


def _period_count(start: date, last: date, unit: str) -> int:
    if unit == "day":
        return (last - start).days + 1
    if unit == "week":
        return (last - start).days // 7 + 1
    if unit == "month":
        return (last.year - start.year) * 12 + last.month - start.month + 1
    return last.year - start.year + 1


def _periods(start: date, last: date, unit: str) -> list[date]:
    out, current = [], start
    while current <= last:
        out.append(current)
        if unit == "day":
            current += timedelta(days=1)
        elif unit == "week":
            current += timedelta(days=7)
        elif unit == "month":
            current = date(current.year + current.month // 12, current.month % 12 + 1, 1)
        else:
            current = date(current.year + 1, 1, 1)
    return out


def _labelled(ident: str, title: str, desc: str, width: int, height: int, extra: str = "") -> str:
    """The opening of an accessible chart: role img, named by its <title> and described by its <desc>; `ident` must be
    unique in the page (the ids of its title, description and pattern start with it)."""
    return (
        f'<svg role="img" aria-labelledby="{ident}-title {ident}-desc" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"{extra}><title id="{ident}-title">{_e(title)}</title>'
        f'<desc id="{ident}-desc">{_e(desc)}</desc>'
    )


def bar_chart(bars: list[tuple[str, int]], title: str, ident: str = "bars", width: int = 760, height: int = 220) -> str:
    """Bars of counts per period, on a true time axis (empty periods kept); each bar's <title> gives its count."""
    left, bottom, top = 44, 34, 12
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max((n for _, n in bars), default=0) or 1
    step = plot_w / max(len(bars), 1)
    total = sum(n for _, n in bars)
    desc = (
        f"{len(bars)} bars from {bars[0][0]} to {bars[-1][0]}; {total:,} in all, at most {peak:,} in one."
        if bars
        else "No data."
    )
    opening = _labelled(ident, title, desc, width, height, ' class="bars"')
    parts = [
        opening,
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - 8}" y2="{top + plot_h}"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{peak:,}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    for i, (label, n) in enumerate(bars):
        h = plot_h * n / peak
        x = left + i * step
        parts.append(
            f'<rect class="bar" x="{x + step * 0.1:.1f}" y="{top + plot_h - h:.1f}" width="{max(step * 0.8, 1):.1f}" '
            f'height="{h:.1f}" data-count="{n}"><title>{_e(label)}: {n:,}</title></rect>'
        )
    # A few axis labels: first, middle and last period, so long ranges stay legible.
    for i in sorted({0, len(bars) // 2, len(bars) - 1}) if bars else ():
        anchor = "start" if i == 0 else "end" if i == len(bars) - 1 else "middle"
        x = left + i * step + (0 if anchor == "start" else step if anchor == "end" else step / 2)
        parts.append(f'<text x="{x:.1f}" y="{height - 12}" text-anchor="{anchor}">{_e(bars[i][0])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _moment(text: str | None) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def trend_chart(trend: dict, ident: str, width: int = 680) -> str:
    """One Flag's values over its episode and around it (leukofhir.evaluate.trends): the rule's threshold and the CTCAE
    grade boundaries as labelled lines (solid, dashed), low values as filled triangles and the others as open circles,
    the episode's period hatched between two edges, each drug exposure as a labelled bar below. Shapes, dashes and
    labels carry the meaning, so it reads without colour."""
    points = [(_moment(t), float(v), bool(low), c) for t, v, low, c in trend.get("points") or []]
    start, end = _moment(trend.get("start")), _moment(trend.get("end"))
    lines = [(str(label), float(value)) for label, value in trend.get("lines") or []]
    drugs = [(str(label), _moment(s), _moment(e)) for label, s, e in trend.get("drugs") or []]
    times = [t for t, *_ in points] + [start] + ([end] if end else [])
    t0, t1 = min(times), max(times)
    pad = max((t1 - t0) * 0.04, timedelta(hours=12))
    t0, t1 = t0 - pad, t1 + pad
    left, right, top, plot_h = 48, 92, 16, 150
    plot_w = width - left - right
    axis_y = top + plot_h
    height = axis_y + 24 + 16 * len(drugs)
    peak = max([v for _, v, _, _ in points] + [v for _, v in lines] + [0.1]) * 1.12
    span = (t1 - t0).total_seconds()

    def x(t: datetime) -> float:
        return left + plot_w * max(0.0, min(1.0, (t - t0).total_seconds() / span))

    def y(v: float) -> float:
        return top + plot_h * (1 - v / peak)

    measure, unit = trend.get("measure", ""), trend.get("unit", "")
    lows = [p for p in points if p[2]]
    lowest = min(points, key=lambda p: p[1]) if points else None
    desc = (
        f"{measure} in {unit}, {len(points)} values from {t0:%Y-%m-%d} to {t1:%Y-%m-%d}, {len(lows)} low"
        + (f"; lowest {_number(lowest[1])} on {lowest[0]:%Y-%m-%d}" if lowest else "")
        + f". Episode from {start:%Y-%m-%d} "
        + (f"to {end:%Y-%m-%d}" if end else "still open")
        + ". Lines: "
        + ", ".join(f"{label} {_number(v)}" for label, v in lines)
        + "".join(
            f". Exposure to {label} from {s:%Y-%m-%d}" + (f" to {e:%Y-%m-%d}" if e else ", ongoing")
            for label, s, e in drugs
            if s
        )
        + "."
    )
    title = f"{trend.get('condition', '')}, grade {trend.get('grade', '')}: {measure} over the episode"
    opening = _labelled(ident, title, desc, width, height, ' class="trend"')
    parts = [
        opening,
        f'<defs><pattern id="{ident}-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        f'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fdf3e3"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="#e0b872" stroke-width="2"/></pattern></defs>',
    ]
    x_start, x_end = x(start), x(end or t1)
    parts.append(
        f'<rect class="episode" x="{x_start:.1f}" y="{top}" width="{max(x_end - x_start, 2):.1f}" '
        f'height="{plot_h}" fill="url(#{ident}-hatch)"/>'
    )
    parts.append(f'<line class="episode-edge" x1="{x_start:.1f}" y1="{top}" x2="{x_start:.1f}" y2="{axis_y}"/>')
    if end:
        parts.append(f'<line class="episode-edge" x1="{x_end:.1f}" y1="{top}" x2="{x_end:.1f}" y2="{axis_y}"/>')
    parts.append(f'<text x="{x_start + 3:.1f}" y="{top + 11}">episode{"" if end else " (open)"}</text>')
    for i, (label, value) in enumerate(lines):
        kind = "lln" if i == 0 else "grade"
        parts.append(
            f'<line class="{kind}" x1="{left}" y1="{y(value):.1f}" x2="{left + plot_w}" y2="{y(value):.1f}"/>'
            f'<text x="{left + plot_w + 4}" y="{y(value) + 4:.1f}">{_e(label)} {_number(value)}</text>'
        )
    parts.append(
        f'<line class="axis" x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}"/>'
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}"/>'
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{_number(peak)}</text>'
        f'<text x="{left - 6}" y="{axis_y}" text-anchor="end">0</text>'
        f'<text x="{left}" y="{axis_y + 14}">{t0:%Y-%m-%d}</text>'
        f'<text x="{left + plot_w}" y="{axis_y + 14}" text-anchor="end">{t1:%Y-%m-%d}</text>'
        f'<text x="{left + plot_w / 2:.1f}" y="{axis_y + 14}" text-anchor="middle">{_e(measure)} '
        f"({_e(unit)})</text>"
    )
    if len(points) > 1:
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v, _, _ in points)
        parts.append(f'<polyline class="series" points="{path}"/>')
    for t, v, low, comparator in points:
        cx, cy = x(t), y(v)
        shown = f"{t:%Y-%m-%d %H:%M}: {comparator or ''}{_number(v)} {unit}{' (low)' if low else ''}"
        if low:  # a downward triangle: "low" by its shape, not its colour
            shape = (
                f'<path class="low" d="M{cx - 5:.1f},{cy - 4:.1f} L{cx + 5:.1f},{cy - 4:.1f} L{cx:.1f},{cy + 5:.1f} Z">'
            )
            parts.append(f"{shape}<title>{_e(shown)}</title></path>")
        else:
            parts.append(
                f'<circle class="normal" cx="{cx:.1f}" cy="{cy:.1f}" r="3.5"><title>{_e(shown)}</title></circle>'
            )
    for i, (label, s, e) in enumerate(drugs):
        if s is None:
            continue
        by = axis_y + 32 + 16 * i
        x1, x2 = x(s), x(e or t1)
        parts.append(
            f'<rect class="drug" x="{x1:.1f}" y="{by - 9}" width="{max(x2 - x1, 2):.1f}" height="8">'
            f'<title>{_e(label)}</title></rect><text x="{left + plot_w + 4}" y="{by}">{_e(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
