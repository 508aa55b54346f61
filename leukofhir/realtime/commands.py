"""Command-line arguments of `leukofhir subscribe` and `leukofhir listen` (cli.py wires them in)."""

from __future__ import annotations

import argparse
import os
from typing import Callable

from leukofhir.service import limits as service_limits


def add_parsers(sub, add_server_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "subscribe",
        help="create/update (idempotently) or --remove the FHIR rest-hook Subscriptions of leukofhir",
        description="Secret: LEUKOFHIR_HOOK_SECRET or LEUKOFHIR_HOOK_SECRET_FILE (the same for `listen`).",
    )
    add_server_args(p)
    p.add_argument("--endpoint", help="the receiver's URL (`leukofhir listen`), e.g. http://127.0.0.1:8089/notify")
    p.add_argument("--remove", action="store_true", help="delete the Subscriptions of leukofhir instead")
    p.add_argument("--config", metavar="FILE", help="site rules configuration (YAML): its codes and medication types")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the server to activate them (30)")

    p = sub.add_parser(
        "listen",
        help="receive FHIR rest-hook notifications and start Airflow runs for the touched patients",
        description="Secrets: LEUKOFHIR_HOOK_SECRET, LEUKOFHIR_AIRFLOW_USER, LEUKOFHIR_AIRFLOW_PASSWORD "
        "(each also as *_FILE); the Airflow URL may come from LEUKOFHIR_AIRFLOW_URL.",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help='address to listen on (default loopback only; README, "Deploying the receiver")',
    )
    p.add_argument("--port", type=int, default=8089, help="port (default 8089)")
    p.add_argument(
        "--queue",
        default=os.path.join("out", "listen", "queue.sqlite3"),
        metavar="FILE",
        help="the durable queue of patients not yet in an accepted run (default out/listen/queue.sqlite3)",
    )
    p.add_argument(
        "--airflow-url", help="Airflow api-server base URL, e.g. http://127.0.0.1:8080 (default: LEUKOFHIR_AIRFLOW_URL)"
    )
    p.add_argument("--debounce", type=float, default=1.0, help="seconds without a new patient before a batch (1)")
    p.add_argument("--max-wait", type=float, default=5.0, help="seconds a patient waits at most for a batch (5)")
    p.add_argument("--max-batch", type=int, default=500, help="patients per run at most (500)")
    p.add_argument("--retry-max", type=float, default=30.0, help="longest pause between tries to reach Airflow (30)")
    p.add_argument(
        "--window-lookback",
        type=float,
        default=300.0,
        help="seconds before an empty notification a surveillance window starts at most (300)",
    )
    p.add_argument("--ssl-certfile", help="serve https (TLS 1.2 or later) with this certificate chain (PEM)")
    p.add_argument("--ssl-keyfile", help="the certificate's private key (PEM), if not in the certificate file")
    service_limits.add_arguments(p)
    add_server_args(p)  # the FHIR server is read for deletions: a DELETE notification has no body


def run(args) -> int:
    if args.command == "subscribe":
        from leukofhir.realtime.subscribe import subscribe_command

        return subscribe_command(args)
    from leukofhir.realtime.listen import listen_command

    return listen_command(args)
