"""CDS Hooks 2.0 cards from a patient's evaluated state: one per open episode (patient-view), one per draft order of
a drug the rules associate with low counts (order-sign)."""

from __future__ import annotations

import uuid

from leukofhir.cds.evaluation import Count, PatientState
from leukofhir.config import Drug, Rules
from leukofhir.evaluate.rules import FlagSpec

SUMMARY_MAX = 140  # CDS Hooks 2.0: "<140 characters"
GRANULOCYTES = {"neutropenia", "agranulocytosis"}
# The condition families whose open episode makes a drug that lowers counts a concern at order-sign (§4 families).
ORDER_FAMILIES = {"leukocytes", "granulocytes", "pancytopenia"}
CARD_NAMESPACE = uuid.UUID("5b0c5f0e-3f57-4a38-9e0b-6a2b5f1e7c11")  # card uuids derived from Flag identifiers
SHOWN_NAMES = {
    "wbc": "WBC",
    "anc": "ANC",
    "lymphocytes_abs": "Lymphocytes",
    "platelets": "Platelets",
    "hemoglobin": "Hemoglobin",
}


def indicator(spec: FlagSpec, rules: Rules) -> str:
    """critical for grade 4 or agranulocytosis, warning for grade 3, info below (docs/clinical-decisions.md)."""
    if spec.grade >= 4 or spec.code == rules.agranulocytosis.snomed:
        return "critical"
    return "warning" if spec.grade == 3 else "info"


def summary(spec: FlagSpec) -> str:
    """ "Agranulocytosis: ANC 0.3 ×10^9/L on 2026-12-01, grade 4" from the Flag's own text (its first clause)."""
    head = spec.text.split("; ", 1)[0].replace(" — ", ": ", 1).replace("CTCAE v5.0 grade", "grade")
    return head if len(head) < SUMMARY_MAX else head[: SUMMARY_MAX - 2] + "…"


def _source(rules: Rules) -> dict:
    return {"label": rules.cds.source_label, "url": rules.cds.source_url}


def _counts_table(latest: dict[str, Count]) -> str:
    if not latest:
        return ""
    rows = [
        f"| {SHOWN_NAMES.get(c.concept, c.concept)} | {c.shown} | {c.time.date().isoformat()} |"
        for c in latest.values()
    ]
    return "\n".join(["| count | last value | date |", "|---|---|---|", *rows])


def episode_card(spec: FlagSpec, state: PatientState, rules: Rules) -> dict:
    """The card of one open episode (patient-view)."""
    lines = [
        f"**{spec.text}**",
        "",
        f"Open since {spec.start.date().isoformat()}; the project's Flag in the chart says the same.",
    ]
    if spec.drugs:
        drugs = ", ".join(sorted({label for label, _ in spec.drugs}))
        lines += [
            "",
            f"Possibly drug-associated (exposure within {rules.windows.drug_lookback.days} days before): {drugs}.",
        ]
    table = _counts_table(state.latest)
    if table:
        lines += ["", "Last counts:", "", table]
    return {
        "uuid": str(uuid.uuid5(CARD_NAMESPACE, spec.identifier)),
        "summary": summary(spec),
        "detail": "\n".join(lines),
        "indicator": indicator(spec, rules),
        "source": _source(rules),
    }


def patient_view_cards(state: PatientState, rules: Rules) -> list[dict]:
    """One card per open episode, the most severe first; none when nothing is open."""
    order = {"critical": 0, "warning": 1, "info": 2}
    cards = [episode_card(spec, state, rules) for spec in state.open_episodes]
    return sorted(cards, key=lambda card: order[card["indicator"]])


def order_card(drug_key: str, drug: Drug, order_ref: str | None, state: PatientState, rules: Rules) -> dict | None:
    """The card of one draft order of a drug the rules list (order-sign), or None when nothing is low: an open
    leukocyte, granulocyte or pancytopenia episode, or the drug's own count below its threshold (rules.yaml
    `order_sign`)."""
    episodes = [s for s in state.open_episodes if s.family in ORDER_FAMILIES]
    check = drug.order_sign
    count = state.latest.get(check.concept) if check else None
    threshold = None
    if check is not None:
        ben = bool(state.info and state.info.ben)
        threshold = check.ben_below if ben and check.ben_below is not None else check.below
    below = (
        count is not None
        and threshold is not None
        and (count.value < threshold or count.comparator == "<" and count.value <= threshold)
    )
    if not episodes and not below:
        return None
    worst = max(episodes, key=lambda s: s.grade, default=None)
    agranulocytic = (
        count is not None and check is not None and check.concept == "anc" and count.value < rules.agranulocytosis.below
    )
    critical = (worst is not None and indicator(worst, rules) == "critical") or agranulocytic
    if below:
        head = (
            f"{drug.label.capitalize()} ordered: {SHOWN_NAMES[check.concept]} {count.shown} on "
            f"{count.time.date().isoformat()}, below {threshold:g}"
        )
    else:
        head = f"{drug.label.capitalize()} ordered with {summary(worst)[0].lower()}{summary(worst)[1:]}"
    lines = []
    if below:
        lines.append(
            f"The last {SHOWN_NAMES[check.concept]} is {count.shown} on {count.time.date().isoformat()}, "
            f"below the threshold {threshold:g} ×10^9/L for {drug.label}."
        )
    for spec in episodes:
        lines.append(f"Open episode: {spec.text}.")
    if check is not None:
        lines += [
            "",
            f"Threshold source: {check.source}"
            + (
                f" (general population {check.below:g}, benign ethnic neutropenia {check.ben_below:g} ×10^9/L)"
                if check.ben_below is not None
                else ""
            ),
        ]
    table = _counts_table(state.latest)
    if table:
        lines += ["", "Last counts:", "", table]
    card = {
        "uuid": str(uuid.uuid5(CARD_NAMESPACE, f"{state.patient_id}|{order_ref}|{drug_key}")),
        "summary": head if len(head) < SUMMARY_MAX else head[: SUMMARY_MAX - 2] + "…",
        "detail": "\n".join(lines),
        "indicator": "critical" if critical else "warning",
        "source": _source(rules),
        "overrideReasons": override_reasons(rules),
    }
    return card


# Why a clinician signs anyway; CDS Hooks 2.0 overrideReasons are Codings (the EHR sends back the one chosen), in a
# code system under the site's canonical base (uris.base), as every project URL.
OVERRIDE_REASONS = [
    ("benefit-outweighs-risk", "Benefit outweighs the risk; counts will be monitored"),
    ("count-rechecked", "A more recent count is acceptable"),
    ("specialist-advised", "Advised by haematology or oncology"),
]


def override_reasons(rules: Rules) -> list[dict]:
    system = f"{rules.uris.base}/CodeSystem/cds-override"
    return [{"code": code, "system": system, "display": display} for code, display in OVERRIDE_REASONS]
