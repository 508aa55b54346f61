"""The rules configuration: the shipped file loads; a wrong file names the key and why (issue 3, item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from leukofhir.config import DEFAULT_PATH, AgeSpan, load_config
from leukofhir.errors import ConfigError


def test_default_file_loads_with_the_contract_values():
    rules = load_config()
    assert rules.code_to_concept["6690-2"] == "wbc" and "30405-5" not in rules.code_to_concept
    assert rules.units.count["K/uL"] == 1 and rules.units.count["/uL"] == 0.001
    assert rules.windows.drug_lookback.days == 90 and rules.windows.transient_within.total_seconds() == 72 * 3600
    assert rules.priority == {1: "PN", 2: "PL", 3: "PM", 4: "PH"}
    assert rules.uris.identifier_system == "https://leukofhir.example/fhir/flag-episode"
    assert not rules.observations.statuses.preliminary_counts


def _write(tmp_path: Path, change) -> Path:
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    change(data)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda d: d["leukopenia"]["grades"].update(g2_below="three"), "leukopenia.grades.g2_below"),
        (lambda d: d["leukopenia"]["grades"].update(g3_below=5.0), "leukopenia.grades"),
        (lambda d: d["windows"].update(drug_lookback="3m"), "windows.drug_lookback"),
        (lambda d: d["windows"].update(transient_within="soon"), "windows.transient_within"),
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d["units"]["count"].update({"/L": -1}), "units.count"),
        (lambda d: d["wbc_lln"].append({"below": "30y", "lln": 4.0}), "wbc_lln"),
        (lambda d: d["observations"]["concepts"]["anc"].update(codes=["6690-2"]), "observations"),
        (lambda d: d["uris"].update(author="Organization/x"), "uris.author"),
        (lambda d: d["priority"].pop(4), "priority"),
        (lambda d: d["medications"]["drugs"].update(x={"label": "x"}), "medications.drugs.x"),
        (lambda d: d["validation"].update(max_failure_rate=1.5), "validation.max_failure_rate"),
    ],
)
def test_wrong_file_names_the_key(tmp_path, change, key):
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, change))
    assert f": {key}" in str(caught.value)


# clinical-rules v1.3 §1.2: a site's own count spellings, checked on load; the error names the entry and why.
@pytest.mark.parametrize(
    "spellings, words",
    [
        ({"Gpt/L": 0}, "factor for unit 'Gpt/L' must be a positive number, not 0"),
        ({"Gpt/L": -1}, "factor for unit 'Gpt/L' must be a positive number, not -1"),
        ({"Gpt/L": "1"}, "factor for unit 'Gpt/L' must be a positive number, not '1'"),
        ({"Gpt/L": True}, "factor for unit 'Gpt/L' must be a positive number, not True"),
        ({"Gpt/L": None}, "factor for unit 'Gpt/L' must be a positive number, not None"),
        ({"Gpt/L": float("inf")}, "factor for unit 'Gpt/L' must be a positive number, not inf"),
        ({" ": 1}, "unit ' ' must be a non-empty text"),
        (["Gpt/L"], "must be a mapping of unit spellings to factors"),
        # Differs from the contract's K/uL only in case: one unit when read from `unit`, so one factor.
        ({"k/UL": 0.001}, "site_count 'k/UL' (factor 0.001) and count 'K/uL' (factor 1) differ only in case or spaces"),
        ({"Cells / mm3": 1}, "site_count 'Cells / mm3' (factor 1) and count 'cells/mm3' (factor 0.001)"),
    ],
)
def test_a_site_count_spelling_is_checked_on_load(tmp_path, spellings, words):
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, lambda d: d["units"].update(site_count=spellings)))
    assert ": units" in str(caught.value) and words in str(caught.value)


def test_site_count_spellings_load_beside_the_contract_list(tmp_path):
    rules = load_config(_write(tmp_path, lambda d: d["units"].update(site_count={"Gpt/L": 1, "k/ul": 1})))
    assert rules.units.counts["Gpt/L"] == 1 and rules.units.counts_folded["gpt/l"] == ("Gpt/L", 1)
    assert rules.units.counts_folded["k/ul"] == ("K/uL", 1)  # the contract's spelling first
    assert load_config().units.site_count == {}
    # The contract's v1.3 spellings are in the shipped list, each with its factor (§1.2).
    count = load_config().units.count
    assert count["THOU/uL"] == count["GI/L"] == count["x 10^9/L"] == count["Tsd/µL"] == 1
    assert count["cells/mm3"] == count["/cmm"] == count["cells/µL"] == 0.001


def test_unreadable_and_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize(
    "change, expected",
    [
        (None, ("17182001", 4, False)),  # shipped: ANC 0.3 < 0.5
        (lambda d: d["agranulocytosis"].update(below=0.2), ("165517008", 4, False)),  # site: 0.3 is not < 0.2
        (lambda d: d["neutropenia"]["thresholds"][-1].update(threshold=0.25), None),  # site: 0.3 is not low
        (lambda d: d["windows"].update(transient_within="96h"), ("17182001", 4, True)),  # 80 h is now transient
    ],
)
def test_a_site_rules_file_changes_the_flags(tmp_path, change, expected):
    """The engine uses what a site file says, not only loads it: the same input, other Flags."""
    from leukofhir.evaluate.pipeline import evaluate_files
    from support.fhir_builders import at, observation, patient

    src = tmp_path / "in.ndjson"
    resources = [patient(), observation("a1", "anc", 0.3), observation("a2", "anc", 2.0, time=at(hours=80))]
    src.write_text("".join(json.dumps(r) + "\n" for r in resources))
    config = _write(tmp_path, change) if change else None
    evaluate_files([str(src)], tmp_path / "out", config=config, progress=False)
    flags = [json.loads(line) for line in (tmp_path / "out" / "Flag.ndjson").read_text().splitlines()]
    if expected is None:
        assert flags == []
        return
    (flag,) = flags
    grade = next(e["valueInteger"] for e in flag["extension"] if e["url"].endswith("/ctcae-grade"))
    assert (flag["code"]["coding"][0]["code"], grade, flag["status"]) == (expected[0], expected[1], "inactive")
    assert ("pseudoleukopenia" in flag["code"]["text"]) is expected[2]


def test_history_lookback_is_gone_with_a_clear_message(tmp_path):
    # clinical-rules v1.1 §4: convergence replaces the look-back; a site file still setting it is told so.
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, lambda d: d["windows"].update(history_lookback="30d")))
    assert "windows.history_lookback" in str(caught.value) and "v1.1" in str(caught.value)
    assert "history_lookback" not in DEFAULT_PATH.read_text()


def test_validation_failure_threshold_defaults_and_can_be_switched_off(tmp_path):
    assert load_config().validation.max_failure_rate == 0.2
    rules = load_config(_write(tmp_path, lambda d: d["validation"].update(max_failure_rate=None)))
    assert rules.validation.max_failure_rate is None
    rules = load_config(_write(tmp_path, lambda d: d["validation"].pop("max_failure_rate")))
    assert rules.validation.max_failure_rate == 0.2


def test_age_span_calendar_arithmetic():
    from datetime import datetime

    assert AgeSpan("1m").after(datetime(2024, 1, 31)) == datetime(2024, 2, 29)
    assert AgeSpan("18y").after(datetime(2004, 2, 29)) == datetime(2022, 2, 28)
    with pytest.raises(ValueError):
        AgeSpan("1 fortnight")
