"""The generated narrative of a Flag: its own elements, escaped as HAPI writes XHTML back."""

from __future__ import annotations

from xml.etree import ElementTree

from leukofhir.config import load_config
from leukofhir.evaluate.flag_resource import build_flag
from leukofhir.write.flags import withdrawn
from support.fhir_builders import at, flags_for, observation, patient, statement

RULES = load_config()


def _cells(flag: dict) -> dict[str, str]:
    div = ElementTree.fromstring(flag["text"]["div"])  # well-formed XHTML, or this raises
    assert div.tag == "{http://www.w3.org/1999/xhtml}div"
    ns = "{http://www.w3.org/1999/xhtml}"
    return {tr.find(f"{ns}th").text: tr.find(f"{ns}td").text for tr in div.iter(f"{ns}tr")}


def test_the_narrative_names_condition_grade_finding_drug_and_state():
    (spec,) = flags_for([patient(), observation("a", "anc", 0.3), statement("m", "clozapine", point=at(days=-3))])
    flag = build_flag(spec, RULES)
    assert flag["text"]["status"] == "generated"
    assert _cells(flag) == {
        "Condition": "Agranulocytosis (SNOMED CT 17182001)",
        "Grade": "CTCAE v5.0 grade 4, priority PH (high)",
        "Finding": flag["code"]["text"],
        "Drug association": "possibly drug-associated: clozapine (MedicationStatement/m)",
        "State": "active; episode since 2024-03-01 08:00 UTC",
        "Evidence": "Observation/a",
    }
    assert "ANC 0.3 ×10^9/L on 2024-03-01" in flag["code"]["text"]


def test_the_narrative_follows_the_flag_when_it_changes():
    (spec,) = flags_for([patient(), observation("w", "wbc", 3.0), observation("w2", "wbc", 5.0, time=at(hours=24))])
    flag = build_flag(spec, RULES)
    cells = _cells(flag)
    assert cells["State"] == "inactive; episode 2024-03-01 08:00 UTC to 2024-03-02 08:00 UTC"
    assert cells["Drug association"] == "none found" and "transient low count" in cells["Finding"]
    gone = _cells(withdrawn({**flag, "id": "x"}, RULES))
    assert gone["State"].startswith("withdrawn (entered in error)") and gone["Finding"].endswith("supports this Flag")


def test_text_is_escaped_as_hapi_writes_it_back():
    from leukofhir.evaluate.narrative import _escaped

    (spec,) = flags_for([patient(), observation("a", "anc", 0.1, comparator="<")])
    flag = build_flag(spec, RULES)
    assert "ANC &lt;0.1" in flag["text"]["div"] and "<0.1" not in flag["text"]["div"]
    assert _cells(flag)["Finding"] == flag["code"]["text"] and "ANC <0.1" in flag["code"]["text"]
    # HAPI 8.8 answers `"` as &quot; and `'` as it is (tests/integration/test_flag_on_server.py reads Flags back).
    assert _escaped("a \"b\" <c> & 'd'\n e") == "a &quot;b&quot; &lt;c&gt; &amp; 'd' e"
