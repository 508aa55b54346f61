"""The report's trend pictures: each Flag's values, thresholds, episode and drugs, from a real evaluation."""

from __future__ import annotations

import json
import re

from leukofhir.evaluate.pipeline import evaluate_files
from leukofhir.evaluate.trends import MAX_POINTS, merge_trends
from leukofhir.report.html import render_report
from support.fhir_builders import at, observation, patient, statement


def _bundle(resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def _evaluate(tmp_path, resources: list[dict], **options) -> dict:
    path = tmp_path / "input.json"
    path.write_text(json.dumps(_bundle(resources)))
    return evaluate_files([path], tmp_path / "out", progress=False, **options)


def test_a_flag_s_picture_holds_its_values_thresholds_episode_and_drug(tmp_path):
    resources = [
        patient("p1"),
        statement("m1", "clozapine 100 MG Oral Tablet", start=at(days=-30), end=at(days=10)),
        observation("w0", "wbc", 5.2, time=at(days=-10)),  # before the episode: normal, shown around it
        observation("wa", "wbc", 5.4, time=at(days=-60)),  # long before: not in the picture
        observation("w1", "wbc", 3.1, time=at(days=0)),
        observation("w2", "wbc", 1.8, time=at(days=5)),
        observation("w3", "wbc", 4.6, time=at(days=12)),  # recovery ends the episode
        observation("w9", "wbc", 5.0, time=at(days=400)),  # far after: not in the picture
        observation("n1", "anc", 0.4, time=at(days=5)),
    ]
    report = _evaluate(tmp_path, resources)
    flags = [json.loads(line) for line in (tmp_path / "out" / "Flag.ndjson").open()]
    trends = {t["condition"]: t for t in report["trends"]}
    assert report["trends_total"] == len(flags) == len(trends) == 2
    leuko = trends["Leukopenia"]
    flag = next(f for f in flags if f["code"]["coding"][0]["display"] == "Leukopenia")
    assert leuko["flag"] == flag["identifier"][0]["value"] and "p1" not in json.dumps(leuko)  # no patient id
    assert (leuko["start"], leuko["end"]) == (flag["period"]["start"], flag["period"]["end"])
    assert (leuko["measure"], leuko["grade"], leuko["status"]) == ("WBC", 3, "inactive")
    assert [(p[1], p[2]) for p in leuko["points"]] == [(5.2, False), (3.1, True), (1.8, True), (4.6, False)]
    assert leuko["lines"] == [["LLN", 4.0], ["G2 <", 3.0], ["G3 <", 2.0], ["G4 <", 1.0]]
    assert leuko["drugs"] == [["clozapine", "2024-01-31T08:00:00Z", "2024-03-11T08:00:00Z"]]
    agranulocytosis = trends["Agranulocytosis"]
    assert agranulocytosis["measure"] == "ANC" and agranulocytosis["lines"][0] == ["threshold", 1.5]
    assert [p[1:3] for p in agranulocytosis["points"]] == [[0.4, True]]

    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count('<figure class="trend"') == 2 and "http" not in html.lower()
    figure = re.search(r'<figure class="trend" id="trend-%s">.*?</figure>' % leuko["flag"], html, re.S).group(0)
    assert re.search(r'<svg role="img" aria-labelledby="(trend-chart-\d+)-title \1-desc"', figure)
    assert "<desc" in figure and "4 values" in figure and "1 low" not in figure and "2 low" in figure
    assert figure.count('<path class="low"') == 2 and figure.count('<circle class="normal"') == 2
    assert "LLN 4" in figure and "G3 &lt; 2" in figure and 'class="drug"' in figure and "clozapine" in figure
    assert 'class="episode"' in figure and figure.count('class="episode-edge"') == 2


def test_a_long_history_is_sampled_keeping_every_low_value(tmp_path):
    resources = [patient("p1")]
    resources += [observation(f"a{i}", "wbc", 6.0, time=at(days=-200 + i)) for i in range(200)]
    resources += [observation(f"l{i}", "wbc", 2.5, time=at(days=i * 10)) for i in range(20)]
    report = _evaluate(tmp_path, resources)
    (trend,) = report["trends"]
    assert len(trend["points"]) == MAX_POINTS
    assert sum(p[2] for p in trend["points"]) == 20  # every low value kept
    times = [p[0] for p in trend["points"]]
    assert times == sorted(times)


def test_merging_batches_picks_what_one_pass_picks():
    def trend(flag, status, grade, start):
        return {"flag": flag, "status": status, "grade": grade, "start": start}

    a = [trend("a1", "active", 2, "2024-01-01T00:00:00Z"), trend("a2", "inactive", 4, "2024-05-01T00:00:00Z")]
    b = [trend("b1", "active", 4, "2023-01-01T00:00:00Z"), trend("b2", "active", 2, "2024-03-01T00:00:00Z")]
    assert [t["flag"] for t in merge_trends([a, b], limit=3)] == ["b1", "b2", "a1"]
    assert merge_trends([a, b], limit=3) == merge_trends([b, a], limit=3)


def test_a_report_without_trends_renders_as_before():
    from support.report_sample import sample_report

    report = sample_report()
    assert "Evidence per Flag" not in render_report(report)
    report["trends"], report["trends_total"] = [], 0
    assert "No Flags to picture." in render_report(report)
