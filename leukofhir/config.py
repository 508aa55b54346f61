"""Load and validate the rules configuration (rules.yaml): clinical-rules.md as data, checked on load."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from leukofhir.age import AgeSpan
from leukofhir.errors import ConfigError

__all__ = ["Rules", "AgeSpan", "load_config", "fold_unit", "DEFAULT_PATH"]  # AgeSpan lives in leukofhir.age

DEFAULT_PATH = Path(__file__).with_name("rules.yaml")


def _span(value) -> AgeSpan:
    return value if isinstance(value, AgeSpan) else AgeSpan(value)


def _duration(value) -> timedelta:
    span = _span(value)
    if span.unit not in ("min", "h", "d", "w"):
        raise ValueError(f"{span} must be in minutes, hours, days or weeks (min, h, d, w)")
    return span.timedelta()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


# What a rules file once set itself and now derives from `uris.base` (issue 21: one configurable canonical base).
_DERIVED_URIS = ("identifier_system", "tag_system", "ctcae_grade_extension")


def _check_base(value: str) -> str:
    """A canonical base: an absolute http(s) URL without query, fragment or trailing slash; no character that would
    break a token search (`|`, `,`) or need escaping in a URL."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be an absolute http(s) URL, e.g. https://fhir.hospital.example/leukofhir")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            f"{value!r} must be an absolute http(s) URL without query or fragment, "
            "e.g. https://fhir.hospital.example/leukofhir"
        )
    if value.endswith("/"):
        raise ValueError(f"{value!r} must not end in '/': the project's URLs are the base, '/', and their own path")
    bad = sorted({c for c in value if c.isspace() or c in '|,"<>\\{}^`' or ord(c) > 126})
    if bad:
        raise ValueError(f"{value!r} must not contain {' '.join(repr(c) for c in bad)}")
    return value


class Uris(_Model):
    """The project's own URIs (clinical-rules §4 identity, §5 extension and tag), all from one canonical base."""

    # The canonical base: the profile, the extension, the value set, the identifier and tag systems are URLs under
    # it (`uris` of a Flag, `leukofhir conformance`). A site sets its own.
    base: str
    # Bases the site used before: their Flags are found, rewritten under `base` and never duplicated (README,
    # "Conformance").
    previous_bases: list[str] = []
    tag_code: str
    author: str

    @model_validator(mode="before")
    @classmethod
    def _derived_not_set(cls, data):
        if isinstance(data, dict):
            for key in _DERIVED_URIS:
                if key in data:
                    raise ValueError(
                        f"{key} is no longer set: every project URL derives from uris.base (e.g. "
                        "https://fhir.hospital.example/leukofhir); delete the key and set the base"
                    )
        return data

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        return _check_base(v)

    @field_validator("previous_bases")
    @classmethod
    def _previous(cls, v: list[str]) -> list[str]:
        return [_check_base(b) for b in v]

    @model_validator(mode="after")
    def _previous_differ(self):
        if self.base in self.previous_bases:
            raise ValueError(f"previous_bases lists the current base {self.base}")
        return self

    @field_validator("author")
    @classmethod
    def _is_device(cls, v: str) -> str:
        if not v.startswith("Device/"):
            raise ValueError("must be a Device reference, e.g. Device/leukofhir-rules-engine (clinical-rules §5)")
        return v

    @field_validator("tag_code")
    @classmethod
    def _token(cls, v: str) -> str:
        if not v or any(c.isspace() or c in "|,\\" for c in v):
            raise ValueError(f"{v!r} must be a code without spaces, '|', ',' or '\\' (it is searched as a token)")
        return v

    def under(self, base: str) -> dict[str, str]:
        """The project's URLs under one canonical base."""
        return {
            "identifier_system": f"{base}/flag-episode",
            "tag_system": f"{base}/tag",
            "ctcae_grade_extension": f"{base}/StructureDefinition/ctcae-grade",
            "flag_profile": f"{base}/StructureDefinition/leukofhir-flag",
            "conditions_value_set": f"{base}/ValueSet/leukofhir-conditions",
        }

    @cached_property
    def identifier_system(self) -> str:
        return self.under(self.base)["identifier_system"]

    @cached_property
    def tag_system(self) -> str:
        return self.under(self.base)["tag_system"]

    @cached_property
    def ctcae_grade_extension(self) -> str:
        return self.under(self.base)["ctcae_grade_extension"]

    @cached_property
    def flag_profile(self) -> str:
        return self.under(self.base)["flag_profile"]

    @cached_property
    def conditions_value_set(self) -> str:
        return self.under(self.base)["conditions_value_set"]

    @cached_property
    def tags(self) -> list[str]:
        """`system|code` of the project's tag under the base, then under each previous base: a search by all of them
        (`_tag=a,b`) finds the project's resources written before the base changed."""
        return [f"{self.under(b)['tag_system']}|{self.tag_code}" for b in (self.base, *self.previous_bases)]

    @cached_property
    def identifier_systems(self) -> list[str]:
        """The episode identifier system under the base, then under each previous base."""
        return [self.under(b)["identifier_system"] for b in (self.base, *self.previous_bases)]


