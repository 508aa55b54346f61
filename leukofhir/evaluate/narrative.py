"""The generated narrative of a Flag (`text`): a small XHTML table made from the Flag's own elements, nothing else."""

from __future__ import annotations

__all__ = ["flag_narrative"]

XHTML = "http://www.w3.org/1999/xhtml"
_PRIORITY = {"PH": "high", "PM": "medium", "PL": "low", "PN": "no alarm"}
# A long episode cites every low value: the narrative names the first few, the extensions hold them all.
EVIDENCE_SHOWN = 10
_STATE = {"active": "active", "inactive": "inactive", "entered-in-error": "withdrawn (entered in error)"}


def _day(instant: str | None) -> str:
    """ "2024-03-01T08:00:00Z" → "2024-03-01 08:00 UTC" (the Flag's instants are UTC)."""
    if not instant:
        return "?"
    return f"{instant[:10]} {instant[11:16]} UTC" if len(instant) >= 16 else instant


def _state(flag: dict) -> str:
    period = flag.get("period") or {}
    state = _STATE.get(flag.get("status"), str(flag.get("status")))
    if period.get("end"):
        return f"{state}; episode {_day(period.get('start'))} to {_day(period['end'])}"
    return f"{state}; episode since {_day(period.get('start'))}"


def _escaped(text: str) -> str:
    """Text as HAPI 8.8 writes it back in a `div` (`&`, `<`, `>` and `"` as entities, `'` as is; runs of white space
    as one space), so that a Flag read back compares equal to the one written and a re-run writes nothing."""
    text = " ".join(str(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _listed(references: list[str], most: int = EVIDENCE_SHOWN) -> str:
    if not references:
        return "none"
    more = len(references) - most
    return ", ".join(references[:most]) + (f" and {more} more" if more > 0 else "")


def flag_narrative(flag: dict, grade_url: str, priority_url: str, detail_url: str) -> dict:
    """`text` of a Flag (status `generated`): condition, CTCAE grade and priority, the finding of `code.text` (the
    decisive count and its date, what became of the episode), the drugs named as evidence, the episode's state and
    period, the evidence's references. Only what the Flag holds; FHIR's narrative rules (txt-1, txt-2): plain XHTML,
    no scripts, no styles, text escaped."""
    code = flag.get("code") or {}
    coding = (code.get("coding") or [{}])[0]
    grade = priority = None
    drugs, evidence = [], []
    for ext in flag.get("extension") or []:
        url = ext.get("url")
        if url == grade_url:
            grade = ext.get("valueInteger")
        elif url == priority_url:
            priority = ((ext.get("valueCodeableConcept") or {}).get("coding") or [{}])[0].get("code")
        elif url == detail_url:
            reference = ext.get("valueReference") or {}
            if reference.get("display"):
                drugs.append(f"{reference['display']} ({reference.get('reference')})")
            elif reference.get("reference"):
                evidence.append(reference["reference"])
    drug_category = any(c.get("code") == "drug" for cat in flag.get("category") or [] for c in cat.get("coding") or [])
    rows = [
        ("Condition", f"{coding.get('display', '?')} (SNOMED CT {coding.get('code', '?')})"),
        (
            "Grade",
            f"CTCAE v5.0 grade {grade}"
            + (f", priority {priority} ({_PRIORITY.get(priority, '?')})" if priority else ""),
        ),
        ("Finding", code.get("text") or ""),
        (
            "Drug association",
            "possibly drug-associated: " + ", ".join(drugs)
            if drug_category and drugs
            else "possibly drug-associated"
            if drug_category
            else "none found",
        ),
        ("State", _state(flag)),
        ("Evidence", _listed(evidence)),
    ]
    body = "".join(f"<tr><th>{_escaped(name)}</th><td>{_escaped(value)}</td></tr>" for name, value in rows)
    return {"status": "generated", "div": f'<div xmlns="{XHTML}"><table><tbody>{body}</tbody></table></div>'}
