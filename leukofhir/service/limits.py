"""The limits an HTTP service of leukofhir runs under (time-outs, connections, sizes), their command-line options,
and the process's descriptor limit they must fit in."""

from __future__ import annotations

import argparse
import logging
import resource
from dataclasses import dataclass, replace

from leukofhir.errors import UsageError

log = logging.getLogger(__name__)

# Descriptors a service keeps for itself besides its connections: at rest the receiver holds 18 (the queue's
# SQLite files, the event loop, the log), and its clients to Airflow and the FHIR server hold a few more.
DESCRIPTOR_RESERVE = 64
# Below this many connections a service is not worth starting: a limit that low is a mistake to report.
MIN_CONNECTIONS = 8


@dataclass(frozen=True)
class Limits:
    """What one connection and one request may take. The time-outs are whole deadlines, not pauses between
    bytes, so a client trickling a byte a second is cut at the same moment as one sending nothing."""

    header_timeout: float = 10.0  # connection opened (or last answer sent) → the request's head complete
    body_timeout: float = 20.0  # head complete → the body's last byte (5 MiB at 2 Mbit/s)
    keep_alive: float = 5.0  # an idle connection between requests (uvicorn's own time-out)
    max_connections: int = 256  # held at once; lowered to what the descriptor limit leaves
    max_header_bytes: int = 64 * 1024  # request line and headers
    max_body_bytes: int = 5 * 1024 * 1024  # one request's body, counted as it arrives (chunked ones too)
    max_buffered_bytes: int = 64 * 1024 * 1024  # the bodies of all requests in progress, together
    max_json_depth: int = 64  # nesting of a JSON body; a FHIR resource needs about 10


def add_arguments(parser: argparse.ArgumentParser, defaults: Limits = Limits()) -> None:
    """The options every HTTP service command takes (README, "Deploying the receiver")."""
    group = parser.add_argument_group("connections (what a slow or hostile client may hold)")
    group.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout,
        metavar="S",
        help=f"seconds from a connection's start to its request's complete head ({defaults.header_timeout:g})",
    )
    group.add_argument(
        "--body-timeout",
        type=float,
        default=defaults.body_timeout,
        metavar="S",
        help=f"seconds from the head to the body's last byte ({defaults.body_timeout:g})",
    )
    group.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=defaults.keep_alive,
        metavar="S",
        help=f"seconds an idle connection stays open between requests ({defaults.keep_alive:g})",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        metavar="N",
        help=f"connections held at once ({defaults.max_connections}; at most the descriptor "
        f"limit less {DESCRIPTOR_RESERVE})",
    )


def from_arguments(args: argparse.Namespace, defaults: Limits = Limits()) -> Limits:
    limits = replace(
        defaults,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive=args.keep_alive_timeout,
        max_connections=args.max_connections,
    )
    for name in ("header_timeout", "body_timeout", "keep_alive"):
        if not getattr(limits, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be more than 0 seconds")
    if limits.max_connections < 1:
        raise UsageError("--max-connections must be at least 1")
    return limits


def raise_descriptor_limit() -> int:
    """Raise the soft limit of open descriptors to the hard one (what the service manager allows), and return it.
    Each connection is a descriptor; a soft limit of 1,024, a common default, is what idle sockets exhausted."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # an unlimited hard limit, say: keep the soft one
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(limits: Limits, descriptors: int) -> int:
    """How many connections the service holds at once: what was asked for, within the descriptors it has."""
    available = descriptors - DESCRIPTOR_RESERVE
    if available < MIN_CONNECTIONS:
        raise UsageError(
            f"the descriptor limit ({descriptors}) leaves {max(available, 0)} for connections, fewer "
            f"than {MIN_CONNECTIONS}: raise it (systemd: LimitNOFILE=; a shell: ulimit -n)"
        )
    if limits.max_connections > available:
        log.warning(
            '--max-connections %d lowered to %d: the descriptor limit is %d (README, "Deploying the receiver")',
            limits.max_connections,
            available,
            descriptors,
        )
    return min(limits.max_connections, available)
