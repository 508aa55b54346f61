"""`leukofhir cds-hooks`: its command-line arguments, and the service started on the project's hardened HTTP server."""

from __future__ import annotations

import argparse
import gc
import logging
from typing import Callable

from leukofhir.service import limits as service_limits

log = logging.getLogger(__name__)
FETCH_TIMEOUT = 10.0  # seconds per FHIR request while the EHR waits for its cards


def add_parser(sub, add_server_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "cds-hooks",
        help="a CDS Hooks 2.0 service: leukopenia cards at patient-view and order-sign",
        description="The EHR's JWT is verified against the JWKS of each --trusted-issuer; the FHIR server is read "
        "when the EHR's prefetch is incomplete (docs/cds-hooks.md).",
    )
    add_server_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8091, help="port (default 8091)")
    p.add_argument(
        "--trusted-issuer",
        action="append",
        default=[],
        metavar="ISS=JWKS_FILE_OR_URL",
        help="an EHR whose JWTs are accepted: its iss and its JWKS (a file, or an https URL); repeatable",
    )
    p.add_argument(
        "--public-url",
        metavar="URL",
        help="the service's base URL as the EHR calls it (the JWT's aud is this + /cds-services/<id>); "
        "default http(s)://HOST:PORT",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin allowed to call the service (the CDS Hooks sandbox); repeatable",
    )
    p.add_argument(
        "--as-of",
        metavar="TIME",
        help="evaluate as of this instant (ISO 8601) instead of each request's time: only to show the "
        "service on historic data, such as the sample data, whose episodes have lapsed by now",
    )
    p.add_argument("--config", metavar="FILE", help="site rules configuration (YAML), replacing the default")
    p.add_argument("--ssl-certfile", help="serve https (TLS 1.2 or later) with this certificate chain (PEM)")
    p.add_argument("--ssl-keyfile", help="the certificate's private key (PEM), if not in the certificate file")
    service_limits.add_arguments(p)


def cds_hooks_command(args) -> int:
    from leukofhir.cds.app import LIMITS, CdsService, create_app
    from leukofhir.cds.fetch import PatientReader
    from leukofhir.cds.tokens import TokenChecker, parse_trusted
    from leukofhir.config import load_config
    from leukofhir.errors import UsageError
    from leukofhir.evaluate.pipeline import parse_as_of
    from leukofhir.fhir.auth import make_auth
    from leukofhir.fhir.client import FhirClient
    from leukofhir.service.logs import Refusals
    from leukofhir.service.server import serve

    rules = load_config(args.config)
    issuers = parse_trusted(args.trusted_issuer)
    if not issuers:
        raise UsageError("give at least one --trusted-issuer ISS=JWKS_FILE_OR_URL: every hook request needs a JWT")
    limits = service_limits.from_arguments(args, LIMITS)
    scheme = "https" if args.ssl_certfile else "http"
    public_url = args.public_url or f"{scheme}://{args.host}:{args.port}"
    fhir = FhirClient(
        args.fhir_url,
        make_auth(args.auth, base_url=args.fhir_url),
        timeout=min(args.timeout, FETCH_TIMEOUT),
        max_retries=1,
    )
    service = CdsService(rules, PatientReader(fhir, rules), public_url, as_of=parse_as_of(args.as_of))
    service.warm()
    app = create_app(service, TokenChecker(issuers), args.cors_origin)
    # What the imports and GX's context built lives as long as the process: out of the collector's sight, so a full
    # collection walks a request's objects only (it walked them all: 300 ms pauses, the p95; benchmarks/cds_bench.py).
    gc.freeze()
    log.info("CDS Hooks discovery at %s/cds-services; %d trusted issuer(s)", public_url, len(issuers))
    try:
        serve(
            app,
            name="leukofhir cds-hooks",
            host=args.host,
            port=args.port,
            limits=limits,
            refusals=Refusals(log),
            certfile=args.ssl_certfile,
            keyfile=args.ssl_keyfile,
        )
    finally:
        fhir.close()
    return 0
