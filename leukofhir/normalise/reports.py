"""DiagnosticReports and panel Observations (§1.1, §2): the blood count a result belongs to, its time if it has none."""

from __future__ import annotations

from leukofhir.normalise.context import FOREIGN, Context, LocalBases, resource_ref


def observation_key(bases: LocalBases, reference) -> str | None:
    """`Observation/<id>` for a local reference to an Observation (or to an untyped id), else None."""
    if (
        type(reference) is str
        and len(reference) > 12
        and reference.startswith("Observation/")
        and reference.find("/", 12) < 0
    ):
        return reference  # already the key: no new string (a report lists every result of a run)
    target = bases.target(reference)
    if target is FOREIGN:
        return None
    kind, rid = target
    return f"Observation/{rid}" if rid and kind in (None, "Observation") else None


class Reports:
    """Remembers, per result `Observation/<id>`, the report (or panel Observation) that lists it and that one's time.

    A report lists its results in `result`; the HL7 "General Health Panel" example nests them one level deeper, in the
    `hasMember` of a panel Observation (CBC 58410-2) that the report lists. Either gives the result its panel (one
    blood count, for a derived ANC and pancytopenia) and, when the result has no effective[x], its time."""

    def __init__(self, context: Context):
        self.context = context
        self.report_of: dict[str, tuple[int | None, str]] = {}  # "Observation/x" -> (report time, report ref)
        self.parent_of: dict[str, tuple[int | None, str]] = {}  # member -> (panel Observation time, its ref)

    def _note(self, resource: dict, references: list, into: dict) -> None:
        ref = resource_ref(resource)
        if ref is None:
            return
        time, _ = self.context.effective_ns(resource)
        entry = (time, self.context.intern(ref))  # one tuple shared by every result
        bases = self.context.bases

        def key_of(reference):
            return observation_key(bases, reference)

        for item in references:
            if isinstance(item, dict):
                key = key_of(item.get("reference"))
                if key is not None:
                    into[key] = entry

    def add(self, r: dict, index: int) -> None:
        """A DiagnosticReport: used whole (counted as evaluated), its results remembered."""
        self.context.evaluated_other += 1
        results = r.get("result")
        if isinstance(results, list):
            self._note(r, results, self.report_of)

    def note_members(self, panel: dict, members: list) -> None:
        """A panel Observation's `hasMember` (the panel itself is out of scope and counted by the caller)."""
        self._note(panel, members, self.parent_of)

    def link(self, rids: list[str | None], untimed: list[int]) -> tuple[list[str | None], dict[int, int | None]]:
        """Per row (its `Observation/<id>`): its panel, the report's else the panel Observation's; and for the rows in
        `untimed` the time they take from the report, else from the panel Observation (None: no time anywhere).

        Comprehensions over the whole column; Python loops only over the exceptions."""
        report_get = self.report_of.get
        reports = [report_get(rid) for rid in rids]
        if self.parent_of:
            parent_get = self.parent_of.get
            parents = [parent_get(rid) for rid in rids]
            for i, parent in enumerate(parents):
                if parent is not None and reports[i] is None:
                    reports[i] = report_get(parent[1])  # the panel Observation's report
            panels = [r[1] if r is not None else (p[1] if p is not None else None) for r, p in zip(reports, parents)]
        else:
            parents = None
            panels = [None if r is None else r[1] for r in reports]
        times: dict[int, int | None] = {}
        for i in untimed:
            times[i] = None
            for source in (reports[i], parents[i] if parents is not None else None):
                if source is not None and source[0] is not None:
                    times[i] = source[0]
                    break
        return panels, times
