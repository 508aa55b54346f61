"""Site rules files for tests: the default rules with another canonical base (and former bases)."""

from __future__ import annotations

from pathlib import Path

import yaml

from leukofhir.config import DEFAULT_PATH


def rules_with_base(folder: Path, base: str, previous: list[str] | None = None, tag_code: str | None = None) -> Path:
    """A rules file in `folder`: the shipped rules with `uris.base` (and `previous_bases`, `tag_code`) replaced."""
    data = yaml.safe_load(DEFAULT_PATH.read_text(encoding="utf-8"))
    data["uris"]["base"] = base
    data["uris"]["previous_bases"] = list(previous or [])
    if tag_code is not None:
        data["uris"]["tag_code"] = tag_code
    path = Path(folder) / "rules.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def strings_in(value):
    """Every string in a FHIR resource (or a list of them), at any depth: where a canonical base may show."""
    if isinstance(value, dict):
        for v in value.values():
            yield from strings_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings_in(v)
    elif isinstance(value, str):
        yield value
