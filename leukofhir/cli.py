"""The `leukofhir` command line: argument parsing and exit codes only; the work lives in the package."""

from __future__ import annotations

import argparse
import logging
import sys

from leukofhir.errors import EXIT_INTERRUPTED, LeukofhirError, exit_code
from leukofhir.fhir.auth_kinds import AUTH_KINDS

log = logging.getLogger("leukofhir")


def _fhir_url(value: str) -> str:
    """--fhir-url checked (no credentials on the command line); argparse shows only our redacted message."""
    from leukofhir.fhir.urls import check_base_url

    try:
        return check_base_url(value)
    except LeukofhirError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fhir-url", required=True, type=_fhir_url, help="FHIR base URL, e.g. http://127.0.0.1:8080/fhir")
    p.add_argument(
        "--auth",
        choices=AUTH_KINDS,
        default=None,
        help="authentication; secrets come from LEUKOFHIR_FHIR_TOKEN / LEUKOFHIR_FHIR_USER + "
        "LEUKOFHIR_FHIR_PASSWORD / LEUKOFHIR_SMART_CLIENT_ID + LEUKOFHIR_SMART_PRIVATE_KEY (or *_FILE), "
        "never from the command line",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request (default 60)")


def _memory_budget(value: str) -> int:
    from leukofhir.evaluate.partition import parse_size

    try:
        return parse_size(value)
    except LeukofhirError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--memory-budget",
        type=_memory_budget,
        metavar="SIZE",
        help="memory the input's rows may take, e.g. 64MB or 2GB (default 768MB, for a 2-core 4 GB worker); "
        "a larger input is partitioned by patient and evaluated a partition at a time",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes evaluating partitions at once, sharing the memory budget (default 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leukofhir", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("load", help="write FHIR Bundles / NDJSON to a server, keeping ids (idempotent)")
    _add_server_args(p)
    p.add_argument("files", nargs="+", metavar="FILE_OR_DIR")
    p.add_argument("--batch-size", type=int, default=200, help="resources per transaction Bundle (default 200)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="transactions sent at once (default 1); every resource of a type is written before the next "
        "type starts, so referenced resources still come first",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="run folder for rejects.ndjson (the server's full reasons, which "
        "may quote patient data); default: a fresh private folder, made only if something is rejected",
    )

    p = sub.add_parser("evaluate", help="offline: FHIR files in, Flags + quarantine + report out")
    p.add_argument("files", nargs="+", metavar="FILE_OR_DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--as-of", metavar="TIME", help="evaluate as of this instant (ISO 8601); default: latest input")
    p.add_argument("--config", metavar="FILE", help="site rules configuration (YAML), replacing the default")
    p.add_argument(
        "--data-docs",
        action="store_true",
        help="also write GX's own Data Docs site to DIR/gx-data-docs/ (its pages load styles from public CDNs)",
    )
    _add_memory_args(p)

    p = sub.add_parser("run", help="the pipeline against a FHIR server: read, validate, evaluate, write Flags back")
    _add_server_args(p)
    p.add_argument("--since", metavar="TIME", help="window start (ISO 8601 date or date-time; UTC if no zone)")
    p.add_argument("--until", metavar="TIME", help="window end, exclusive")
    p.add_argument(
        "--window-field",
        choices=["lastUpdated", "effective"],
        default="lastUpdated",
        help="what the window selects on: the server's _lastUpdated (default) or the clinical date",
    )
    p.add_argument("--patients", metavar="ID,...", help="evaluate exactly these patients instead of a window")
    p.add_argument(
        "--lapse-sweep",
        action="store_true",
        help="also evaluate the patients whose active Flags have had no count for longer than the lapse "
        "(the surveillance DAG's daily sweep); alone, or added to a window or to --patients",
    )
    p.add_argument("--dry-run", action="store_true", help="write nothing to the server; report what would be written")
    p.add_argument("--out", metavar="DIR", help="run folder for the reports (default: a fresh out/run-<time>)")
    p.add_argument("--config", metavar="FILE", help="site rules configuration (YAML), replacing the default")
    p.add_argument("--batch-size", type=int, default=100, help="patients read per set of searches (default 100)")
    p.add_argument(
        "--keep-staged",
        action="store_true",
        help="keep the staged server pages (NDJSON) in the run folder after evaluation",
    )

    p = sub.add_parser("export", help="Bulk Data $export from a server to NDJSON that `evaluate` reads")
    _add_server_args(p)
    from leukofhir.extract.export import add_arguments as add_export_arguments

    add_export_arguments(p)

    p = sub.add_parser("board", help="the hospital-wide board: the project's Flags on a server as DIR/board.html")
    _add_server_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="where board.html goes")
    p.add_argument("--as-of", metavar="TIME", help="count new Flags up to this instant (ISO 8601); default: now")
    p.add_argument(
        "--names",
        action="store_true",
        help="show the patients' names beside their ids (the page then holds patient data)",
    )
    p.add_argument("--config", metavar="FILE", help="site rules configuration (YAML), replacing the default")

    p = sub.add_parser(
        "conformance",
        help="put the Flag profile, its extension and value set on a server "
        "(idempotent: what is already there is left alone)",
    )
    _add_server_args(p)
    p.add_argument("--config", metavar="FILE", help="site rules configuration (YAML): its canonical base and codes")

    p = sub.add_parser("demo", help="start the local HAPI server, load the sample data, print a summary")
    p.add_argument("--fhir-url", default=None, type=_fhir_url, help="use this server instead of starting the local one")
    p.add_argument("--out", default="out/demo", metavar="DIR", help="where the demo's Flags and report go")

    p = sub.add_parser(
        "install-dags", help="write the DAG file that imports the package's DAGs into an Airflow dags folder"
    )
    p.add_argument("folder", metavar="DAGS_FOLDER", help="the Airflow dags folder ([core] dags_folder)")
    p.add_argument("--force", action="store_true", help="replace a leukofhir_dags.py that differs (a local edit)")

    from leukofhir.realtime import commands as realtime  # subscribe, listen: the near-real-time path

    realtime.add_parsers(sub, _add_server_args)
    from leukofhir.cds import command as cds  # the CDS Hooks service

    cds.add_parser(sub, _add_server_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "load":
            from leukofhir.write.load import load_command

            return load_command(args)
        if args.command == "evaluate":
            from leukofhir.evaluate.pipeline import evaluate_command

            return evaluate_command(args)
        if args.command == "run":
            from leukofhir.run import run_command

            return run_command(args)

        if args.command == "export":
            from leukofhir.extract.export import export_command

            return export_command(args)
        if args.command == "board":
            from leukofhir.report.board import board_command

            return board_command(args)
        if args.command == "conformance":
            from leukofhir.conformance.publish import conformance_command

            return conformance_command(args)
        if args.command == "demo":
            from leukofhir.demo import demo_command

            return demo_command(args)
        if args.command == "install-dags":
            from leukofhir.airflow.install_dags import install_dags_command

            return install_dags_command(args)
        if args.command in ("subscribe", "listen"):
            from leukofhir.realtime.commands import run

            return run(args)
        if args.command == "cds-hooks":
            from leukofhir.cds.command import cds_hooks_command

            return cds_hooks_command(args)
    except LeukofhirError as exc:
        # Library code raises typed errors; only here do they become a one-line message and an exit code.
        print(f"leukofhir {args.command}: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