ConceptName = Literal[
    "wbc",
    "anc",
    "neutrophils_pct",
    "bands_pct",
    "bands_abs",
    "lymphocytes_abs",
    "lymphocytes_pct",
    "monocytes_pct",
    "monocytes_abs",
    "eosinophils_abs",
    "basophils_abs",
    "hemoglobin",
    "platelets",
]
UnitKind = Literal["count", "percent", "hemoglobin"]


class Concept(_Model):
    codes: list[str] = Field(min_length=1)
    kind: UnitKind


class Statuses(_Model):
    counted: list[str] = Field(min_length=1)
    preliminary_counts: bool = False
    ignored: list[str]
    retracted: str = "entered-in-error"


class Observations(_Model):
    code_system: str
    concepts: dict[ConceptName, Concept]
    statuses: Statuses

    @model_validator(mode="after")
    def _codes_unique(self):
        seen: dict[str, str] = {}
        for name, concept in self.concepts.items():
            for code in concept.codes:
                if code in seen:
                    raise ValueError(f"code {code} is listed under both {seen[code]} and {name}")
                seen[code] = name
        missing = {"wbc", "anc", "neutrophils_pct", "lymphocytes_abs", "hemoglobin", "platelets"} - set(self.concepts)
        if missing:
            raise ValueError(f"concepts missing: {', '.join(sorted(missing))}")
        return self


def fold_unit(text: str) -> str:
    """A count's unit as v1.3 §1.2 compares it when read from `unit`: without spaces, case-blind (Unicode casefold,
    which also makes the micro sign µ and the Greek mu μ one letter)."""
    return "".join(text.split()).casefold()


class Units(_Model):
    ucum_system: str
    count: dict[str, float]
    # A site's own spellings of count units (factor to 10^9/L), read like `count`; kept apart from the contract's list.
    site_count: dict[str, float] = {}
    hemoglobin: dict[str, float]
    percent: dict[str, float]
    range_mismatch_factor: float = Field(gt=1)
    range_mismatch_low_factor: float = Field(gt=1)
    range_mismatch_low_concepts: list[ConceptName] = []

    @field_validator("count", "site_count", "hemoglobin", "percent", mode="before")
    @classmethod
    def _positive(cls, v):
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of unit spellings to factors")
        for unit, factor in v.items():
            if not isinstance(unit, str) or not unit.strip():
                raise ValueError(f"unit {unit!r} must be a non-empty text")
            # A bool is an int to Python and "1000" would parse: neither is what a person meant as a factor.
            number = isinstance(factor, (int, float)) and not isinstance(factor, bool)
            if not (number and 0 < factor < float("inf")):
                raise ValueError(f"factor for unit {unit!r} must be a positive number, not {factor!r}")
        return v

    @model_validator(mode="after")
    def _spellings_agree(self):
        """Count spellings that differ only in case or spaces are one unit when read from `unit` (v1.3 §1.2): they
        must have one factor, or which one applies would depend on the spelling a lab happens to send."""
        seen: dict[str, tuple[str, str, float]] = {}
        for key in ("count", "site_count"):
            for unit, factor in getattr(self, key).items():
                folded = fold_unit(unit)
                first = seen.setdefault(folded, (key, unit, factor))
                if first[2] != factor:
                    raise ValueError(
                        f"{key} {unit!r} (factor {factor:g}) and {first[0]} {first[1]!r} (factor "
                        f"{first[2]:g}) differ only in case or spaces: a count's unit is matched ignoring "
                        "both (clinical-rules v1.3 §1.2), so they must have the same factor"
                    )
        return self

    @cached_property
    def counts(self) -> dict[str, float]:
        """Every count spelling with its factor: the contract's, then the site's."""
        return {**self.count, **self.site_count}

    @cached_property
    def counts_folded(self) -> dict[str, tuple[str, float]]:
        """fold_unit(spelling) -> (the first such spelling listed, its factor): a count's unit read from `unit`."""
        out: dict[str, tuple[str, float]] = {}
        for unit, factor in self.counts.items():
            out.setdefault(fold_unit(unit), (unit, factor))
        return out


