"""The board's counting (what is active, what is new, per week) and its command's bad arguments."""

from __future__ import annotations

from datetime import date, datetime, timezone

from leukofhir.cli import main
from leukofhir.errors import EXIT_USAGE
from leukofhir.report.board import WEEKS, Board, render_board

BASE = "http://127.0.0.1:1/fhir"
AS_OF = datetime(2025, 3, 5, 12, 0, tzinfo=timezone.utc)  # a Wednesday


def _flag(status: str, start: str | None, display: str = "Leukopenia", grade: int = 2) -> dict:
    flag = {
        "resourceType": "Flag",
        "status": status,
        "subject": {"reference": f"{BASE}/Patient/p-{status}"},
        "code": {"coding": [{"display": display}]},
        "extension": [{"url": "https://h.example/StructureDefinition/ctcae-grade", "valueInteger": grade}],
    }
    if start:
        flag["period"] = {"start": start}
    return flag


def test_withdrawn_and_undated_flags_are_counted_by_status_but_never_as_new():
    board = Board(as_of=AS_OF)
    for flag in (
        _flag("active", "2025-03-05T01:00:00Z"),
        _flag("inactive", "2025-03-01T00:00:00Z"),
        _flag("entered-in-error", "2025-03-05T02:00:00Z"),
        _flag("active", None, "Neutropenia", 3),
        _flag("active", "2025-03-06T00:00:00Z"),  # after the as-of: not new yet
        _flag("inactive", "2024-03-03T00:00:00Z"),
    ):  # before the chart's first week
        board.add(flag, BASE)
    assert board.total == 6 and dict(board.by_status) == {"active": 3, "inactive": 2, "entered-in-error": 1}
    assert (board.new_24h, board.new_7d, board.unreadable) == (1, 2, 1)
    assert dict(board.active) == {("Leukopenia", 2): 2, ("Neutropenia", 3): 1}
    weeks = board.weeks()
    assert len(weeks) == WEEKS and weeks[-1] == ("week of 2025-03-03", 1) and weeks[-2] == ("week of 2025-02-24", 1)
    assert weeks[0][0] == f"week of {date(2024, 3, 4)}" and sum(n for _, n in weeks) == 2
    assert [r[2] for r in board.rows] == ["p-active"] * 3  # the local patient id, not the URL
    html = render_board(board)
    assert 'id="count-withdrawn">1<' in html and 'id="active-neutropenia-g3">1<' in html


def test_a_value_read_from_the_server_is_escaped():
    board = Board(as_of=AS_OF)
    board.add(_flag("active", "2025-03-05T01:00:00Z", display="<b onmouseover=x>"), BASE)
    html = render_board(board)
    assert "<b onmouseover" not in html and "&lt;b onmouseover=x&gt;" in html


def test_a_bad_as_of_is_a_usage_error(capsys, tmp_path):
    code = main(["board", "--fhir-url", BASE, "--out", str(tmp_path), "--as-of", "yesterday"])
    assert code == EXIT_USAGE
    assert "'yesterday' is not an ISO 8601" in capsys.readouterr().err
    assert not (tmp_path / "board.html").exists()
