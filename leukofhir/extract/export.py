"""`leukofhir export`: Bulk Data `$export` from a FHIR server to NDJSON files that `leukofhir evaluate` reads as
they are."""

from __future__ import annotations

import sys

from leukofhir.fhir.bulk import ERRORS_FILE, ExportRequest, export
from leukofhir.fhir.capabilities import check_capabilities
from leukofhir.fhir.client import connect


def _split(values: list[str] | None) -> tuple[str, ...]:
    """`--type Patient,Observation --type Flag` → ("Patient", "Observation", "Flag")."""
    return tuple(t.strip() for v in values or [] for t in v.split(",") if t.strip())


def export_command(args) -> int:
    level = "group" if args.group else ("patient" if args.patient_level else "system")
    request = ExportRequest(
        level=level,
        group_id=args.group,
        types=_split(args.type),
        since=args.since,
        type_filters=tuple(args.type_filter or ()),
    )
    with connect(args.fhir_url, args.auth, timeout=args.timeout) as client:
        # Refused before anything starts when the server does not declare $export at this level.
        check_capabilities(client, need_export=level, resource_types=[])
        result = export(client, args.out, request, max_wait=args.max_wait)
    counts = ", ".join(f"{t} {n}" for t, n in sorted(result.counts.items())) or "nothing"
    print(
        f"exported {sum(result.counts.values())} resources ({counts}) in {len(result.files)} files to {args.out}"
        + (" (resumed job)" if result.resumed else "")
    )
    if result.transaction_time:
        print(f"transactionTime {result.transaction_time}: the --since of the next incremental export")
    if result.errors:
        codes = ", ".join(f"{c} ×{n}" for c, n in sorted(result.error_codes.items()))
        print(
            f"the server reported {result.errors} errors ({codes}); details in {args.out}/{ERRORS_FILE}",
            file=sys.stderr,
        )
        return 1
    return 0


def add_arguments(p) -> None:
    """The command's own options (the server options come from the CLI's shared ones)."""
    p.add_argument("--out", required=True, metavar="DIR", help="where the NDJSON files go (and export.state)")
    p.add_argument("--type", action="append", metavar="TYPE[,TYPE]", help="resource types (_type); default: all")
    p.add_argument(
        "--since", metavar="INSTANT", help="only resources changed since (_since), e.g. 2024-05-01T00:00:00Z"
    )
    p.add_argument(
        "--type-filter",
        action="append",
        metavar="TYPE?QUERY",
        help="_typeFilter, e.g. 'Observation?code=http://loinc.org|6690-2' (repeatable)",
    )
    level = p.add_mutually_exclusive_group()
    level.add_argument("--group", metavar="ID", help="Group/ID/$export: the group's members only")
    level.add_argument("--patient-level", action="store_true", help="Patient/$export: every patient's compartment")
    p.add_argument(
        "--max-wait",
        type=float,
        default=6 * 3600.0,
        metavar="SECONDS",
        help="give up waiting for the job after this long; the same command resumes it (default 6 h)",
    )