class AgeBand(_Model):
    below: AgeSpan | None = None
    lln: float | None = Field(default=None, gt=0)
    threshold: float | None = Field(default=None, gt=0)

    _check_below = field_validator("below", mode="before")(lambda cls, v: None if v is None else _span(v))


def _check_bands(bands: list[AgeBand], what: str) -> list[AgeBand]:
    if not bands or bands[-1].below is not None:
        raise ValueError(f"the last {what} band must have no `below` (it covers older and unknown ages)")
    if any(b.below is None for b in bands[:-1]):
        raise ValueError(f"only the last {what} band may omit `below`")
    ref = datetime(2000, 1, 1)
    limits = [b.below.after(ref) for b in bands[:-1]]
    if limits != sorted(limits) or len(set(limits)) != len(limits):
        raise ValueError(f"{what} bands must be in increasing age order")
    return bands


class Grades(_Model):
    g2_below: float = Field(gt=0)
    g3_below: float = Field(gt=0)
    g4_below: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _decreasing(self):
        chain = [self.g2_below, self.g3_below] + ([self.g4_below] if self.g4_below is not None else [])
        if chain != sorted(chain, reverse=True) or len(set(chain)) != len(chain):
            raise ValueError("grade boundaries must decrease: g2_below > g3_below > g4_below")
        return self


class Leukopenia(_Model):
    snomed: str
    display: str
    grades: Grades


class Neutropenia(_Model):
    snomed: str
    display: str
    thresholds: list[AgeBand]
    lab_range_only_below: AgeSpan
    grades: Grades
    severity_words: dict[int, str]

    _check_span = field_validator("lab_range_only_below", mode="before")(lambda cls, v: _span(v))

    @field_validator("thresholds")
    @classmethod
    def _bands(cls, v):
        if any(b.threshold is None for b in v):
            raise ValueError("every band needs a `threshold`")
        return _check_bands(v, "neutropenia threshold")


class Agranulocytosis(_Model):
    snomed: str
    display: str
    below: float = Field(gt=0)


class SystemCode(_Model):
    system: str
    code: str


class Ben(_Model):
    threshold: float = Field(gt=0)
    patients: list[str] = []
    codes: list[SystemCode] = []


class Lymphopenia(_Model):
    snomed: str
    display: str
    lln: list[AgeBand]
    grades: Grades

    @field_validator("lln")
    @classmethod
    def _bands(cls, v):
        if any(b.lln is None for b in v):
            raise ValueError("every band needs an `lln`")
        return _check_bands(v, "lymphocyte LLN")


class HemoglobinLln(_Model):
    male: float = Field(gt=0)
    female: float = Field(gt=0)
    other: float = Field(gt=0)
    under_18: float = Field(gt=0)
    # The age from which the adult values apply (the name `under_18` says the contract's 18 years).
    adult_from: AgeSpan = AgeSpan("18y")

    _check_span = field_validator("adult_from", mode="before")(lambda cls, v: _span(v))


class Pancytopenia(_Model):
    snomed: str
    display: str
    same_count_within: timedelta
    hemoglobin_lln: HemoglobinLln
    hemoglobin_grades: Grades
    platelets_lln: float = Field(gt=0)
    platelets_grades: Grades

    _check = field_validator("same_count_within", mode="before")(lambda cls, v: _duration(v))


class OrderCheck(_Model):
    """CDS Hooks order-sign: the count below which a draft order of the drug gets a card, and where that comes from."""

    concept: Literal["anc", "wbc"] = "anc"
    below: float = Field(gt=0)
    ben_below: float | None = Field(default=None, gt=0)  # patients marked with benign ethnic neutropenia (§2)
    source: str


class Drug(_Model):
    label: str
    rxnorm: list[str] = []
    atc: list[str] = []
    names: list[str] = []
    order_sign: OrderCheck | None = None

    @model_validator(mode="after")
    def _identifiable(self):
        if not (self.rxnorm or self.atc or self.names):
            raise ValueError("a drug needs at least one RxNorm code, ATC prefix or name")
        return self


class Medications(_Model):
    rxnorm_system: str
    atc_system: str
    include_requests: bool
    include_administrations: bool
    excluded_statuses: dict[Literal["MedicationStatement", "MedicationRequest", "MedicationAdministration"], list[str]]
    drugs: dict[str, Drug] = Field(min_length=1)


