"""The `leukofhir` command line: argument parsing and exit codes only; the work lives in the package."""

from __future__ import annotations

import argparse
import logging
import sys

from leukofhir.errors import LeukofhirError

log = logging.getLogger("leukofhir")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fhir-url", required=True, help="FHIR base URL, e.g. http://127.0.0.1:8080/fhir")
    p.add_argument(
        "--auth",
        choices=["none", "basic", "bearer"],
        default=None,
        help="authentication; secrets come from LEUKOFHIR_FHIR_TOKEN / LEUKOFHIR_FHIR_USER + "
        "LEUKOFHIR_FHIR_PASSWORD (or *_FILE), never from the command line",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request (default 60)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leukofhir", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("load", help="write FHIR Bundles / NDJSON to a server, keeping ids (idempotent)")
    _add_server_args(p)
    p.add_argument("files", nargs="+", metavar="FILE_OR_DIR")
    p.add_argument("--batch-size", type=int, default=200, help="resources per transaction Bundle (default 200)")

    p = sub.add_parser("evaluate", help="offline: FHIR files in, Flags + quarantine + report out")
    p.add_argument("files", nargs="+", metavar="FILE_OR_DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--as-of", metavar="TIME", help="evaluate as of this instant (ISO 8601); default: latest input")
    p.add_argument("--config", metavar="FILE", help="site rules configuration (YAML), replacing the default")
    p.add_argument(
        "--data-docs", action="store_true",
        help="also write GX's own Data Docs site to DIR/gx-data-docs/ (its pages load styles from public CDNs)",
    )

    p = sub.add_parser("demo", help="start the local HAPI server, load the sample data, print a summary")
    p.add_argument("--fhir-url", default=None, help="use this server instead of starting the local one")
    p.add_argument("--out", default="out/demo", metavar="DIR", help="where the demo's Flags and report go")

    from leukofhir.realtime import commands as realtime  # subscribe, listen: the near-real-time path

    realtime.add_parsers(sub, _add_server_args)
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
            from leukofhir.load import load_command

            return load_command(args)
        if args.command == "evaluate":
            from leukofhir.pipeline import evaluate_command

            return evaluate_command(args)
        if args.command == "demo":
            from leukofhir.demo import demo_command

            return demo_command(args)
        if args.command in ("subscribe", "listen"):
            from leukofhir.realtime.commands import run

            return run(args)
    except LeukofhirError as exc:
        # Library code raises typed errors; only here do they become a one-line message and an exit code.
        print(f"leukofhir {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
