"""report.html in a real browser: headless Chromium renders it offline and the key numbers are in its DOM."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from leukofhir.report.html import write_report_html
from support.report_sample import sample_report, sample_trends

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian package `chromium`; CI installs it)"
)


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture
def report_file(tmp_path):
    return write_report_html(sample_report(), tmp_path / "report.html")


def test_the_rendered_dom_shows_the_key_numbers(tmp_path, report_file):
    dom = _chromium(tmp_path, "--dump-dom", report_file.as_uri()).stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    assert "leukofhir run report" in text
    assert "read 18,853 = evaluated 17,901 + skipped 917 + quarantined 35: reconciles" in text
    for card, number in [
        ("read", "18,853"),
        ("evaluated", "17,901"),
        ("skipped", "917"),
        ("quarantined", "35"),
        ("Flags", "57"),
    ]:
        assert re.search(rf'id="count-{card}"><div class="n">{number}</div>', dom), card
    assert 'id="flags-total">57<' in dom
    assert "Observation/u1" in text and "expect_column_values_to_be_in_set" in text
    assert dom.count("<rect") >= 4  # the Flags-per-week chart drew its bars


def test_the_screenshot_is_a_full_page_not_a_blank(tmp_path, report_file):
    shot = tmp_path / "report.png"
    _chromium(tmp_path, "--window-size=1280,1900", f"--screenshot={shot}", report_file.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 1900)
    # A blank page compresses to a few kB; text, tables and the chart make it far larger.
    assert len(data) > 40_000


# Test-only: measures each trend picture as laid out and writes the sizes into the DOM (the report has no script).
_MEASURE = """<script>addEventListener("load", function () {
  var out = document.createElement("pre"); out.id = "measured";
  out.textContent = Array.prototype.map.call(document.querySelectorAll("svg.trend"), function (s) {
    var r = s.getBoundingClientRect(); return Math.round(r.width) + "x" + Math.round(r.height); }).join(" ");
  document.body.appendChild(out); });</script>"""


def test_each_flag_s_trend_picture_is_laid_out_with_its_title_and_marks(tmp_path):
    trends = sample_trends()
    page = write_report_html({**sample_report(), "trends": trends, "trends_total": 80}, tmp_path / "report.html")
    measured = tmp_path / "measured.html"
    measured.write_text(page.read_text().replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", measured.as_uri()).stdout
    sizes = re.search(r'<pre id="measured">([^<]*)</pre>', dom).group(1).split()
    assert len(sizes) == len(trends) == 3
    for size in sizes:
        width, height = map(int, size.split("x"))
        assert width >= 600 and height >= 170, size
    assert "3 of 80 Flags pictured" in dom
    assert dom.count('<path class="low"') == 5 and dom.count('class="drug"') == 1
    assert "Agranulocytosis, grade 4: ANC over the episode" in dom and "Episode from 2025-02-10 still open" in dom

    shot = tmp_path / "trends.png"
    _chromium(tmp_path, "--window-size=1280,3200", f"--screenshot={shot}", page.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1280, 3200)
    assert len(data) > 60_000
