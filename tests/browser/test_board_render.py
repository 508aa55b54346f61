"""board.html in a real browser: the sample data loaded and run on the real server, the board's numbers in Chromium's
DOM equal the project's Flags the server holds; the patients' table sorts offline."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_report_render import CHROMIUM, _chromium

from leukofhir.config import load_config
from leukofhir.extract.search import project_flag_tag
from leukofhir.report.board import Board, render_board
from leukofhir.run import run_pipeline
from leukofhir.write.load import load_files

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian package `chromium`; CI installs it)"
)

SAMPLE = sorted((Path(__file__).resolve().parents[2] / "leukofhir" / "sample_data").glob("*.json.gz"))
STATUS_IDS = {"active": "active", "inactive": "inactive", "entered-in-error": "withdrawn"}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _shown(dom: str, element_id: str) -> int:
    match = re.search(rf'id="{re.escape(element_id)}"[^>]*>([\d,]+)<', dom)
    assert match, element_id
    return int(match.group(1).replace(",", ""))


def _start(flag: dict) -> datetime:
    return datetime.fromisoformat(flag["period"]["start"].replace("Z", "+00:00"))


@pytest.mark.fhir
def _condition(flag: dict) -> str:
    """The condition a Flag names (its coding's display); a Flag under the project's tag without one (written by
    hand, or by another tool: other tests on the session's server leave such) is on the board as "unknown condition"."""
    displays = [c.get("display") for c in flag.get("code", {}).get("coding", []) if c.get("display")]
    return displays[0] if displays else "unknown condition"


def test_the_board_of_the_sample_data_shows_the_flags_on_the_server(fhir_base_url, fhir_client, tmp_path):
    assert load_files(fhir_client, SAMPLE, batch_size=250).ok
    ids = sorted(json.load(gzip.open(p, "rt"))["entry"][0]["resource"]["id"] for p in SAMPLE)
    rules = load_config()
    done = run_pipeline(fhir_client, rules, tmp_path / "run", patients=ids)
    assert done["reconciled"] and done["flags"]["total"] > 0
    # The online run's report pictures its Flags too (the batches' series merged, leukofhir.evaluate.summary).
    assert len(done["trends"]) == min(done["trends_total"], 60) == min(done["flags"]["total"], 60)
    assert (tmp_path / "run" / "report.html").read_text().count('<figure class="trend"') == len(done["trends"])
    # What the server holds, read independently of the board: every project Flag (other tests' too).
    flags = list(fhir_client.search("Flag", {"_tag": project_flag_tag(rules), "_count": 500}))
    assert flags
    # As of a day after the latest episode began, so the last year's chart has bars (the sample ends in 2020).
    as_of = max(_start(f) for f in flags if f["status"] != "entered-in-error") + timedelta(days=1)
    out = tmp_path / "board"
    command = [
        sys.executable,
        "-m",
        "leukofhir.cli",
        "board",
        "--fhir-url",
        fhir_base_url,
        "--out",
        str(out),
        "--as-of",
        as_of.isoformat(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    page = out / "board.html"
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)=", html) and "http" not in re.sub(
        r"<code>[^<]*</code>", "", html
    )  # nothing from the network (the server's URL is shown as text only)

    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    by_status = Counter(f["status"] for f in flags)
    assert _shown(dom, "count-total") == len(flags)
    for status, shown in STATUS_IDS.items():
        assert _shown(dom, f"count-{shown}") == by_status[status], status
    by_condition = Counter((_condition(f), f["status"]) for f in flags)
    for (condition, status), n in by_condition.items():
        assert _shown(dom, f"flags-{_slug(condition)}-{STATUS_IDS[status]}") == n, (condition, status)
    # The sample patients' own Flags are all there, counted by condition as the run reported them.
    ours = Counter(
        _condition(f)
        for f in flags
        if f["subject"]["reference"].split("/")[-1] in ids and f["status"] != "entered-in-error"
    )
    wanted = Counter()
    for key, n in done["flags"]["by_code_status"].items():
        condition, status = key.rsplit("|", 1)
        wanted[condition] += n if status != "entered-in-error" else 0
    assert ours == +wanted
    active = Counter((f["code"]["coding"][0]["display"], _grade(f)) for f in flags if f["status"] == "active")
    for (condition, grade), n in active.items():
        assert _shown(dom, f"active-{_slug(condition)}-g{grade}") == n
    year_ago = as_of - timedelta(weeks=53)
    new = [f for f in flags if f["status"] != "entered-in-error" and _start(f) <= as_of]
    assert _shown(dom, "new-7d") == sum(as_of - _start(f) <= timedelta(days=7) for f in new) >= 1
    weekly = [int(n) for n in re.findall(r'<rect class="bar"[^>]*data-count="(\d+)"', dom)]
    assert len(weekly) == 53 and sum(weekly) == _shown(dom, "new-year") >= 1
    assert sum(weekly) <= sum(_start(f) > year_ago for f in new)


def _grade(flag: dict) -> int:
    return next(e["valueInteger"] for e in flag["extension"] if e["url"].endswith("/ctcae-grade"))


def _flag(patient: str, display: str, grade: int, start: str, drug: str | None = None) -> dict:
    extension = [{"url": "https://example.org/StructureDefinition/ctcae-grade", "valueInteger": grade}]
    if drug:
        extension.append(
            {
                "url": "http://hl7.org/fhir/StructureDefinition/flag-detail",
                "valueReference": {"reference": "MedicationStatement/m", "display": drug},
            }
        )
    return {
        "resourceType": "Flag",
        "status": "active",
        "subject": {"reference": f"Patient/{patient}"},
        "code": {
            "coding": [{"display": display}],
            "text": f"{display} — WBC 1.{grade} ×10^9/L on {start[:10]}, CTCAE v5.0 grade {grade}",
        },
        "period": {"start": start},
        "extension": extension,
    }


_CLICK = """<script>addEventListener("load", function () {
  var buttons = document.querySelectorAll("#patients th button"), out = document.createElement("pre");
  function grades() { return Array.prototype.map.call(document.querySelectorAll("#patients tbody tr"),
    function (r) { return r.cells[2].textContent; }).join(","); }
  buttons[2].click(); var first = grades(); buttons[2].click();
  out.id = "sorted"; out.textContent = first + " " + grades(); document.body.appendChild(out); });</script>"""


def test_the_patients_table_sorts_in_the_browser_and_drug_classes_are_counted(tmp_path):
    as_of = datetime(2025, 3, 1, tzinfo=timezone.utc)
    board = Board(as_of=as_of, server="https://fhir.example/fhir")
    for flag in (
        _flag("p1", "Leukopenia", 2, "2025-02-27T10:00:00Z", "clozapine"),
        _flag("p2", "Agranulocytosis", 4, "2024-06-01T10:00:00Z", "antineoplastic chemotherapy (oxaliplatin)"),
        _flag("p3", "Leukopenia", 3, "2025-02-20T10:00:00Z", "clozapine"),
    ):
        board.add(flag, "https://fhir.example/fhir")
    page = tmp_path / "board.html"
    page.write_text(render_board(board).replace("</body>", _CLICK + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    assert re.search(r'<pre id="sorted">([^<]*)</pre>', dom).group(1) == "4,3,2 2,3,4"
    assert _shown(dom, "drug-clozapine") == 2 and _shown(dom, "drug-antineoplastic-chemotherapy") == 1
    assert _shown(dom, "new-24h") == 0 and _shown(dom, "new-7d") == 1 and _shown(dom, "new-year") == 3
    assert _shown(dom, "active-leukopenia-g2") == 1 and _shown(dom, "active-agranulocytosis-g4") == 1
    assert "WBC 1.4 ×10^9/L on 2024-06-01" in dom and ">p2<" in dom


@pytest.mark.fhir
def test_names_are_shown_only_when_the_site_asks(fhir_base_url, fhir_client, unique, tmp_path, own_tag):
    from support.fhir_builders import days_ago, observation, patient
    from support.server_data import put

    config, put_on_server = own_tag  # this test's Flags alone under its own project tag
    pid = f"board-{unique}"
    put_on_server.append(pid)
    person = {**patient(pid), "name": [{"use": "official", "family": "Kowalska", "given": ["Anna"]}]}
    put(fhir_client, person, observation(f"{pid}-w", "wbc", 0.8, time=days_ago(2), patient=f"Patient/{pid}"))
    done = run_pipeline(fhir_client, load_config(config), tmp_path / "run", patients=[pid])
    assert done["writes"]["create"] == 1
    for names, out in ((False, tmp_path / "ids"), (True, tmp_path / "names")):
        command = [
            sys.executable,
            "-m",
            "leukofhir.cli",
            "board",
            "--fhir-url",
            fhir_base_url,
            "--out",
            str(out),
            "--config",
            str(config),
            *(["--names"] if names else []),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Kowalska" not in result.stderr  # never in the log
        dom = _chromium(tmp_path, "--dump-dom", (out / "board.html").as_uri()).stdout
        assert _shown(dom, "count-total") == 1 and _shown(dom, "active-leukopenia-g4") == 1
        assert f">{pid}<" in dom and ("Anna Kowalska" in dom) is names