class Windows(_Model):
    drug_lookback: timedelta
    transient_within: timedelta
    episode_gap: timedelta  # clinical-rules v1.1 §4 "Episode gap"
    history_lookback: None = None  # removed in v1.1: only here to tell a site file that still sets it

    _check = field_validator("drug_lookback", "transient_within", "episode_gap", mode="before")(
        lambda cls, v: _duration(v)
    )

    @field_validator("history_lookback", mode="before")
    @classmethod
    def _removed(cls, v):
        raise ValueError(
            "removed in rules v1.1: each patient's whole history is evaluated (convergence, "
            "clinical-rules §4), so there is no look-back to set; delete the key"
        )


class Validation(_Model):
    """Plausibility after unit conversion, read by the GX step (validate.suite_parameters, §1.2)."""

    min_value: float
    plausible_max: dict[ConceptName, float]
    clock_skew: timedelta
    # The data contract of a run against a server (validate.contract_breaches, judged on the whole run's totals):
    # a suite, or one feed of it, whose failing rows are above this share, at least `min_failing_rows` of them from
    # at least `min_failing_patients` patients, stops the run before anything is written; null: never. Fewer failing
    # rows are one patient's or a few results' problem: quarantined, never a stop. Offline `evaluate` only reports.
    max_failure_rate: float | None = Field(default=0.2, ge=0.0, le=1.0)
    min_failing_rows: int = Field(default=50, ge=1)
    min_failing_patients: int = Field(default=5, ge=1)

    _check = field_validator("clock_skew", mode="before")(lambda cls, v: _duration(v))


class Alerts(_Model):
    """Critical results told to the care team: a CommunicationRequest per grade-4 Flag episode (write/alerts.py)."""

    communication_requests: bool = True


class Cds(_Model):
    """What the CDS Hooks service's cards name as their source (leukofhir/cds)."""

    source_label: str = "leukofhir leukopenia surveillance"
    source_url: str = "https://leukofhir.example/docs/cds-hooks"


class Rules(_Model):
    """The whole rules file; attribute names follow the YAML keys."""

    version: Literal[1]
    uris: Uris
    observations: Observations
    units: Units
    wbc_lln: list[AgeBand]
    leukopenia: Leukopenia
    neutropenia: Neutropenia
    agranulocytosis: Agranulocytosis
    derive_anc: bool
    ben: Ben
    lymphopenia: Lymphopenia
    pancytopenia: Pancytopenia
    medications: Medications
    windows: Windows
    priority: dict[Literal[1, 2, 3, 4], Literal["PH", "PM", "PL", "PN"]]
    validation: Validation
    alerts: Alerts = Alerts()
    cds: Cds = Cds()

    @field_validator("wbc_lln")
    @classmethod
    def _wbc_bands(cls, v):
        if any(b.lln is None for b in v):
            raise ValueError("every band needs an `lln`")
        return _check_bands(v, "WBC LLN")

    @model_validator(mode="after")
    def _priorities_complete(self):
        if set(self.priority) != {1, 2, 3, 4}:
            raise ValueError("priority must map every grade 1-4")
        return self

    @cached_property
    def code_to_concept(self) -> dict[str, str]:
        """LOINC code -> concept name (§1.1)."""
        return {code: name for name, c in self.observations.concepts.items() for code in c.codes}

    @cached_property
    def concept_units(self) -> dict[str, dict[str, float]]:
        """Concept -> accepted unit -> factor to the canonical unit (§1.2)."""
        by_kind = {"count": self.units.counts, "percent": self.units.percent, "hemoglobin": self.units.hemoglobin}
        return {name: by_kind[c.kind] for name, c in self.observations.concepts.items()}

    @cached_property
    def accepted_statuses(self) -> set[str]:
        """Observation statuses that produce rows: counted, preliminary when enabled, and the retracted one (§1.1)."""
        s = self.observations.statuses
        return set(s.counted) | ({"preliminary"} if s.preliminary_counts else set()) | {s.retracted}


def _format_loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if part not in ("function-before", "function-after")) or "(top level)"


def load_config(path: str | Path | None = None) -> Rules:
    """The rules in `path`, or the shipped default; a wrong file raises ConfigError naming the key and why."""
    path = Path(path) if path is not None else DEFAULT_PATH
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read rules configuration ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the rules configuration must be a mapping of keys")
    try:
        return Rules.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {_format_loc(first['loc'])}: {msg}{more}") from None
