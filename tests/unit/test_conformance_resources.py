"""The conformance resources: the templates filled with a rules file's canonical base, codes and version."""

from __future__ import annotations

import json

import pytest

from leukofhir.config import load_config
from leukofhir.conformance.resources import conformance_resources
from leukofhir.errors import ConfigError
from leukofhir.fhir.ids import is_valid_id
from support.site_rules import rules_with_base, strings_in

SITE = "https://fhir.hospital.example/leukofhir"


def test_resources_are_filled_with_the_site_base(tmp_path):
    rules = load_config(rules_with_base(tmp_path, SITE))
    default = load_config().uris.base
    resources = conformance_resources(rules)
    assert [(r["resourceType"], r["url"]) for r in resources] == [
        ("ValueSet", f"{SITE}/ValueSet/leukofhir-conditions"),
        ("StructureDefinition", f"{SITE}/StructureDefinition/ctcae-grade"),
        ("StructureDefinition", f"{SITE}/StructureDefinition/leukofhir-flag"),
    ]
    text = json.dumps(resources)
    assert "{{" not in text and default not in text
    assert rules.uris.flag_profile == f"{SITE}/StructureDefinition/leukofhir-flag"
    # Every URL of the project in them is under the site's base; the others are FHIR's and terminologies'.
    own = {s for s in strings_in(resources) if s.startswith("http") and "hl7.org" not in s and "snomed.info" not in s}
    assert own and all(s.startswith(SITE + "/") for s in own), own
    for resource in resources:
        assert is_valid_id(resource["id"]) and resource["id"].startswith("leukofhir-")
    concepts = resources[0]["compose"]["include"][0]["concept"]
    assert {c["code"] for c in concepts} == {"84828003", "165517008", "17182001", "1156294003", "127034005"}


def test_two_bases_get_different_ids(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = conformance_resources(load_config(rules_with_base(tmp_path / "a", SITE)))
    b = conformance_resources(load_config(rules_with_base(tmp_path / "b", SITE + "2")))
    assert not {r["id"] for r in a} & {r["id"] for r in b}
    again = conformance_resources(load_config(rules_with_base(tmp_path, SITE)))
    assert [r["id"] for r in a] == [r["id"] for r in again]


@pytest.mark.parametrize(
    "base, message",
    [
        ("fhir.hospital.example/leukofhir", "absolute http(s) URL"),
        ("https://fhir.hospital.example/leukofhir/", "must not end in '/'"),
        ("https://fhir.hospital.example/leuko fhir", "must not contain"),
        ("https://fhir.hospital.example/a|b", "must not contain"),
        ("https://fhir.hospital.example/x?y=1", "without query"),
    ],
)
def test_a_bad_base_is_refused_naming_the_key(tmp_path, base, message):
    with pytest.raises(ConfigError, match=r"uris\.base") as err:
        load_config(rules_with_base(tmp_path, base))
    assert message in str(err.value)


def test_a_rules_file_that_still_sets_a_system_is_told_to_set_the_base(tmp_path):
    path = rules_with_base(tmp_path, SITE)
    path.write_text(path.read_text().replace("  tag_code:", "  identifier_system: https://x.example/e\n  tag_code:"))
    with pytest.raises(ConfigError, match="identifier_system is no longer set: every project URL derives from uris"):
        load_config(path)


def test_a_flag_and_its_author_use_the_site_base_everywhere(tmp_path):
    from leukofhir.evaluate.flag_resource import build_flag
    from leukofhir.write.flags import author_device, withdrawn
    from support.fhir_builders import at, flags_for, observation, patient, statement

    rules = load_config(rules_with_base(tmp_path, SITE))
    default = load_config().uris.base
    (spec,) = flags_for(
        [patient(), observation("a", "anc", 0.3), statement("m", "clozapine", point=at(days=-3))], rules
    )
    flag = build_flag(spec, rules)
    for resource in (flag, withdrawn({**flag, "id": "x"}, rules), author_device(rules)):
        own = {
            s
            for s in strings_in(resource)
            if s.startswith("http") and "hl7.org" not in s and "snomed.info" not in s and "w3.org" not in s
        }
        assert own and all(s.startswith(SITE + "/") for s in own), own
        assert default not in json.dumps(resource)
    assert flag["meta"]["profile"] == [f"{SITE}/StructureDefinition/leukofhir-flag"]
