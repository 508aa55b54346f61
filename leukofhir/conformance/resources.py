"""The conformance resources of a rules configuration: the JSON templates here, with its canonical base filled in."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from leukofhir.config import Rules

__all__ = ["conformance_resources", "example_flag", "resource_id", "TEMPLATES"]

TEMPLATES = Path(__file__).resolve().parent
# Loaded in this order: the value set and the extension before the profile that names them.
_FILES = (
    "ValueSet-leukofhir-conditions.json",
    "StructureDefinition-ctcae-grade.json",
    "StructureDefinition-leukofhir-flag.json",
)
_EXAMPLE = "Flag-example.json"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("leukofhir")
    except PackageNotFoundError:  # run from a checkout without installing
        return "0.0.0"


def _conditions(rules: Rules) -> list[dict]:
    """The value set's concepts: the SNOMED CT code and display of each condition, as the rules file names them (the
    validator checks a Flag's display against them)."""
    conditions = (rules.leukopenia, rules.neutropenia, rules.agranulocytosis, rules.lymphopenia, rules.pancytopenia)
    return [{"code": c.snomed, "display": c.display} for c in conditions]


def _fill(value, names: dict):
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    if isinstance(value, str):
        if value in names and not isinstance(names[value], str):
            return names[value]  # a placeholder standing for a whole element ("{{conditions}}")
        for placeholder, text in names.items():
            if isinstance(text, str):
                value = value.replace(placeholder, text)
    return value


def resource_id(resource: dict) -> str:
    """The id a resource is written at: its template's id and a digest of its canonical URL, so that the resources of
    two bases on one server (a site moving to a new base) never overwrite each other, and every run writes the same
    ids. At most 64 characters, as FHIR ids are."""
    digest = hashlib.sha256(resource["url"].encode("utf-8")).hexdigest()[:12]
    return f"{resource['id']}-{digest}"


def _load(name: str, rules: Rules) -> dict:
    names = {
        "{{base}}": rules.uris.base,
        "{{version}}": _version(),
        "{{tag_code}}": rules.uris.tag_code,
        "{{conditions}}": _conditions(rules),
    }
    return _fill(json.loads((TEMPLATES / name).read_text(encoding="utf-8")), names)


def conformance_resources(rules: Rules) -> list[dict]:
    """The StructureDefinitions and the ValueSet of `rules`' canonical base, each at its resource_id."""
    out = []
    for name in _FILES:
        resource = _load(name, rules)
        out.append({**resource, "id": resource_id(resource)})
    return out


def example_flag(rules: Rules) -> dict:
    """The example Flag (docs/conformance.md), under `rules`' canonical base."""
    return _load(_EXAMPLE, rules)
